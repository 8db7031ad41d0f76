"""The protocol every runtime implements, the eager reference included, so the harness never branches.

A Session holds one sequence's KV cache:
  prefill(token_ids) -> logits for every given position, (len(token_ids), vocab) float32;
                        appends to the cache, so a long prompt may be fed in chunks
  decode(token_id)   -> logits for the next position, (vocab,) float32
  reset()            -> empty the cache
and optionally
  prefill_last(token_ids) -> the last position's logits only, (vocab,): how an app processes a prompt. A session
                        whose runtime can skip the other positions' logits defines it; `prompt_logits` below
                        falls back to prefill(token_ids)[-1] for one that does not.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import numpy as np

from compress.artifact import Artifact, Availability
from compress.home import native_log_dir


class Session(Protocol):
    vocab_size: int
    max_context: int  # positions the cache holds; prefill/decode beyond it is an error

    def prefill(self, token_ids: Sequence[int]) -> np.ndarray: ...

    def decode(self, token_id: int) -> np.ndarray: ...

    def reset(self) -> None: ...


def prompt_logits(session: Session, token_ids: Sequence[int]) -> np.ndarray:
    """A prompt's last-position logits (vocab,), computed as an app computes them: through the session's own
    `prefill_last` when it has one (only the last position's logits), else its `prefill`."""
    last = getattr(session, "prefill_last", None)
    return last(list(token_ids)) if last is not None else session.prefill(list(token_ids))[-1]


class Runtime(Protocol):
    name: str

    def availability(self) -> Availability: ...

    def load(self, artifact: Artifact, threads: int) -> Session: ...


def runtime_bounds(runtime: object) -> dict[str, str]:
    """The arithmetic bounds a runtime can also be loaded with (a runtime class may declare `bounds`, name -> what
    changes; none by default). A runtime that declares them accepts `load(artifact, threads, bound=name)`."""
    return dict(getattr(runtime, "bounds", {}))


def process_env(runtime: object) -> dict[str, str]:
    """Environment a runtime's native libraries read only at process start (a runtime class may declare
    `process_env`; none by default). Processes that time a runtime start with it (runtimes/latency.py)."""
    return dict(getattr(runtime, "process_env", {}))


def native_log_path(runtime_name: str) -> Path | None:
    """Where a runtime's native (C/C++) log lines go instead of the user's console (compress.home); None: the
    console (`--verbose`)."""
    directory = native_log_dir()
    return directory / f"{runtime_name}.log" if directory is not None else None


@contextmanager
def native_stderr_to(path: Path | None) -> Iterator[None]:
    """Send standard error to `path` (appended) for the block, at both levels: file descriptor 2, where C/C++
    libraries write, and Python's `sys.stderr`, through which some bindings (ExecuTorch's) route their native log.
    None leaves it where it is."""
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved_fd, saved_stream = os.dup(2), sys.stderr
    try:
        with open(path, "a", encoding="utf-8", errors="replace", buffering=1) as log:
            os.dup2(log.fileno(), 2)
            sys.stderr = log
            try:
                yield
            finally:
                sys.stderr = saved_stream
                log.flush()
                os.dup2(saved_fd, 2)
    finally:
        os.close(saved_fd)


class ContextOverflow(ValueError):
    """A prefill/decode would write past the session's max_context."""
