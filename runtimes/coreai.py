"""The Core AI runtime over an asset from exporters/coreai.py: Apple's own code runs it.

`coreai-core` ships Apple's Core AI runtime; on Linux it is the interpreter inside that wheel (the same API that
specializes the asset for the CPU, GPU or Neural Engine on macOS 27), so the accuracy numbers come from Apple's
implementation of every op, not from ours. Latency is not measured on Linux: the interpreter is not device speed.
On macOS 27 with the OS runtime (`USE_OS_COREAI=1`), the same calls load the asset specialized for the compute unit
the export recorded (`_specialization`); that path is present but has not run here (no Mac).

The API is asynchronous; the Session runs it on an event loop of its own, one call at a time.

A damaged asset can abort the process inside Apple's loader (SIGABRT, measured with a few KB of the program
zeroed), so each asset is first loaded and run once in a child process (`python -m compress.runtimes.coreai`);
a child that dies is a one-line refusal, never a crash of the build.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import signal
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from compress.runtimes.base import ContextOverflow, native_log_path, native_stderr_to

from compress.artifact import AppleComputeUnit, Artifact, Availability

LINUX_LATENCY = "not measured: Core AI's interpreter on Linux is not device speed (Apple's code computes the " \
                "accuracy numbers; latency needs a Mac or an iPhone)"


class CoreAISession:
    """Session protocol over `main(tokens (1, q) int32, input_pos (1,) int32) -> logits (1, q, vocab)`."""

    def __init__(self, artifact: Artifact):
        from coreai.authoring import AIModelAsset

        self.vocab_size, self.max_context = int(artifact.vocab_size), int(artifact.max_context)
        self._loop = asyncio.new_event_loop()
        self._context = AIModelAsset.load(artifact.path / artifact.main).executable(
            _specialization(artifact.compute_units))
        model = self._loop.run_until_complete(self._context.__aenter__())
        function = model.load_function("main")
        self._function = self._loop.run_until_complete(function) if asyncio.iscoroutine(function) else function
        self._names = list(self._function.desc.state_names) if hasattr(self._function.desc, "state_names") \
            else _state_names(str(self._function.desc))
        cache = artifact.cache
        self._shape = (self.max_context, cache.kv_heads, cache.head_dim)
        self._state: dict[str, Any] = {}
        self._pos = 0
        self.reset()

    def reset(self) -> None:
        from coreai.runtime import NDArray

        self._state = {name: NDArray(np.zeros(self._shape, np.float16)) for name in self._names}
        self._pos = 0

    def prefill(self, token_ids: Sequence[int]) -> np.ndarray:
        from coreai.runtime import NDArray

        ids = list(token_ids)
        if self._pos + len(ids) > self.max_context:
            raise ContextOverflow(f"position {self._pos + len(ids)} exceeds max_context {self.max_context}")
        inputs = {"tokens": NDArray(np.array([ids], dtype=np.int32)),
                  "input_pos": NDArray(np.array([self._pos], dtype=np.int32))}
        out = self._loop.run_until_complete(self._function(inputs, self._state))
        self._pos += len(ids)
        return np.asarray(out["logits"].numpy(), dtype=np.float32)[0]  # (q, vocab), a copy

    def decode(self, token_id: int) -> np.ndarray:
        return self.prefill([token_id])[0]

    def close(self) -> None:
        self._loop.run_until_complete(self._context.__aexit__(None, None, None))
        self._loop.close()


def _state_names(description: str) -> list[str]:
    """The `States: [...]` list of a function's printed descriptor."""
    listed = description.split("States:", 1)[1].split("]", 1)[0].strip().lstrip("[")
    return [name.strip().strip('"') for name in listed.split(",") if name.strip()]


