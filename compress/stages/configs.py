"""Typed configs for each stage kind, as written in targets.yaml (the quantize stage's, QuantizeConfig, is the
quantization vocabulary every exporter reads too, so it lives with the quantized-weights contract).

The stage implementations live beside this file (one technique family per file) and are registered in
`compress.stages.STAGES`; these configs are light (no torch) so targets.yaml validates instantly.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from compress.config import check_fields, setting
from compress.errors import Problem
from compress.quantized import QuantizeConfig


class StageKind(enum.StrEnum):
    PRUNE = "prune"
    DISTILL = "distill"
    QUANTIZE = "quantize"


class Importance(enum.StrEnum):
    ACTIVATION = "activation"  # Minitron-style activation norms on calibration text
    OBS = "obs"  # MLP units by the output error their removal leaves after the refit (structured OBS); heads as above


@dataclass(frozen=True)
class PruneConfig:
    """How much to remove. Widths are uniform across layers (an ordinary Llama config has one width)."""

    mlp_keep: float = setting(1.0, gt=0, le=1, doc="fraction of MLP units kept (to the nearest multiple_of)")
    heads_keep: float = setting(1.0, gt=0, le=1, doc="fraction of KV groups kept (GQA-aware: whole groups)")
    query_heads_keep: float = setting(1.0, gt=0, le=1, doc="fraction of query heads kept inside each KV group")
    drop_layers: int = setting(0, ge=0, le=1000)
    # how MLP units are chosen: obs (the least-squares error their removal leaves) or activation (mean contribution)
    importance: Importance = Importance.OBS
    calibration_samples: int = setting(64, ge=1, le=100000)
    calibration_len: int = setting(256, ge=8, le=32768)
    kl_windows: int = setting(4, ge=0, le=1000, doc="held-out calibration windows for the KL right after pruning")
    multiple_of: int = setting(32, ge=1, le=4096, doc="kept MLP width is a multiple of this (int4 group size)")
    protect_ratio: float = setting(20.0, ge=1, doc="keep any MLP unit whose peak contribution exceeds this "
                                                   "multiple of its layer's median peak (massive activations)")
    reconstruct: bool = setting(True, doc="refit each layer's down_proj (and o_proj when heads go) by least "
                                          "squares on the calibration text, so the kept units stand in for the "
                                          "removed ones")

    def __post_init__(self) -> None:
        extra = []
        if self.mlp_keep == 1 and self.heads_keep == 1 and self.query_heads_keep == 1 and self.drop_layers == 0:
            extra.append(Problem("", "removes nothing: set mlp_keep, heads_keep or query_heads_keep below 1, "
                                     "or drop_layers above 0"))
        if self.importance == Importance.OBS and not self.reconstruct:
            extra.append(Problem("importance", "obs chooses units by the error left after the refit: it needs "
                                               "reconstruct: true"))
        check_fields(self, extra)


@dataclass(frozen=True)
class FakeQuant:
    """Straight-through fake quantization of the decoder's linear weights while distilling (QAT)."""

    weight_bits: int = setting(4, choices=(4, 8))
    group_size: int = setting(32, ge=8, le=4096)
    symmetric: bool = True

    def __post_init__(self) -> None:
        extra = []
        if self.group_size & (self.group_size - 1):
            extra.append(Problem("group_size", f"{self.group_size} is not a power of two (e.g. 32, 64, 128)"))
        check_fields(self, extra)


@dataclass(frozen=True)
class DistillConfig:
    tokens: int = setting(200_000, ge=1, doc="token budget (student tokens trained on, all ranks together)")
    max_minutes: float | None = setting(None, gt=0, doc="time budget; stops at whichever comes first")
    temperature: float = setting(1.0, gt=0, le=100)
    hidden_loss_weight: float = setting(0.0, ge=0, doc="weight of the final hidden-state loss (same widths only)")
    learning_rate: float = setting(1e-4, gt=0, lt=1)
    warmup_steps: int = setting(10, ge=0, le=100000)
    batch_size: int = setting(4, ge=1, le=4096, doc="global batch: split across data-parallel ranks")
    seq_len: int = setting(256, ge=8, le=32768)
    checkpoint_every: int = setting(25, ge=1, le=1_000_000, doc="steps between resumable checkpoints")
    kl_windows: int = setting(4, ge=0, le=1000, doc="held-out calibration windows for KL before/after")
    generated_windows: int = setting(32, ge=0, le=100000, doc="teacher-generated windows when the corpus is "
                                                               "too small for one batch (0: refuse instead)")
    threads: int | None = setting(None, ge=1, le=256, doc="torch threads (default: all cores)")
    autocast: bool = setting(False, doc="bf16 autocast for both forward passes (AMX / AVX512-BF16 CPUs, GPUs)")
    fake_quant: FakeQuant | None = setting(None, doc="quantization-aware training (straight-through)")
    skip_below_kl: float | None = setting(None, gt=0, doc="do not train when the held-out KL is already at or "
                                                          "below this (e.g. codes that were already on a grid)")

    def __post_init__(self) -> None:
        extra = []
        if self.skip_below_kl is not None and not self.kl_windows:
            extra.append(Problem("skip_below_kl", "needs held-out windows to measure the KL on; set kl_windows > 0"))
        if self.tokens < self.batch_size * self.seq_len:
            extra.append(Problem("tokens", f"{self.tokens} is less than one batch (batch_size {self.batch_size} x "
                                           f"seq_len {self.seq_len} = {self.batch_size * self.seq_len} tokens): "
                                           f"zero training steps"))
        check_fields(self, extra)

    @property
    def steps(self) -> int:
        return self.tokens // (self.batch_size * self.seq_len)


STAGE_CONFIGS: dict[StageKind, type] = {
    StageKind.PRUNE: PruneConfig,
    StageKind.DISTILL: DistillConfig,
    StageKind.QUANTIZE: QuantizeConfig,
}
