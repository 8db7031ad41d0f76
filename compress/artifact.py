"""An exported artifact: what an exporter returns, a runtime loads and the manifest records."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compress.targets import Format


@dataclass(frozen=True)
class Artifact:
    path: Path  # the file or directory a runtime loads
    format: Format
    files: tuple[str, ...]  # every file written, relative to `path` (or its name when it is a file)
    extra: dict[str, Any] = field(default_factory=dict)  # coverage, max_context, tokenizer file, ...

    def size_bytes(self) -> int:
        base = self.path if self.path.is_dir() else self.path.parent
        return sum((base / f).stat().st_size for f in self.files)

    def to_data(self) -> dict[str, Any]:
        return {"path": self.path.name, "format": self.format.value, "files": list(self.files),
                "extra": self.extra}

    @classmethod
    def from_data(cls, data: dict[str, Any], root: Path) -> Artifact:
        return cls(root / data["path"], Format(data["format"]), tuple(data["files"]), dict(data.get("extra", {})))
