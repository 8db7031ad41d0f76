"""The exporter -> runtime contract: availability, the weights dtype vocabulary, and the artifact description.

An exporter returns an `Artifact`; the runtime for its format loads it; the manifest records it. A format is
named by its exporter (`Exporter.format`, e.g. "pte") and a runtime by itself (`Runtime.name`); the registries in
compress.exporters and compress.runtimes hold them. Nothing here imports a module of ours above it.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# An ONNX graph input (exporters/onnx_last_logits.py, runtimes/onnxruntime.py): logits for the last N positions
# of a call only (0: every position). transformers.js feeds it by this name.
LOGITS_TO_KEEP = "num_logits_to_keep"


class AppleComputeUnit(enum.StrEnum):
    """Where an Apple device specializes a Core AI asset when it loads (the exporter records it in
    `Artifact.compute_units`, the runtime asks for it)."""

    DEFAULT = "default"  # the OS chooses
    CPU = "cpu"  # CPU only
    GPU = "gpu"  # preferred: GPU
    NEURAL_ENGINE = "neural_engine"  # preferred: Neural Engine


class Dtype(enum.StrEnum):
    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"


@dataclass(frozen=True)
class Availability:
    ok: bool
    reason: str = ""  # why not, and what to do about it (e.g. "coremltools is not installed; pip install ...")
    # Set when the runtime runs here but its latency would not be the real runtime's (Core ML on Linux runs an
    # interpreter): verification reports latency as not measured, with this reason, instead of measuring it.
    latency_unmeasured: str = ""


@dataclass(frozen=True)
class CacheShape:
    """The KV cache a session allocates for a graph that takes it as inputs (ONNX): per layer, per K and V,
    (1, kv_heads, max_context, head_dim)."""

    layers: int
    kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class Artifact:
    """What an exporter wrote and what its runtime needs to open it, typed; `record` is the exporter's account
    for the manifest (coverage, scheme, timings), which no runtime reads."""

    path: Path  # the file or directory a runtime loads
    format: str  # the exporter's format name: pte, onnx, mlpackage, gguf, safetensors
    files: tuple[str, ...]  # every file written, relative to `path` (or its name when it is a file)
    main: str = ""  # the file a runtime opens inside `path` (model.pte, model.onnx, model.mlpackage); "": `path`
    data: str = ""  # the weights file beside `main` when the program keeps them outside (ExecuTorch's model.ptd)
    max_context: int | None = None  # positions the artifact's KV cache holds
    vocab_size: int | None = None
    query_lengths: tuple[int, ...] = ()  # tokens per call the program was specialized for (Core ML)
    cache: CacheShape | None = None
    compute_units: str = ""  # where a Core ML program may run (all, cpu_only, ...) or a Core AI asset is specialized
    record: dict[str, Any] = field(default_factory=dict)
    # Each call returns the logits of its last position only (ExecuTorch `export.logits: last`), as an app needs
    last_logits_only: bool = False

    def size_bytes(self) -> int:
        base = self.path if self.path.is_dir() else self.path.parent
        return sum((base / f).stat().st_size for f in self.files)

    def at(self, path: Path) -> Artifact:
        """The same artifact, copied to `path`."""
        return dataclasses.replace(self, path=path)

    def to_data(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.update(path=self.path.name, files=list(self.files),
                    query_lengths=list(self.query_lengths))
        return data

    @classmethod
    def from_data(cls, data: dict[str, Any], root: Path) -> Artifact:
        cache = data.get("cache")
        return cls(root / data["path"], str(data["format"]), tuple(data["files"]), data.get("main", ""),
                   data.get("data", ""), data.get("max_context"), data.get("vocab_size"),
                   tuple(data.get("query_lengths", ())), CacheShape(**cache) if cache else None,
                   data.get("compute_units", ""), dict(data.get("record", {})),
                   bool(data.get("last_logits_only", False)))
