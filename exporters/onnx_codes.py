"""Lower the quantize stage's codes into a builder graph's MatMulNBits, exactly, without re-rounding.

The onnxruntime-genai builder writes the graph (fused QKV, GroupQueryAttention, GatherBlockQuantized sharing the
lm_head's matrix); this pass then overwrites every MatMulNBits's weight, scales and zero points with the stage's
codes. A tensor whose zero points are integers (symmetric, or asymmetric round-to-nearest) maps onto
MatMulNBits as it is. One whose offsets are arbitrary floats (a GGUF's Q4_1, HQQ) would need float zero points,
which ONNX Runtime 1.32's CPU kernel accepts but runs 16x slower (measured: 783 us vs 50 us for a 576x1536
int4 matmul, 2 threads); so those run as signed codes with the default zero point plus an exact correction,
(x summed over each group) @ residual_offset.T: Reshape -> ReduceSum -> MatMul -> Add, all in the web op set.
A fused QKV whose parts differ in bits is written at the widest, a narrower part's codes centred in the wider grid.

Storage: the stage's scales are fp16 values (compress.quantized), so they are stored as fp16 initializers and a
Cast gives MatMulNBits its fp32 scales, exactly (ONNX Runtime folds the Cast when the session is created). The
correction's residual offsets (offset + 2**(bits-1) * scale) are fp16 values too for the stage's float offsets,
and are then stored in fp16 with a Cast. A stage run with `scale_bits: 8` puts each row's scales and residuals on
8-bit codes times a power of two: those are stored as uint8/int8 initializers plus one factor per row (fp16 when
every factor of the tensor is an fp16 value, else fp32), and Cast -> Mul rebuilds the fp32 values exactly (a
power-of-two product), folded at session creation like the Cast.
A tensor whose scales or residuals neither form holds exactly (a GGUF's own grid, codes from elsewhere) keeps them
in fp32. Zero points equal to MatMulNBits' default (2**(bits-1)) are not stored, except where a
GatherBlockQuantized shares the matrix.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from compress.errors import ExportError
from compress.quantized import QuantizedWeights, QuantTensor

CORRECTION_SUFFIX = "/offset_MatMul"
_NODE = re.compile(r"^/model/layers\.(\d+)/(attn|mlp)/(qkv_proj|o_proj|gate_proj|up_proj|down_proj)/MatMul")
_PARTS = {"qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "o_proj": ("self_attn.o_proj",),
          "gate_proj": ("mlp.gate_proj",), "up_proj": ("mlp.up_proj",), "down_proj": ("mlp.down_proj",)}


def source_names(node_name: str) -> tuple[str, ...] | None:
    """The export-module linears a builder MatMulNBits node computes (several when the builder fused them)."""
    if node_name.startswith("/lm_head/"):
        return ("lm_head",)
    m = _NODE.match(node_name)
    if m is None:
        return None
    layer, _, kind = m.groups()
    return tuple(f"layers.{layer}.{part}" for part in _PARTS[kind])


def fuse(parts: list[QuantTensor]) -> QuantTensor:
    """Stack linears that share an input (rows), widening every part to the widest bit width.

    A narrower part's codes are moved to the middle of the wider grid (codes + shift, offset - shift * scale:
    the same weights, up to the fp32 rounding of that offset). Left at the bottom of the grid, its signed codes
    (codes - 2**(bits-1)) would be ~16x the weights' size for 4-bit codes in an 8-bit matrix, and int8 activations
    (accuracy_level 4) multiply their rounding error by them before the float correction term adds back.
    """
    import torch

    bits = max(t.bits for t in parts)
    groups = {t.group for t in parts}
    if len(groups) != 1:
        raise ExportError(f"fused linears have different group sizes {sorted(groups)}; ONNX's fused QKV needs one")
    widened = []
    for t in parts:
        shift = 2 ** (bits - 1) - 2 ** (t.bits - 1)
        widened.append(QuantTensor(t.codes + shift, t.scale, t.offset - shift * t.scale, bits, t.group) if shift
                       else t)
    cat = [torch.cat([getattr(t, f) for t in widened]) for f in ("codes", "scale", "offset")]
    return QuantTensor(*cat, bits=bits, group=groups.pop())


def lower_codes(model_path: Path, weights: QuantizedWeights, accuracy_level: int) -> dict[str, Any]:
    """Rewrite model.onnx (and its external data) in place; returns what was lowered how."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.load(str(model_path))
    graph = m.graph
    inits = {t.name: t for t in graph.initializer}
    used, exact, corrected, extra_nodes, prelude = set(), 0, 0, [], []
    stored = {"scales_stored_fp16": 0, "scales_stored_8bit": 0, "residuals_stored_fp16": 0,
              "residuals_stored_8bit": 0}
    for node in [n for n in graph.node if n.op_type == "MatMulNBits"]:
        names = source_names(node.name)
        if names is None or not all(n in weights.tensors for n in names):
            continue  # not a matrix of the stage's (or not all of it): the coverage check below decides
        t = fuse([weights.tensors[n] for n in names])
        used.update(names)
        zero = t.integer_zero_points()
        width = t.codes.shape[1]
        _set_attrs(node, bits=t.bits, block_size=t.group, accuracy_level=accuracy_level, K=width, N=t.codes.shape[0])
        _replace(graph, inits, node.input[1], numpy_helper.from_array(_pack_b(t), node.input[1]))
        zp_name = node.input[3] if len(node.input) > 3 and node.input[3] else f"{node.input[1]}_zp"
        shared = [c for c in graph.node if c.op_type == "GatherBlockQuantized" and c.input[2] == node.input[2]]
        coded = None if shared else t.scale_codes()
        if coded is not None:
            _store_coded(graph, inits, prelude, node.input[2], *coded)
            stored["scales_stored_8bit"] += 1
        else:
            stored["scales_stored_fp16"] += _store_float(graph, inits, prelude, node.input[2], t.scale.numpy(),
                                                         half=t.fp16_scales())
        if zero is None and shared:
            raise ExportError(f"{names[0]}: the tied embedding reads this matrix, so its codes need integer zero "
                              f"points (GatherBlockQuantized has no offset correction); quantize the lm_head with "
                              f"'rtn' or keep_gguf")
        if zero is None:  # signed codes around the default zero point, plus the exact per-group correction
            zero = np.full(t.scale.shape, t.midpoint, dtype=np.uint8)
            nodes, kind = _correction(node, t, helper, numpy_helper, graph)
            extra_nodes.append((node, nodes))
            stored[kind] = stored.get(kind, 0) + 1
            corrected += 1
        else:
            zero = zero.numpy()
            exact += 1
        if not shared and bool((zero == t.midpoint).all()):  # MatMulNBits' default zero point: nothing to store
            _drop_zero_points(graph, inits, node)
        else:
            _replace(graph, inits, zp_name, numpy_helper.from_array(_pack_zero(zero, t.bits), zp_name))
            if len(node.input) < 4:
                node.input.append(zp_name)
        for consumer in shared:  # the embedding's GatherBlockQuantized reads the same tied matrix
            _set_attrs(consumer, bits=t.bits, block_size=t.group)
            if len(consumer.input) < 4:
                consumer.input.append(zp_name)
    for node, new_nodes in extra_nodes:
        index = list(graph.node).index(node)
        for offset, new in enumerate(new_nodes):
            graph.node.insert(index + 1 + offset, new)
    for index, new in enumerate(prelude):  # before every consumer
        graph.node.insert(index, new)
    missing = sorted(set(weights.tensors) - used)
    if missing:  # the builder's own round-to-nearest weights would ship in their place: a silent partial lowering
        raise ExportError(f"{len(missing)} of the quantize stage's tensors have no MatMulNBits node to carry them in "
                          f"the ONNX graph (e.g. {', '.join(missing[:3])}); nothing was written")
    data = model_path.with_name(model_path.name + ".data")
    data.unlink(missing_ok=True)
    onnx.save(m, str(model_path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name,
              size_threshold=1024)
    return {"matmuls_lowered_from_codes": exact + corrected, "with_integer_zero_points": exact,
            "with_offset_correction": corrected, **stored, "stage_tensors_not_in_graph": missing}


def _set_attrs(node: Any, **values: int) -> None:
    from onnx import helper

    keep = [a for a in node.attribute if a.name not in values]
    del node.attribute[:]
    node.attribute.extend(keep + [helper.make_attribute(k, v) for k, v in values.items()])


def _replace(graph: Any, inits: dict[str, Any], name: str, tensor: Any) -> None:
    if name in inits:
        graph.initializer.remove(inits[name])
    graph.initializer.append(tensor)
    inits[name] = tensor


def _store_float(graph: Any, inits: dict[str, Any], prelude: list[Any], name: str, values: Any, half: bool) -> bool:
    """Initializer `name` as fp32 values: stored as they are, or (`half`) as fp16 plus a Cast to fp32 named
    `name`, replacing any initializer of that name. Returns `half`."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    if not half:
        _replace(graph, inits, name, numpy_helper.from_array(values.astype(np.float32), name))
        return False
    if name in inits:
        graph.initializer.remove(inits.pop(name))
    _replace(graph, inits, f"{name}_fp16", numpy_helper.from_array(values.astype(np.float16), f"{name}_fp16"))
    prelude.append(helper.make_node("Cast", [f"{name}_fp16"], [name], to=TensorProto.FLOAT, name=f"{name}_Cast"))
    return True


def _store_coded(graph: Any, inits: dict[str, Any], prelude: list[Any], name: str, codes: Any, factor: Any,
                 transpose: bool = False) -> None:
    """fp32 values `name` = codes (8-bit, (rows, groups)) * factor (powers of two, (rows, 1)), stored as the codes
    and the factors with Cast -> Mul (exact: a power-of-two product); `transpose` stores (groups, rows). The factors
    are stored fp16 where every one is an fp16 value (powers of two from 2^-24 to 2^15), else fp32."""
    import torch
    from onnx import TensorProto, helper, numpy_helper

    if name in inits:
        graph.initializer.remove(inits.pop(name))
    codes, factor = (codes.T, factor.T) if transpose else (codes, factor)
    factor = factor.float()
    half = bool(torch.equal(factor.half().float(), factor))
    stored = (factor.half() if half else factor).contiguous().numpy()
    _replace(graph, inits, f"{name}_q8", numpy_helper.from_array(codes.contiguous().numpy(), f"{name}_q8"))
    _replace(graph, inits, f"{name}_factor", numpy_helper.from_array(stored, f"{name}_factor"))
    prelude.append(helper.make_node("Cast", [f"{name}_q8"], [f"{name}_q8_float"], to=TensorProto.FLOAT,
                                    name=f"{name}_q8_Cast"))
    factor_name = f"{name}_factor"
    if half:
        prelude.append(helper.make_node("Cast", [factor_name], [f"{name}_factor_float"], to=TensorProto.FLOAT,
                                        name=f"{name}_factor_Cast"))
        factor_name = f"{name}_factor_float"
    prelude.append(helper.make_node("Mul", [f"{name}_q8_float", factor_name], [name], name=f"{name}_q8_Mul"))


def _drop_zero_points(graph: Any, inits: dict[str, Any], node: Any) -> None:
    if len(node.input) <= 3 or not node.input[3]:
        return
    if node.input[3] in inits and not any(node.input[3] in other.input for other in graph.node if other is not node):
        graph.initializer.remove(inits.pop(node.input[3]))
    if len(node.input) == 4:
        del node.input[3]
    else:
        node.input[3] = ""  # optional inputs after it (g_idx, bias) keep their positions


def _pack_b(t: QuantTensor) -> Any:
    """(N, K) codes -> MatMulNBits' B: (N, K / block, block * bits / 8) uint8, low nibble first."""
    codes = t.codes.numpy()
    out, width = codes.shape
    if t.bits == 4:
        codes = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return codes.reshape(out, width // t.group, -1)


def _pack_zero(zero: Any, bits: int) -> Any:
    """(N, groups) zero points -> uint8, two per byte along each row for 4 bits (odd counts padded)."""
    import numpy as np

    zero = zero.astype(np.uint8)
    if bits == 8:
        return zero
    if zero.shape[1] % 2:
        zero = np.concatenate([zero, np.zeros((zero.shape[0], 1), np.uint8)], axis=1)
    return zero[:, 0::2] | (zero[:, 1::2] << 4)


def _correction(node: Any, t: QuantTensor, helper: Any, numpy_helper: Any, graph: Any) -> tuple[list[Any], str]:
    """out = MatMulNBits(x) + ReduceSum(Reshape(x, (.., groups, block)), -1) @ residual.T, renaming the output;
    the residual as 8-bit codes times a factor per row, or in fp16, where that is exact (see the module docstring).
    Returns the nodes and how the residual is stored."""
    import numpy as np
    from onnx import TensorProto

    base = node.name
    x, out = node.input[0], node.output[0]
    main = f"{out}/main"
    node.output[0] = main
    groups = t.codes.shape[1] // t.group
    shape = numpy_helper.from_array(np.array([0, 0, groups, t.group], np.int64), f"{base}/offset_shape")
    axes = numpy_helper.from_array(np.array([-1], np.int64), f"{base}/offset_axes")
    graph.initializer.extend([shape, axes])
    weight, nodes = f"{base}/offset_weight", []  # (groups, N)
    coded = t.residual_codes()
    if coded is not None:
        _store_coded(graph, {}, nodes, weight, *coded, transpose=True)
        kind = "residuals_stored_8bit"
    elif t.fp16_residuals():
        _store_float(graph, {}, nodes, weight, t.residual_offset().T.contiguous().numpy(), half=True)
        kind = "residuals_stored_fp16"
    else:
        _store_float(graph, {}, nodes, weight, t.residual_offset().T.contiguous().numpy(), half=False)
        kind = "residuals_stored_fp32"
    return nodes + [
            helper.make_node("Reshape", [x, shape.name], [f"{base}/offset_x"], name=f"{base}/offset_Reshape"),
            helper.make_node("ReduceSum", [f"{base}/offset_x", axes.name], [f"{base}/offset_sum"], keepdims=0,
                             name=f"{base}/offset_ReduceSum"),
            helper.make_node("MatMul", [f"{base}/offset_sum", weight], [f"{base}/offset_out"],
                             name=f"{base}{CORRECTION_SUFFIX}"),
            helper.make_node("Add", [main, f"{base}/offset_out"], [out], name=f"{base}/offset_Add")], kind
