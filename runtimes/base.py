"""The protocol every runtime implements, the eager reference included, so the harness never branches.

A Session holds one sequence's KV cache:
  prefill(token_ids) -> logits for every given position, (len(token_ids), vocab) float32;
                        appends to the cache, so a long prompt may be fed in chunks
  decode(token_id)   -> logits for the next position, (vocab,) float32
  reset()            -> empty the cache
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from compress.artifact import Artifact, Availability


class Session(Protocol):
    vocab_size: int
    max_context: int  # positions the cache holds; prefill/decode beyond it is an error

    def prefill(self, token_ids: Sequence[int]) -> np.ndarray: ...

    def decode(self, token_id: int) -> np.ndarray: ...

    def reset(self) -> None: ...


class Runtime(Protocol):
    name: str

    def availability(self) -> Availability: ...

    def load(self, artifact: Artifact, threads: int) -> Session: ...


def process_env(runtime: object) -> dict[str, str]:
    """Environment a runtime's native libraries read only at process start (a runtime class may declare
    `process_env`; none by default). Processes that time a runtime start with it (runtimes/latency.py)."""
    return dict(getattr(runtime, "process_env", {}))


class ContextOverflow(ValueError):
    """A prefill/decode would write past the session's max_context."""
