"""The ONNX folder's final layout: the one Hugging Face's loaders (transformers.js, the Hub's onnx-community repos)
read, which onnxruntime-genai reads too.

    config.json, generation_config.json, tokenizer files, genai_config.json
    onnx/model_q4.onnx + onnx/model_q4.onnx_data

transformers.js picks `onnx/model{suffix}.onnx` by the `dtype` a user asks for (q4 -> `_q4`, q8 -> `_quantized`,
fp32 -> no suffix) and, when told the model has external data, fetches `{file}_data` beside it; both defaults go
into config.json's `transformers.js_config`, so `from_pretrained(folder)` needs no options. The external data's
file name is recorded inside the graph (each initializer's `location`), so moving the file means rewriting that
field; the bytes and offsets are unchanged. onnxruntime-genai finds the graph through genai_config's `filename`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

SUBFOLDER = "onnx"
# transformers.js's dtype for each weight width of MatMulNBits (its DEFAULT_DTYPE_SUFFIX_MAPPING gives the suffix).
_DTYPES = {None: ("fp32", ""), 4: ("q4", "_q4"), 8: ("q8", "_quantized")}
# The builder (0.18) leaves the KV cache's last axis symbolic; loaders that allocate an empty past from the
# graph's input shapes (transformers.js) need the head size there.
_SYMBOLIC_HEAD_DIM = "kv_cache_dim"


def model_file(weight_bits: int | None) -> tuple[str, str]:
    """(transformers.js dtype, the graph's path inside the folder) for a body quantized to `weight_bits`."""
    dtype, suffix = _DTYPES[weight_bits]
    return dtype, f"{SUBFOLDER}/model{suffix}.onnx"


def lay_out(folder: Path, model: str, data: str, weight_bits: int | None, head_dim: int) -> str:
    """Move `folder/model` (+ `folder/data` when it exists) to where HF loaders look; returns the graph's new path
    relative to `folder`."""
    import onnx

    dtype, main = model_file(weight_bits)
    target = folder / main
    target.parent.mkdir(exist_ok=True)
    external = (folder / data).exists()
    graph = onnx.load(str(folder / model), load_external_data=False)
    if external:
        for tensor in graph.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = f"{target.name}_data"
        os.replace(folder / data, target.parent / f"{target.name}_data")
    for value in (*graph.graph.input, *graph.graph.output):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == _SYMBOLIC_HEAD_DIM:
                dim.dim_value = head_dim
    onnx.save(graph, str(target))
    (folder / model).unlink()
    _edit_json(folder / "genai_config.json", lambda c: c["model"]["decoder"].update(filename=main))
    _edit_json(folder / "config.json", lambda c: c.update({"transformers.js_config": {
        "dtype": dtype, "use_external_data_format": external}}))
    return main


def _edit_json(path: Path, edit: Any) -> None:
    content = json.loads(path.read_text())
    edit(content)
    path.write_text(json.dumps(content, indent=2 if path.name == "config.json" else 4))
