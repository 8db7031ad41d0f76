"""Typed configs for each stage kind, as written in targets.yaml.

The stage implementations live beside this file (one technique family per file) and are registered in
`compress.stages.STAGES`; these configs are light (no torch) so targets.yaml validates instantly.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from compress.config import check_fields, setting
from compress.errors import Problem


class StageKind(enum.Enum):
    PRUNE = "prune"
    DISTILL = "distill"
    QUANTIZE = "quantize"


class Activations(enum.Enum):
    NONE = "none"
    INT8_DYNAMIC = "int8_dynamic"


class Precision(enum.Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"
    INT4 = "int4"


BITS_OF = {Precision.FP32: None, Precision.FP16: None, Precision.INT8: 8, Precision.INT4: 4}  # None: not quantized


class QuantAlgorithm(enum.Enum):
    RTN = "rtn"
    HQQ = "hqq"
    AWQ = "awq"
    GPTQ = "gptq"
    SCALE_ESTIMATION = "scale_estimation"
    KEEP_GGUF = "keep_gguf"  # keep the source GGUF's codes where the format represents them exactly


class WeightFormat(enum.Enum):
    AFFINE = "affine"  # integer codes times a scale (and zero point), per output channel or per block of group_size
    PALETTIZED = "palettized"  # codes index a k-means look-up table shared by group_size output channels


@dataclass(frozen=True)
class LayerOverride:
    """Per-layer precision by glob pattern on the module name; the first matching override wins."""

    pattern: str
    weight_bits: int = setting(8, choices=(4, 8, 16))
    group_size: int | None = setting(None, ge=8)

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class QuantizeConfig:
    weight_bits: int = setting(4, choices=(4, 8))
    group_size: int | None = setting(32, ge=8, le=4096, doc="None: one scale per output channel")
    symmetric: bool = True
    activations: Activations = Activations.NONE
    embedding: Precision = Precision.FP32
    lm_head: Precision = Precision.FP32
    algorithm: QuantAlgorithm = QuantAlgorithm.RTN
    overrides: tuple[LayerOverride, ...] = ()
    weight_format: WeightFormat = setting(WeightFormat.AFFINE, doc="palettized: group_size counts output channels "
                                                                   "per look-up table (null: one per tensor)")
    # The quantize stage only (exporters' own quantizers refuse them): sensitivity-driven mixed precision keeps
    # the linears whose quantization costs the most KL at 8 bits until the stage's measured KL is <= max_kl,
    # within max_avg_bits average code bits per linear weight (lm_head and embedding excluded).
    max_kl: float | None = setting(None, gt=0, doc="mixed precision: KL the stage must reach on calibration text")
    max_avg_bits: float = setting(4.5, ge=2, le=8, doc="mixed precision: average code bits per linear weight")
    calibration_windows: int = setting(4, ge=1, le=4096, doc="calibration windows the stage measures KL on")
    calibration_len: int = setting(256, ge=16, le=32768)

    def __post_init__(self) -> None:
        extra = []
        if self.group_size is not None and self.group_size & (self.group_size - 1):
            extra.append(Problem("group_size", f"{self.group_size} is not a power of two (e.g. 32, 64, 128)"))
        check_fields(self, extra)


class Importance(enum.Enum):
    ACTIVATION = "activation"  # Minitron-style activation norms on calibration text


@dataclass(frozen=True)
class PruneConfig:
    mlp_keep: float = setting(1.0, gt=0, le=1, doc="fraction of MLP units kept")
    heads_keep: float = setting(1.0, gt=0, le=1, doc="fraction of KV groups kept (GQA-aware)")
    drop_layers: int = setting(0, ge=0, le=1000)
    importance: Importance = Importance.ACTIVATION
    calibration_samples: int = setting(64, ge=1, le=100000)

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class DistillConfig:
    tokens: int = setting(200_000, ge=1, doc="token budget")
    max_minutes: float | None = setting(None, gt=0, doc="time budget; stops at whichever comes first")
    temperature: float = setting(1.0, gt=0, le=100)
    hidden_loss_weight: float = setting(0.0, ge=0)
    learning_rate: float = setting(1e-4, gt=0, lt=1)
    batch_size: int = setting(4, ge=1, le=4096)
    seq_len: int = setting(256, ge=8, le=32768)

    def __post_init__(self) -> None:
        check_fields(self)


STAGE_CONFIGS: dict[StageKind, type] = {
    StageKind.PRUNE: PruneConfig,
    StageKind.DISTILL: DistillConfig,
    StageKind.QUANTIZE: QuantizeConfig,
}
