"""How a stage's output is stored in the cache: an ordinary HF safetensors checkpoint, plus the quantize stage's
codes (compress.quantized) when it produced them; and how an owned model gets the float weights of such a checkpoint
(or of the source model's) back in place."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from compress.quantized import QuantizedWeights


def save_stage(model: Any, quantized: QuantizedWeights | None, path: Path) -> None:
    model.save_pretrained(path, safe_serialization=True)
    if quantized is not None:
        quantized.save(path)


def load_stage(path: Path) -> tuple[Any, QuantizedWeights | None]:
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True).eval()
    return model, QuantizedWeights.load(path)


def float_restorer(model: Any, directory: Path) -> Callable[[Any], None] | None:
    """A function that writes the float weights saved in `directory` (an HF safetensors checkpoint of `model`,
    which is what `model` was loaded from) back into a model of the same shape, in place, one tensor at a time:
    so a stage that owns `model` may overwrite its weights and have them back without a second fp32 copy. None when
    the files do not hold every parameter of `model` under its own name and shape, as a float (a checkpoint whose
    keys transformers renames on loading): the stage then keeps a copy instead. Only the files' headers are read
    here.

    Read with plain file reads straight into each parameter, not through safetensors' `safe_open`: that maps the
    whole file, and every page read through the mapping counts in the process's resident memory until it is
    closed (4.9 GB more at 1B, measured), and `get_tensor` makes a copy of each tensor besides."""
    params = dict(model.named_parameters())  # a tied lm_head is listed once, as the embedding
    files = sorted(directory.glob("*.safetensors"))
    where: dict[str, tuple[Path, int, str]] = {}  # name -> (file, byte offset, safetensors dtype)
    for file in files:
        for name, (offset, dtype, shape) in _header(file).items():
            p = params.get(name)
            if p is not None and dtype in _FLOATS and tuple(shape) == tuple(p.shape):
                where[name] = (file, offset, dtype)
    if not files or where.keys() != params.keys():
        return None
    return functools.partial(_restore, where=where)


_FLOATS = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def _header(file: Path) -> dict[str, tuple[int, str, list[int]]]:
    """A safetensors file's tensors: name -> (absolute byte offset of its data, dtype, shape)."""
    import json
    import struct

    with open(file, "rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(size))
    header.pop("__metadata__", None)
    return {name: (8 + size + t["data_offsets"][0], t["dtype"], t["shape"]) for name, t in header.items()}


def _restore(model: Any, where: dict[str, tuple[Path, int, str]]) -> None:
    import torch

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, (file, offset, dtype) in sorted(where.items(), key=lambda kv: (str(kv[1][0]), kv[1][1])):
            p = params[name]
            same = dtype == "F32" and p.dtype == torch.float32 and p.is_contiguous()
            into = p.detach() if same else torch.empty(p.shape, dtype=getattr(torch, _FLOATS[dtype]))
            with open(file, "rb") as fh:
                fh.seek(offset)
                done = fh.readinto(memoryview(into.view(torch.uint8).numpy()).cast("B"))
            if done != into.numel() * into.element_size():
                raise OSError(f"{file}: {name} is truncated ({done} bytes read)")
            if not same:  # a bf16 / fp16 checkpoint widens to fp32 exactly as loading it did
                p.copy_(into)
