"""Lower the quantize stage's codes into the export module for ExecuTorch/XNNPACK; the codes are never re-rounded.

Two things are rounded again, because XNNPACK's int8 kernels are per output channel: an 8-bit lm_head with
per-group codes is re-rounded per channel, and with int8 dynamic activations the offset correction R below is
stored in int8 per channel. Both are listed in the artifact's coverage record (`requantized`, `offset_terms`).

Each quantized linear becomes a `CodesLinear`: the stage's codes as signed int8 (out, in) with one fp32 scale per
group (or per output channel), dequantized in the graph by PyTorch's `quantized_decomposed` ops and, with int8
dynamic activations, its input quantized per token by the same family of ops. XNNPACK's partitioner turns each such
pattern into one dynamically quantized fully-connected op (QB4W for int4 groups, QC8W for int8 per channel).
Why not torchao's `quantize_` (what this file used before; the lowered program is the same): torchao's affine ops
are CompositeImplicitAutograd, so every trace of the export (torch.export, the decompositions, each edge pass, the
partitioner's sub-graphs) runs their Python bodies op by op under fake tensors; on SmolLM2 that was 32% of the
export (py-spy). PyTorch's quantized_decomposed ops have meta kernels.

XNNPACK's dynamically quantized linears take symmetric weights only (zero point 0). Codes with a per-group offset
(asymmetric round to nearest, a GGUF's Q4_1, HQQ's float zero points) are therefore lowered as signed codes plus a
correction, exact in real arithmetic: y = linear(x) + sums(x) @ R.T, where sums(x) adds up each group of inputs
and R (out, groups) holds the residual offsets. Both are small linears that XNNPACK runs (the sums as an fp32 row
of ones over the input viewed in groups; R in int8 per channel when the activations are int8 dynamic, fp32
otherwise). The tied
embedding gathers the codes the lm_head runs with through ExecuTorch's quantized embedding kernel (integer zero
points): the same bytes, which the exporter's external data stores once.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  registers torch.ops.quantized_decomposed
from compress.exporters.llama import fused_qkv_names
from torch import nn
from torch.nn import functional as F

from compress.errors import ExportError
from compress.quantized import ROW_BLOCK_ELEMENTS, Activations, QuantizedWeights, QuantTensor, row_blocks, rtn

_Q = torch.ops.quantized_decomposed


class CodesLinear(nn.Module):
    """A linear over signed integer codes, in the pattern XNNPACK lowers to one fully-connected op."""

    def __init__(self, t: QuantTensor, dynamic: bool):
        super().__init__()
        out, self.in_features = t.shape
        self.out_features, self.group, self.bits, self.dynamic = out, t.group, t.bits, dynamic
        self.register_buffer("codes", t.signed_codes().contiguous())  # (out, in) int8
        per_channel = t.group == self.in_features
        scale = t.scale.float().reshape(out) if per_channel else t.scale.float()  # (out,) or (out, groups)
        self.register_buffer("scale", scale.contiguous())
        self.register_buffer("zero", torch.zeros(scale.shape, dtype=torch.int8))  # XNNPACK's kernels: zero only

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (batch, seq, in)
        if self.dynamic:  # int8 per token, asymmetric: XNNPACK quantizes the input inside the fully-connected op
            scale, zero = _Q.choose_qparams_per_token_asymmetric(x, torch.int8)
            q = _Q.quantize_per_token(x, scale, zero, -128, 127, torch.int8)
            x = _Q.dequantize_per_token(q, scale, zero, -128, 127, torch.int8, x.dtype)
        low, high = -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        if self.scale.dim() == 1:
            w = _Q.dequantize_per_channel(self.codes, self.scale, self.zero, 0, low, high, torch.int8)
        else:
            w = _Q.dequantize_per_channel_group(self.codes, self.scale, self.zero, low, high, torch.int8, self.group,
                                                torch.float32)
        return F.linear(x, w)  # (batch, seq, out)


class OffsetLinear(nn.Module):
    """A symmetric quantized linear plus the exact per-group offset term of asymmetric codes."""

    def __init__(self, linear: nn.Module, residual: torch.Tensor, ones: nn.Parameter):
        super().__init__()
        self.linear, self.group = linear, ones.shape[1]
        # The offset term is a small linear from the group sums: weight (out, groups) = the residual offsets.
        self.offset = nn.Linear(residual.shape[1], residual.shape[0], bias=False)
        with torch.no_grad():
            self.offset.weight.copy_(residual.float())
        self.offset.weight.requires_grad_(False)
        # Group sums as a (1, group) row of ones applied to the input viewed as (-1, group): 128 bytes of weight.
        # A (groups, in) 0/1 matrix computed the same sums but read 295 KB per down_proj per token (measured:
        # 13 us of the layer's ~300 us on SmolLM2). One row shared by every linear: linears that read the same
        # input (q/k/v, gate/up) then compute identical sums, which the exporter merges (CSE) into one.
        self.ones = ones

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (batch, seq, in)
        sums = F.linear(x.reshape(-1, self.group), self.ones).view(x.shape[0], -1, self.offset.in_features)
        return self.linear(x) + self.offset(sums)  # (batch, seq, out)


def check_codes(qw: QuantizedWeights) -> None:
    """What XNNPACK cannot hold, said before the slow export."""
    acts = qw.export_config().activations
    four = sorted(n for n, t in qw.tensors.items() if t.bits == 4)
    if four and acts is not Activations.INT8_DYNAMIC:
        raise ExportError(f"{len(four)} linears have 4-bit codes ({four[0]}, ...) but the quantize stage set "
                          f"activations: {acts.value}; XNNPACK runs int4 weights only with int8 dynamic activations "
                          f"(8da4w): set activations: int8_dynamic in the stage")


def fuse_qkv_codes(qw: QuantizedWeights, num_layers: int) -> QuantizedWeights | None:
    """The stage's q/k/v codes stacked into each layer's fused projection (rows q, k, v, as exporters/llama.py
    stacks the weights; per-row groups, scales and offsets unchanged, so stacking is exact). None when a layer's
    three differ in bits or group (mixed precision): the exporter then keeps them apart."""
    tensors = dict(qw.tensors)
    for fused, parts in fused_qkv_names(num_layers).items():
        found = [tensors.get(p) for p in parts]
        if any(t is None for t in found) or len({(t.bits, t.group) for t in found}) != 1:
            return None
        for p in parts:
            del tensors[p]
        tensors[fused] = QuantTensor(torch.cat([t.codes for t in found]), torch.cat([t.scale for t in found]),
                                     torch.cat([t.offset for t in found]), found[0].bits, found[0].group)
    return QuantizedWeights(tensors, qw.config, qw.promoted_to_8bit)


def apply_codes(module: nn.Module, qw: QuantizedWeights, tied: bool) -> dict[str, Any]:
    """Quantize `module` in place with the stage's codes; returns coverage notes, counted in the source model's
    linears (a fused q/k/v projection counts as the three it stacks)."""
    acts = qw.export_config().activations
    linears = {name for name, m in module.named_modules() if isinstance(m, nn.Linear)}

    def sources(name: str) -> int:
        return 3 if name.endswith(".qkv_proj") else 1

    unknown = sorted(set(qw.tensors) - linears)
    if unknown:
        raise ExportError(f"the quantize stage's codes name linears the export module lacks: {unknown[:3]}")
    tensors, requantized = dict(qw.tensors), {}
    for name, t in qw.tensors.items():
        width = t.shape[1]
        if t.bits == 8 and t.group != width:
            # XNNPACK's int8 linears take one scale per row ("Only 4b group quantization is supported"), so 8-bit
            # per-group codes (a GGUF's Q8_0 lm_head) are re-rounded per channel here, and the manifest says so.
            tensors[name] = per_channel_int8(t)
            requantized[name] = f"8-bit group {t.group} -> per channel (XNNPACK's int8 kernels are per channel)"
    with torch.no_grad():
        corrected, rows = [], {}
        for name, t in tensors.items():
            parent_name, _, child = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            layer: nn.Module = CodesLinear(t, dynamic=acts is Activations.INT8_DYNAMIC)
            if not t.symmetric:
                ones = rows.setdefault(t.group, nn.Parameter(torch.ones(1, t.group), requires_grad=False))
                layer = OffsetLinear(layer, t.residual_offset(), ones)
                corrected.append(name)
            setattr(parent, child, layer)
        offsets = _quantize_offsets(module, acts)
        embedding = _embedding_from_lm_head(module, tensors.get("lm_head"), qw.export_config(), tied)
    return {"linears_total": sum(map(sources, linears)), "linears_quantized": sum(map(sources, tensors)),
            "linears_with_offset_correction": sum(map(sources, corrected)),
            "offset_terms": offsets if corrected else "none",
            "embedding": embedding, "requantized": requantized,
            "bits_histogram": {str(b): sum(sources(n) for n, t in qw.tensors.items() if t.bits == b)
                               for b in sorted({t.bits for t in qw.tensors.values()})}}


def per_channel_int8(t: QuantTensor, block_elements: int = ROW_BLOCK_ELEMENTS) -> QuantTensor:
    """`t` rounded again to 8 bits per output channel, row block by row block: a 128k-vocabulary lm_head's
    dequantized matrix is 1 GB of fp32 at Llama 3.2 1B's shape, and each row's channel depends on that row only,
    so the blocks give the same codes as the whole matrix."""
    parts = [rtn(t.rows(a, b).dequantize(), 8, t.shape[1], symmetric=True) for a, b in row_blocks(*t.shape, block_elements)]
    return QuantTensor(torch.cat([q.codes for q in parts]), torch.cat([q.scale for q in parts]),
                       torch.cat([q.offset for q in parts]), 8, t.shape[1])


def _quantize_offsets(module: nn.Module, acts: Activations) -> str:
    """With int8 dynamic activations, the offset terms run as int8 linears too (per-channel weights, the group sums
    quantized per token like every other activation): their fp32 weights were 13.3 MB of SmolLM2's 138 MB, read
    on every token, and int8 holds them in 3.3 MB. Measured on SmolLM2 (harness, eager, 8 x 256 tokens): mean KL
    0.0240 with fp32 offset terms, 0.0247 with int8. With fp32 activations they stay fp32 (exact)."""
    if acts is not Activations.INT8_DYNAMIC:
        return "fp32"
    for m in module.modules():
        if isinstance(m, OffsetLinear):
            weight = m.offset.weight.detach()  # (out, groups)
            m.offset = CodesLinear(rtn(weight, 8, weight.shape[1], symmetric=True), dynamic=True)
    return "int8 per channel, int8 dynamic activations"


def _embedding_from_lm_head(module: nn.Module, head: QuantTensor | None, scheme: Any, tied: bool) -> str:
    """The tied embedding gathers rows of the codes the lm_head runs with (integer zero points), or stays fp32.
    Byte for byte the same int8 matrix as the lm_head's, which lets the exporter store it once (external data)."""
    from torchao.quantization import IntxUnpackedToInt8Tensor

    if not tied or head is None or scheme.embedding is not scheme.lm_head:
        return "fp32"
    zero = head.integer_zero_points()
    if zero is None:
        raise ExportError("the tied embedding reads the lm_head's codes, whose offsets are not integer zero points "
                          "(ExecuTorch's quantized embedding needs them); quantize the lm_head with 'rtn' or keep_gguf")
    # torchao's own tensor for a quantized embedding, made from the codes directly: what `quantize_` with
    # IntxWeightOnlyConfig makes, with its qdata / scale / zero point then overwritten by the codes, but without
    # its quantizer's temporaries over the fp32 matrix (several fp32 copies of a 1 GB embedding at 1B).
    embedding = module.embed_tokens
    if tuple(embedding.weight.shape) != head.shape:
        raise ExportError(f"the tied embedding {tuple(embedding.weight.shape)} is not the lm_head's {head.shape}")
    weight = IntxUnpackedToInt8Tensor(
        qdata=head.signed_codes(), scale=head.scale.to(embedding.weight.dtype),
        zero_point=(zero.to(torch.int16) - head.midpoint).to(torch.int8),
        target_dtype=torch.int4 if head.bits == 4 else torch.int8, block_size=(1, head.group),
        dtype=embedding.weight.dtype, activation_quantization=None)
    embedding.weight = nn.Parameter(weight, requires_grad=False)  # the fp32 matrix goes
    group = "per row" if head.group == head.shape[1] else f"group {head.group}"
    return f"int{head.bits} {group}, the lm_head's codes"
