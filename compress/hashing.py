"""Content hashes: of files (artifacts, checkpoints) and of JSON-able values (configs, cache keys)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def files_under(root: Path) -> list[Path]:
    """Every regular file under `root` (or `root` itself), sorted, as paths relative to `root`."""
    if root.is_file():
        return [Path(root.name)]
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def sha256_tree(root: Path, exclude: tuple[str, ...] = ()) -> str:
    """One hash over every file's relative path and content (minus names in `exclude`)."""
    h = hashlib.sha256()
    base = root.parent if root.is_file() else root
    for rel in files_under(root):
        if rel.name in exclude:
            continue
        h.update(str(rel).encode() + b"\0" + sha256_file(base / rel).encode() + b"\0")
    return h.hexdigest()


def sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
