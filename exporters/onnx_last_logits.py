"""A `num_logits_to_keep` input on a builder graph: a prompt can compute its last position's logits only.

The builder's graph runs the lm_head on every position of every call, which is what the teacher-forced accuracy
pass needs; an app that prefills a prompt needs one row. This pass slices the final norm's output to its last
`num_logits_to_keep` positions before the lm_head, the way transformers' `logits_to_keep` argument does (0 keeps
every position):

    hidden[:, -num_logits_to_keep:, :]  ->  lm_head  ->  logits (batch, kept positions, vocab)

The input is an int64 scalar and required. transformers.js feeds it by this name (0, every position, when the
session lists it: its `setNumLogitsToKeep`) and onnxruntime-genai generates from the folder with it (both covered
by tests/exporters/test_onnx.py). It is required because ONNX Runtime's IO binding, which the shared KV cache
needs, cannot bind an optional input (an initializer listed as a graph input). Ops added: Sub, Reshape, Slice,
all in onnxruntime-web's WASM kernels.
"""

from __future__ import annotations

from pathlib import Path

from compress.artifact import LOGITS_TO_KEEP as INPUT
from compress.errors import ExportError

_P = "/lm_head/num_logits_to_keep"


def add_logits_to_keep(model_path: Path) -> None:
    """Rewrite the graph at `model_path` in place (its external weights untouched)."""
    import onnx
    from onnx import TensorProto, helper

    m = onnx.load(str(model_path), load_external_data=False)
    graph = m.graph
    norms = [n for n in graph.node if "final_norm" in n.name]
    if len(norms) != 1:
        raise ExportError(f"logits_to_keep: expected one final norm in the builder's graph, found {len(norms)}")
    hidden = norms[0].output[0]
    consumers = [n for n in graph.node if hidden in n.input]
    if not consumers or not all(n.name.startswith("/lm_head/") for n in consumers):
        raise ExportError(f"logits_to_keep: the final norm feeds {[n.name for n in consumers]}, not the lm_head only")
    sliced = f"{_P}/Slice/output_0"
    for node in consumers:
        node.input[:] = [sliced if name == hidden else name for name in node.input]
    graph.input.append(helper.make_tensor_value_info(INPUT, TensorProto.INT64, []))
    graph.initializer.extend([
        helper.make_tensor(f"{_P}/zero", TensorProto.INT64, [], [0]),
        helper.make_tensor(f"{_P}/shape", TensorProto.INT64, [1], [1]),
        helper.make_tensor(f"{_P}/end", TensorProto.INT64, [1], [2**63 - 1]),
        helper.make_tensor(f"{_P}/axis", TensorProto.INT64, [1], [1]),
    ])
    index = list(graph.node).index(consumers[0])
    nodes = [
        helper.make_node("Sub", [f"{_P}/zero", INPUT], [f"{_P}/Sub/output_0"], name=f"{_P}/Sub"),
        helper.make_node("Reshape", [f"{_P}/Sub/output_0", f"{_P}/shape"], [f"{_P}/start"], name=f"{_P}/Reshape"),
        helper.make_node("Slice", [hidden, f"{_P}/start", f"{_P}/end", f"{_P}/axis"], [sliced], name=f"{_P}/Slice"),
    ]
    for offset, node in enumerate(nodes):
        graph.node.insert(index + offset, node)
    logits = next(o for o in graph.output if o.name == "logits")
    logits.type.tensor_type.shape.dim[1].dim_param = "logits_sequence_length"
    onnx.save(m, str(model_path))  # (onnx's checker refuses every builder graph: its norms are ORT-only ops)