class CoreAIRuntime:
    name = "coreai"

    def availability(self) -> Availability:
        if importlib.util.find_spec("coreai") is None:
            return Availability(False, "coreai-core is not installed; pip install 'compress[coreai]'")
        return Availability(True, latency_unmeasured="" if sys.platform == "darwin" else LINUX_LATENCY)

    def load(self, artifact: Artifact, threads: int, probe: bool = True) -> CoreAISession:
        asset = artifact.path / artifact.main
        if probe:
            files = sorted(p for p in asset.rglob("*") if p.is_file())
            stamp = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
            if why := _child_cannot_run(str(artifact.path), artifact.main, int(artifact.max_context),
                                        artifact.cache.kv_heads, artifact.cache.head_dim, artifact.compute_units,
                                        stamp):
                raise CoreAIRefused(why)
        with native_stderr_to(native_log_path(self.name)):  # "ODIE [default]: Loading function 'main'"
            return CoreAISession(artifact)


def _specialization(compute_unit: str) -> Any:
    """coreai-core's SpecializationOptions for the recorded compute unit where the platform specializes (macOS 27
    with the OS runtime); None elsewhere, where the interpreter runs the asset as it is. Not run here: no Mac."""
    from coreai.runtime import SpecializationOptions

    if not compute_unit or not SpecializationOptions.is_supported():
        return None
    unit = AppleComputeUnit(compute_unit)
    if unit is AppleComputeUnit.DEFAULT:
        return SpecializationOptions.default()
    if unit is AppleComputeUnit.CPU:
        return SpecializationOptions.cpu_only()
    from coreai.runtime import ComputeUnitKind

    kind = ComputeUnitKind.gpu() if unit is AppleComputeUnit.GPU else ComputeUnitKind.neural_engine()
    return SpecializationOptions.from_preferred_compute_unit_kind(kind)


class CoreAIRefused(RuntimeError):
    """Apple's runtime could not load or run the asset (verification reports it as a refusal)."""


PROBE_TIMEOUT_S = 300


@functools.cache
def _child_cannot_run(folder: str, main: str, max_context: int, kv_heads: int, head_dim: int, compute_unit: str,
                      stamp: tuple[tuple[str, int, int], ...]) -> str:
    """"" when a child process loads the asset and runs one token; else why not. Once per asset state
    (`stamp`: its files' sizes and times) and process.

    A child killed by a signal is tried once more: Apple's loader (coreai-core 1.0.0b3) once aborted on an asset
    that then loaded in every later process (SmolLM2's off-grid ios-coreai build), while a damaged program aborts
    every time. The first death is written to the runtime's log."""
    cmd = [sys.executable, "-m", "compress.runtimes.coreai", folder, main, str(max_context), str(kv_heads),
           str(head_dim), compute_unit]
    for attempt in (1, 2):
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            return f"Core AI's runtime did not load and run {main} within {PROBE_TIMEOUT_S} s"
        if proc.returncode >= 0:
            break
        died = f"Core AI's runtime died with {signal.Signals(-proc.returncode).name} loading {main}"
        if attempt == 2:
            return died
        if (log := native_log_path(CoreAIRuntime.name)) is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
            with log.open("a") as f:
                f.write(f"compress: {died} in a probe process; trying once more\n{proc.stderr[-2000:]}\n")
    if proc.returncode == 0:
        return ""
    last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return f"Core AI's runtime cannot load {main}: {last}"


def _probe(folder: str, main: str, max_context: int, kv_heads: int, head_dim: int, compute_unit: str) -> None:
    from pathlib import Path

    from compress.artifact import CacheShape

    artifact = Artifact(Path(folder), "aimodel", (), main=main, max_context=max_context, vocab_size=1,
                        cache=CacheShape(1, kv_heads, head_dim), compute_units=compute_unit)
    session = CoreAIRuntime().load(artifact, threads=1, probe=False)
    session.decode(0)
    session.close()


if __name__ == "__main__":
    folder_arg, main_arg, context_arg, heads_arg, dim_arg, unit_arg = sys.argv[1:]
    _probe(folder_arg, main_arg, int(context_arg), int(heads_arg), int(dim_arg), unit_arg)
