"""The Exporter protocol and the atomic-directory helper every exporter writes through.

`export(model, tokenizer, options, out_dir, console) -> Artifact`. An exporter writes into a temporary
sibling of `out_dir` and renames it into place only when complete, so a crash never leaves a
half-written artifact where the final one belongs. It reports coverage (linears quantized, nodes
delegated) in `Artifact.record`; a silent partial lowering is a failure, not a log line.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from compress.artifact import Artifact, Availability
from compress.errors import Problem
from compress.quantized import QuantizedWeights
from compress.rope import RopeType, rope_problems


class Exporter(Protocol):
    format: str  # the name targets.yaml's export.format uses, and the registry key
    # its options dataclass, parsed from export.{...}: `codes_problems(q)` says which quantize configs it can hold,
    # `model_problems(config, q)` what of a model (from its HF config alone) it cannot, before any work
    options: type
    runtimes: tuple[str, ...]  # names of the runtimes that run this format
    artifact_name: str  # the artifact's name in the build directory
    version: str  # part of the cache key: bump when the output for a given input changes

    def availability(self) -> Availability: ...

    def export(self, model: Any, tokenizer: Any, options: Any, out_dir: Path, console: Any,
               quantized: QuantizedWeights | None = None) -> Artifact: ...


def model_problems(config: Any, max_context: int, rope: tuple[RopeType, ...], who: str) -> list[Problem]:
    """What every exporter checks of a model's config: the context it bakes, the RoPE scaling it lowers."""
    out = rope_problems(config, rope, who)
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and max_context > limit:
        out.append(Problem("export.max_context", f"{max_context} exceeds the model's max_position_embeddings "
                                                 f"{limit}"))
    return out


@dataclass(frozen=True)
class SourceCard:
    """Who made the source model and under what terms, for the metadata fields formats carry."""

    name: str
    author: str
    license: str
    hub_id: str = ""  # the Hugging Face Hub repo the checkpoint was fetched from, when it was


def _hub_id(where: Path) -> str:
    """`org/name` of a checkpoint in huggingface_hub's cache (`.../models--org--name/snapshots/REV`), else ""."""
    parts = where.parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3].removeprefix("models--").replace("--", "/", 1)
    return ""


def source_card(model: Any) -> SourceCard:
    """The source GGUF's own `general.*` where the checkpoint was converted from one, else the checkpoint's
    directory name and pointers to the source's own terms."""
    from compress.models.gguf import source_general

    where = Path(model.config.name_or_path or "llama")
    general = source_general(where) if where.is_dir() else {}
    hub = _hub_id(where)
    name = general.get("name") or hub.rpartition("/")[2] or (where.parent.name if where.name == "hf" else where.name)
    return SourceCard(name, general.get("organization") or "the source model's authors (see its license)",
                      general.get("license") or "the source model's license", hub)


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes `final` only if the block succeeds."""
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
