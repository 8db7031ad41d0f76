"""Pipeline stages: `run(model, config, ctx) -> StageResult`. One technique family per file.

A stage is pure: it returns a new or changed model plus notes (what it measured, what it skipped and
why) and touches no global state. Built-in stages are registered explicitly in `STAGES`; a target that
names a stage kind without an implementation is refused before any work starts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from compress.quantized import QuantizedWeights
from compress.registry import Registry


@dataclass
class StageContext:
    seed: int
    work_dir: Path
    calibration: Any  # compress.data.corpus.TokenWindows: disjoint from the evaluation windows
    reference: Any  # the unmodified fp32 model (the teacher / the KL reference)
    console: Any  # compress.progress.Console
    quantized: QuantizedWeights | None = None  # the input model's codes, when a quantize stage ran before
    # The input model is the stage's own: nothing reads it after the stage returns (an earlier stage's output, saved
    # in the cache already, or the reference when no later stage needs it: the build reads the reference again to
    # verify), so the stage may change it in place rather than copy it. When the input model is `reference` itself,
    # the stage reads whatever it needs from the reference before changing it.
    owns_model: bool = False
    # For an owned input model: writes its float weights back into it, in place and bitwise (read again from the
    # checkpoint it came from), so a stage may overwrite them and still have them when it needs them again; None
    # where they cannot be read again (the stage then keeps a copy).
    restore_floats: Callable[[Any], None] | None = None


@dataclass
class StageResult:
    model: Any
    notes: dict[str, Any] = field(default_factory=dict)
    quantized: QuantizedWeights | None = None  # the quantize stage's codes, which every exporter lowers


class Stage(Protocol):
    version: str  # part of the cache key: bump it when the stage's output for a given input changes

    def run(self, model: Any, config: Any, ctx: StageContext) -> StageResult: ...


STAGES: Registry[Stage] = Registry("stage")


class _BuiltinStage:
    """A built-in stage whose module is imported on first use: the stage modules import torch, and reading
    targets.yaml (which imports this package for the configs) must stay instant."""

    def __init__(self, module: str, cls: str):
        self._where, self._stage = (module, cls), None

    def _load(self) -> Stage:
        if self._stage is None:
            import importlib

            module, cls = self._where
            self._stage = getattr(importlib.import_module(module), cls)()
        return self._stage

    @property
    def version(self) -> str:
        return self._load().version

    def run(self, model: Any, config: Any, ctx: StageContext) -> StageResult:
        return self._load().run(model, config, ctx)


STAGES.register("prune", _BuiltinStage("compress.stages.prune", "PruneStage"))
STAGES.register("distill", _BuiltinStage("compress.stages.distill", "DistillStage"))
STAGES.register("quantize", _BuiltinStage("compress.stages.quantize", "QuantizeStage"))
