"""Where compress keeps downloads, converted checkpoints and the stage cache."""

from __future__ import annotations

import os
from pathlib import Path


def compress_home() -> Path:
    """`$COMPRESS_HOME`, default `~/.cache/compress`."""
    return Path(os.environ.get("COMPRESS_HOME") or Path.home() / ".cache" / "compress").expanduser()
