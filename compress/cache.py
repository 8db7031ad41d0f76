"""A content-addressed cache of stage outputs and exported artifacts.

An entry's key hashes everything its content depends on: the input's key (ultimately the model's
content hash), the step's config, the step's code version and the compress version. An entry is
written into a temporary directory and renamed into place only when complete, so an interrupted run
(Ctrl-C, kill -9) never leaves a half-written entry under a real key; the next run resumes from the
last completed step and sweeps the leftovers.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from compress import __version__
from compress.hashing import sha256_json

ENTRY_INFO = "entry.json"
_STALE_AFTER_S = 24 * 3600


def code_version(step: Any) -> str:
    """Hash of the source of the package that defines `step` (an exporter or a stage object). A cache key
    that includes it goes stale by itself when that code changes, with no version to remember to bump."""
    package = Path(sys.modules[type(step).__module__].__file__).parent  # type: ignore[arg-type]
    return sha256_json([[p.name, p.read_text()] for p in sorted(package.glob("*.py"))])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StageCache:
    def __init__(self, root: Path):
        self.root = root

    @staticmethod
    def key(*parts: Any) -> str:
        return sha256_json([__version__, *parts])

    def path(self, key: str) -> Path:
        return self.root / key[:2] / key

    def lookup(self, key: str) -> Path | None:
        entry = self.path(key)
        return entry if (entry / ENTRY_INFO).is_file() else None

    def info(self, key: str) -> dict[str, Any]:
        return json.loads((self.path(key) / ENTRY_INFO).read_text())

    @contextmanager
    def write(self, key: str, info: dict[str, Any]) -> Iterator[Path]:
        """Yield a temporary directory; on success it becomes the entry for `key`."""
        final = self.path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f"{key}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            yield tmp
            (tmp / ENTRY_INFO).write_text(json.dumps({**info, "key": key, "created": time.time()}, indent=2))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        try:
            if final.exists():
                raise FileExistsError(final)
            os.replace(tmp, final)
        except OSError:  # a concurrent run finished the same entry first (before or during the rename): keep one
            shutil.rmtree(tmp, ignore_errors=True)
            if not (final / ENTRY_INFO).is_file():
                raise

    def sweep(self) -> int:
        """Remove temporary entries left by runs that died; returns how many were removed."""
        removed = 0
        for tmp in self.root.glob("*/*.tmp-*"):
            pid = tmp.name.rsplit("-", 1)[-1]
            dead = not pid.isdigit() or not _pid_alive(int(pid))
            if dead or time.time() - tmp.stat().st_mtime > _STALE_AFTER_S:
                shutil.rmtree(tmp, ignore_errors=True)
                removed += 1
        return removed
