"""torchao quantization of the export module, planned first so coverage is checked before slow work.

The plan decides, per nn.Linear, the weight bits and group size (first matching override wins; the
lm_head follows `lm_head`; 16 bits means keep fp32), and records every linear that cannot be
quantized as asked (e.g. its width is not a multiple of the group size). A skipped linear fails the
export unless the target allows it. The embedding is quantized weight-only (int8 per row or int4
per group): ExecuTorch fuses the dequantize + gather into its quantized embedding kernels.
The tied embedding / lm_head pair is quantized as two deliberate copies: the embedding for the gather,
the lm_head for the matmul.
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass
from typing import Any

from compress.errors import ExportError
from compress.stages.configs import BITS_OF as BITS
from compress.stages.configs import Activations, QuantAlgorithm, QuantizeConfig


@dataclass(frozen=True)
class LinearPlan:
    name: str
    in_features: int
    bits: int | None  # None: stays fp32 by request
    group_size: int | None  # None: one scale per output channel
    skipped: str = ""  # why it could not be quantized as asked

    @property
    def quantized(self) -> bool:
        return self.bits is not None and not self.skipped


def plan_linears(module: Any, q: QuantizeConfig) -> list[LinearPlan]:
    from torch import nn

    plans = []
    for name, mod in module.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        if name == "lm_head":
            bits = BITS[q.lm_head]
            group = q.group_size if bits == 4 else None
        else:
            override = next((o for o in q.overrides if fnmatch.fnmatchcase(name, o.pattern)), None)
            bits = q.weight_bits if override is None else (None if override.weight_bits == 16 else override.weight_bits)
            group = q.group_size if override is None else override.group_size
        skipped = ""
        if bits is not None and group is not None and mod.in_features % group:
            skipped = f"in_features {mod.in_features} is not a multiple of group_size {group}"
        plans.append(LinearPlan(name, mod.in_features, bits, group, skipped))
    return plans


def check_plan(plans: list[LinearPlan], allow_skips: bool) -> None:
    skipped = [p for p in plans if p.skipped]
    if skipped and not allow_skips:
        first = skipped[0]
        raise ExportError(f"{len(skipped)} of {len(plans)} linears cannot be quantized as configured ({first.name}: "
                          f"{first.skipped}); choose a group_size that divides every width, add an override, or set "
                          f"export.allow_unquantized_linears: true")


def coverage(plans: list[LinearPlan]) -> dict[str, Any]:
    return {
        "linears_total": len(plans),
        "linears_quantized": sum(p.quantized for p in plans),
        "linears_fp32_by_request": sum(p.bits is None for p in plans),
        "linears_skipped": [asdict(p) for p in plans if p.skipped],
    }


def apply_plan(module: Any, plans: list[LinearPlan], q: QuantizeConfig) -> None:
    """Quantize `module` in place with torchao, one quantize_ call per distinct (bits, group) scheme."""
    import torch
    from torch import nn
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_primitives import MappingType

    mapping = MappingType.SYMMETRIC if q.symmetric else MappingType.ASYMMETRIC
    algorithm = "hqq_scale_only" if q.algorithm is QuantAlgorithm.HQQ else "affine"
    schemes: dict[tuple[int, int | None], set[str]] = {}
    for p in plans:
        if p.quantized:
            schemes.setdefault((p.bits, p.group_size), set()).add(p.name)
    with torch.no_grad():
        for (bits, group), names in sorted(schemes.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
            granularity = PerGroup(group) if group else PerAxis(0)
            dtype = torch.int4 if bits == 4 else torch.int8
            if q.activations is Activations.INT8_DYNAMIC:
                config = Int8DynamicActivationIntxWeightConfig(weight_dtype=dtype, weight_granularity=granularity,
                                                               weight_mapping_type=mapping,
                                                               intx_choose_qparams_algorithm=algorithm)
            else:
                config = IntxWeightOnlyConfig(weight_dtype=dtype, granularity=granularity, mapping_type=mapping,
                                              intx_choose_qparams_algorithm=algorithm)
            quantize_(module, config, filter_fn=lambda m, fqn, names=names: isinstance(m, nn.Linear) and fqn in names)
        bits = BITS[q.embedding]
        if bits is not None:
            granularity = PerGroup(q.group_size or 32) if bits == 4 else PerAxis(0)
            config = IntxWeightOnlyConfig(weight_dtype=torch.int4 if bits == 4 else torch.int8, granularity=granularity,
                                          intx_choose_qparams_algorithm=algorithm)
            quantize_(module, config, filter_fn=lambda m, fqn: isinstance(m, nn.Embedding))
