"""Lower the quantize stage's codes into the export module for ExecuTorch/XNNPACK, exactly, without re-rounding.

torchao lays out each linear as its XNNPACK-lowerable tensor (IntxUnpackedToInt8Tensor: int8 qdata, per-group
scale, zero point), configured with the codes' own bits and group, and then the stage's codes are written into it.
XNNPACK's dynamically quantized linears take symmetric weights only (zero point 0). Codes with a per-group offset
(asymmetric round to nearest, a GGUF's Q4_1, HQQ's float zero points) are therefore lowered as signed codes plus an
exact correction: y = linear(x) + sums(x) @ R.T, where sums(x) adds up each group of inputs and R (out, groups)
holds the residual offsets. Both are small linears that XNNPACK runs (the sums as an fp32 row of ones over the
input viewed in groups; R in int8 per channel when the activations are int8 dynamic, fp32 otherwise). The tied
embedding gathers the codes the lm_head runs with through ExecuTorch's quantized embedding kernel (integer zero
points): the same bytes, which the exporter's external data stores once.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from compress.errors import ExportError
from compress.stages.configs import Activations
from compress.stages.qtensor import QuantizedWeights, QuantTensor


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


def apply_codes(module: nn.Module, qw: QuantizedWeights, tied: bool) -> dict[str, Any]:
    """Quantize `module` in place with the stage's codes; returns coverage notes."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_primitives import MappingType

    acts = qw.export_config().activations
    schemes: dict[tuple[int, int], set[str]] = {}
    linears = {name for name, m in module.named_modules() if isinstance(m, nn.Linear)}
    unknown = sorted(set(qw.tensors) - linears)
    if unknown:
        raise ExportError(f"the quantize stage's codes name linears the export module lacks: {unknown[:3]}")
    tensors, requantized = dict(qw.tensors), {}
    for name, t in qw.tensors.items():
        width = t.shape[1]
        if t.bits == 8 and t.group != width:
            # XNNPACK's int8 linears take one scale per row ("Only 4b group quantization is supported"), so 8-bit
            # per-group codes (a GGUF's Q8_0 lm_head) are re-rounded per channel here, and the manifest says so.
            from compress.stages.quant_algorithms import rtn

            tensors[name] = rtn(t.dequantize(), 8, width, symmetric=True)
            requantized[name] = f"8-bit group {t.group} -> per channel (XNNPACK's int8 kernels are per channel)"
    for name, t in tensors.items():
        schemes.setdefault((t.bits, t.group), set()).add(name)
    with torch.no_grad():
        for (bits, group), names in sorted(schemes.items()):
            width = module.get_submodule(next(iter(names))).in_features
            granularity = PerAxis(0) if group == width else PerGroup(group)
            dtype = torch.int4 if bits == 4 else torch.int8
            if acts is Activations.INT8_DYNAMIC:
                config = Int8DynamicActivationIntxWeightConfig(weight_dtype=dtype, weight_granularity=granularity,
                                                               weight_mapping_type=MappingType.SYMMETRIC)
            else:
                config = IntxWeightOnlyConfig(weight_dtype=dtype, granularity=granularity,
                                              mapping_type=MappingType.SYMMETRIC)
            quantize_(module, config, filter_fn=lambda m, fqn, names=names: isinstance(m, nn.Linear) and fqn in names)
        corrected, rows = [], {}
        for name, t in tensors.items():
            _write(module.get_submodule(name).weight, t, zero=None)
            if not t.symmetric:
                parent_name, _, child = name.rpartition(".")
                parent = module.get_submodule(parent_name) if parent_name else module
                ones = rows.setdefault(t.group, nn.Parameter(torch.ones(1, t.group), requires_grad=False))
                setattr(parent, child, OffsetLinear(getattr(parent, child), t.residual_offset(), ones))
                corrected.append(name)
        offsets = _quantize_offsets(module, acts)
        embedding = _embedding_from_lm_head(module, tensors.get("lm_head"), qw.export_config(), tied)
    return {"linears_total": len(linears), "linears_quantized": len(tensors),
            "linears_with_offset_correction": len(corrected), "offset_terms": offsets if corrected else "none",
            "embedding": embedding, "requantized": requantized,
            "bits_histogram": {str(b): sum(1 for t in qw.tensors.values() if t.bits == b)
                               for b in sorted({t.bits for t in qw.tensors.values()})}}


def _quantize_offsets(module: nn.Module, acts: Activations) -> str:
    """With int8 dynamic activations, the offset terms run as int8 linears too (per-channel weights, the group sums
    quantized per token like every other activation): their fp32 weights were 13.3 MB of SmolLM2's 138 MB, read
    on every token, and int8 holds them in 3.3 MB. Measured on SmolLM2 (harness, eager torchao, 8 x 256 tokens):
    mean KL 0.0240 with fp32 offset terms, 0.0247 with int8. With fp32 activations they stay fp32 (exact)."""
    if acts is not Activations.INT8_DYNAMIC:
        return "fp32"
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerAxis
    from torchao.quantization.quant_primitives import MappingType

    offsets = {name + ".offset" for name, m in module.named_modules() if isinstance(m, OffsetLinear)}
    quantize_(module, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0),
                                                            weight_mapping_type=MappingType.SYMMETRIC),
              filter_fn=lambda m, fqn: fqn in offsets)
    return "int8 per channel, int8 dynamic activations"


def _write(weight: Any, t: QuantTensor, zero: torch.Tensor | None) -> None:
    """Overwrite torchao's tensor with the codes: qdata = signed codes, zero point 0 unless given (signed)."""
    if tuple(weight.qdata.shape) != t.shape or tuple(weight.scale.shape) != tuple(t.scale.shape):
        raise ExportError(f"torchao laid out {tuple(weight.qdata.shape)} / scales {tuple(weight.scale.shape)} for "
                          f"codes {t.shape} / {tuple(t.scale.shape)}")
    weight.qdata.copy_(t.signed_codes())
    weight.scale.copy_(t.scale.to(weight.scale.dtype))
    weight.zero_point.copy_(torch.zeros_like(weight.zero_point) if zero is None else zero.to(weight.zero_point.dtype))


def _embedding_from_lm_head(module: nn.Module, head: QuantTensor | None, scheme: Any, tied: bool) -> str:
    """The tied embedding gathers rows of the codes the lm_head runs with (integer zero points), or stays fp32.
    Byte for byte the same int8 matrix as the lm_head's, which lets the exporter store it once (external data)."""
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    if not tied or head is None or scheme.embedding is not scheme.lm_head:
        return "fp32"
    zero = head.integer_zero_points()
    if zero is None:
        raise ExportError("the tied embedding reads the lm_head's codes, whose offsets are not integer zero points "
                          "(ExecuTorch's quantized embedding needs them); quantize the lm_head with 'rtn' or keep_gguf")
    dtype = torch.int4 if head.bits == 4 else torch.int8
    quantize_(module, IntxWeightOnlyConfig(weight_dtype=dtype, granularity=PerGroup(head.group)),
              filter_fn=lambda m, fqn: isinstance(m, nn.Embedding))
    _write(module.embed_tokens.weight, head, zero=zero.to(torch.int16) - head.midpoint)
    group = "per row" if head.group == head.shape[1] else f"group {head.group}"
    return f"int{head.bits} {group}, the lm_head's codes"
