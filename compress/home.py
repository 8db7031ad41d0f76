"""Where compress keeps downloads, converted checkpoints and the stage cache."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def compress_home() -> Path:
    """`$COMPRESS_HOME`, default `~/.cache/compress`."""
    return Path(os.environ.get("COMPRESS_HOME") or Path.home() / ".cache" / "compress").expanduser()


# Where runtimes' native (C/C++) logs go: a directory (the build's `logs/`, set by the orchestrator around the
# work on a build), "console" (`--verbose`: left on standard error), or unset: `$COMPRESS_HOME/logs`. An
# environment variable, so child processes that load a runtime (the latency measurement) follow it too.
NATIVE_LOGS_ENV = "COMPRESS_NATIVE_LOGS"
CONSOLE = "console"


def native_log_dir() -> Path | None:
    """The directory for native logs now; None: leave them on the console."""
    where = os.environ.get(NATIVE_LOGS_ENV, "")
    if where == CONSOLE:
        return None
    return Path(where) if where else compress_home() / "logs"


@contextmanager
def native_logs_in(directory: Path) -> Iterator[None]:
    """Native logs go to `directory` for the block, unless `--verbose` keeps them on the console."""
    saved = os.environ.get(NATIVE_LOGS_ENV)
    if saved != CONSOLE:
        os.environ[NATIVE_LOGS_ENV] = str(directory)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(NATIVE_LOGS_ENV, None)
        else:
            os.environ[NATIVE_LOGS_ENV] = saved
