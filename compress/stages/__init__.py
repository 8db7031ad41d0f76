"""Pipeline stages: `run(model, config, ctx) -> StageResult`. One technique family per file.

A stage is pure: it returns a new or changed model plus notes (what it measured, what it skipped and
why) and touches no global state. Built-in stages are registered explicitly in `STAGES`; a target that
names a stage kind without an implementation is refused before any work starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from compress.registry import Registry


@dataclass
class StageContext:
    seed: int
    work_dir: Path
    calibration: Any  # compress.data.corpus.TokenWindows: disjoint from the evaluation windows
    reference: Any  # the unmodified fp32 model (the teacher / the KL reference)
    console: Any  # compress.progress.Console


@dataclass
class StageResult:
    model: Any
    notes: dict[str, Any] = field(default_factory=dict)


class Stage(Protocol):
    version: str  # part of the cache key: bump it when the stage's output for a given input changes

    def run(self, model: Any, config: Any, ctx: StageContext) -> StageResult: ...


STAGES: Registry[Stage] = Registry("stage")


def _register_builtins() -> None:
    # Imported here, after StageResult exists: the stage modules import it from this package.
    from compress.stages.distill import DistillStage
    from compress.stages.prune import PruneStage
    from compress.stages.quantize import QuantizeStage

    STAGES.register("prune", PruneStage())
    STAGES.register("distill", DistillStage())
    STAGES.register("quantize", QuantizeStage())


_register_builtins()
