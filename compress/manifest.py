"""manifest.json: everything needed to trust, reproduce and re-verify a build. Written last, atomically.

A build directory without a manifest is an incomplete build.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from compress import __version__
from compress.artifact import Artifact
from compress.errors import InputError
from compress.gate import Verdict
from compress.hashing import sha256_file

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1
_TOOLS = ("torch", "transformers", "tokenizers", "safetensors", "gguf", "numpy", "executorch", "torchao",
          "onnx", "onnxruntime", "onnxruntime-genai", "coremltools", "llama-cpp-python")


def tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "compress": __version__}
    for name in _TOOLS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def describe_files(artifact: Artifact) -> list[dict[str, Any]]:
    base = artifact.path if artifact.path.is_dir() else artifact.path.parent
    return [{"path": f, "bytes": (base / f).stat().st_size, "sha256": sha256_file(base / f)} for f in artifact.files]


@dataclass
class Manifest:
    model: dict[str, Any]
    target: dict[str, Any]
    stages: list[dict[str, Any]] = field(default_factory=list)
    export: dict[str, Any] = field(default_factory=dict)
    artifact: dict[str, Any] = field(default_factory=dict)
    verification: dict[str, Any] | None = None
    verdict: Verdict = Verdict.UNVERIFIED
    tools: dict[str, str] = field(default_factory=tool_versions)
    created_at: str = field(default_factory=lambda: dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
    schema_version: int = SCHEMA_VERSION

    def write(self, out_dir: Path) -> Path:
        path = out_dir / MANIFEST
        tmp = out_dir / f".{MANIFEST}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(asdict(self), f, indent=2, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return path

    @classmethod
    def read(cls, out_dir: Path) -> Manifest:
        path = out_dir / MANIFEST
        if not path.is_file():
            raise InputError(f"{out_dir}: no {MANIFEST}; not a completed compress build (an interrupted build "
                             f"leaves none: re-run `compress build`)")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise InputError(f"{path}: not valid JSON ({err.msg})") from None
        if data.get("schema_version") != SCHEMA_VERSION:
            raise InputError(f"{path}: manifest schema {data.get('schema_version')!r} is not supported "
                             f"(this compress reads {SCHEMA_VERSION})")
        known = {f for f in cls.__dataclass_fields__}
        manifest = cls(**{k: v for k, v in data.items() if k in known})
        manifest.verdict = Verdict(manifest.verdict)
        return manifest

    def artifact_obj(self, out_dir: Path) -> Artifact:
        return Artifact.from_data(self.artifact, out_dir)

    def check_files(self, out_dir: Path) -> None:
        """Every artifact file exists with the size and sha256 the manifest recorded."""
        base = out_dir / self.artifact["path"]
        base = base if base.is_dir() else base.parent
        for entry in self.artifact["file_hashes"]:
            path = base / entry["path"]
            if not path.is_file():
                raise InputError(f"{path}: listed in the manifest but missing")
            if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
                raise InputError(f"{path}: changed since the build (sha256 differs from the manifest); "
                                 f"rebuild it")
