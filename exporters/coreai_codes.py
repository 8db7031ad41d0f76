"""Put the quantize stage's codes into the export module as Core AI's compressed weights.

Core AI holds a quantized weight as `constexpr_blockwise_shift_scale` over sub-byte data. Its "minval" form
computes w = scale * (q - q_min) + minval per block, and with unsigned codes (q_min = 0) that is the stage's own
form, w = codes * scale + offset (compress.quantized.QuantTensor): codes, scales and offsets go in as they are,
nothing is re-rounded. coreai-torch narrows the uint8 codes to uint4 when the op names `input_dtype=uint4`.
Scales and offsets take the asset's compute precision: fp32 holds them exactly; in an fp16 asset the scales are
still exact (the stage writes fp16 scales) and each offset is rounded to fp16, which the notes count.

The route is the one coreai-opt's own export takes (coreai-torch's `WeightDequantizeModule`, whose forward is the
`coreai::constexpr_blockwise_shift_scale` custom op that the converter lowers): coreai-opt quantizes with its own
algorithms, while the codes here are the stage's, so they are placed directly instead of through coreai-opt.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compress.quantized import QuantizedWeights, QuantTensor


def _dequantizer(t: QuantTensor, dtype: torch.dtype) -> nn.Module:
    # coreai-torch's private module path: the one coreai-opt imports for this (coreai_opt/_utils/import_utils.py).
    from coreai_torch._compression.custom_layers import WeightDequantizeModule

    code_dtype = {4: torch.uint4, 8: torch.uint8}[t.bits]
    # scale / minval: one per block of `group` columns, same rank as the codes (the op's blockwise layout).
    return WeightDequantizeModule(t.codes.to(torch.uint8).contiguous(), t.scale.to(dtype).contiguous(),
                                  minval=t.offset.to(dtype).contiguous(), input_dtype=code_dtype,
                                  output_dtype=dtype)


class CodesLinear(nn.Module):
    """A bias-free linear whose weight is Core AI's dequantization of the stage's codes (a constant at load)."""

    def __init__(self, weight: nn.Module):
        super().__init__()
        self.weight_codes = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_codes())


class CodesEmbedding(nn.Module):
    """The tied embedding gathering rows of the lm_head's own compressed matrix (one stored copy)."""

    def __init__(self, weight: nn.Module):
        super().__init__()
        self.weight_codes = weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.weight_codes())


def place_codes(module: nn.Module, qw: QuantizedWeights, tied: bool, dtype: torch.dtype) -> dict[str, Any]:
    """Swap every linear the stage quantized for a CodesLinear over its codes (in place); returns the notes.

    A name the module does not have is an error (a silent partial lowering is what the coverage rule forbids).
    """
    linears = {name for name, m in module.named_modules() if isinstance(m, nn.Linear) and name.endswith(
        ("_proj", "lm_head"))}
    unknown = sorted(set(qw.tensors) - linears)
    if unknown:
        raise ValueError(f"the quantize stage has codes for {unknown[:3]}, which the export module does not have")
    made: dict[str, nn.Module] = {}
    rounded_offsets = 0
    for name, t in qw.tensors.items():
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        made[name] = _dequantizer(t, dtype)
        setattr(parent, child, CodesLinear(made[name]))
        if dtype != torch.float32:
            rounded_offsets += int(torch.count_nonzero(t.offset.to(dtype).float() != t.offset))
    q = qw.export_config()
    embedding = "fp32" if dtype == torch.float32 else "fp16"
    if tied and "lm_head" in made and q.embedding is q.lm_head:
        module.embed_tokens = CodesEmbedding(made["lm_head"])  # the same module: one constant in the asset
        embedding = f"int{qw.tensors['lm_head'].bits}, the lm_head's codes (one shared copy)"
    bits = sorted({t.bits for t in qw.tensors.values()})
    return {"linears_total": len(linears), "linears_quantized": len(made),
            "linears_float_by_request": sorted(linears - set(made)), "embedding": embedding,
            "bits_histogram": {str(b): sum(t.bits == b for t in qw.tensors.values()) for b in bits},
            "offsets_rounded_to_fp16": rounded_offsets,
            "form": "constexpr_blockwise_shift_scale (minval): w = codes * scale + offset, as the stage wrote them"}
