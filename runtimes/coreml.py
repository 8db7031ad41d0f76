"""The Core ML runtime over a package from exporters/coreml.py.

On macOS the Session calls `MLModel.predict` with the model's state, on the compute units the export
recorded. Elsewhere (Linux CI) there is no Core ML, so the Session executes the package's own ML program
op by op in its own dtypes (runtimes/mil_interpreter.py): accuracy is the program's, latency is not
measured (never estimated).

The package's interface is read from its own inputs (compress/coreml_io.py). `apple_llama` takes any number of
tokens per call: a prefill is one call, with the causal mask of Apple's example. `fixed_shape` accepts the
enumerated query lengths only, so a prefill is cut into chunks: the longest allowed length that fits, or one padded
call when a longer allowed length covers the rest. Padding writes cache slots beyond the last real token; every
query's causal mask hides them, and the next real tokens overwrite them before anything can read them.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from compress.runtimes.base import ContextOverflow

from compress.artifact import Artifact, Availability
from compress.coreml_io import CAUSAL_MASK, INPUT_IDS, INPUT_POS, LOGITS, TOKENS, CoreMLIO, causal_mask, convention_of

# The arithmetic bounds this runtime can also be loaded with (targets.yaml `eval.arithmetic_bound`): name -> what
# changes. On macOS too they run in the MIL interpreter: a bound is an emulation, not what Core ML does there.
BOUNDS = {"fp16_accumulation": "each fp16 linear and matmul summed as Apple's Core AI interpreter sums: fp16-rounded "
                               "products added left to right in fp16 (the default pass sums in fp32)"}
LINUX_LATENCY = "not measured: needs macOS (Core ML prediction); accuracy comes from executing the package's " \
                "ML program op by op"


def plan_chunks(n: int, start: int, lengths: Sequence[int], max_context: int) -> list[tuple[int, int]]:
    """(tokens taken, call length) per call to feed n tokens from position `start`; no `lengths`: any length."""
    if not lengths:
        return [(n, n)]
    allowed = sorted(set(lengths))
    out, pos = [], start
    while n > 0:
        cover = [q for q in allowed if q >= n and pos + q <= max_context]
        if cover:
            out.append((n, cover[0]))
            break
        q = max(q for q in allowed if q <= n)
        out.append((q, q))
        n, pos = n - q, pos + q
    return out


def feeds(io: CoreMLIO, tokens: np.ndarray, past: int) -> dict[str, np.ndarray]:
    """The package's inputs for `tokens` (1, q) int32 after `past` cached positions."""
    if io is CoreMLIO.APPLE_LLAMA:
        return {INPUT_IDS: tokens, CAUSAL_MASK: causal_mask(tokens.shape[1], past)}
    return {TOKENS: tokens, INPUT_POS: np.array([past], dtype=np.int32)}


class CoreMLSession:
    """Session protocol over `predict(tokens (1, q) int32, past) -> logits (1, q, vocab)`; `query_lengths` empty:
    any q."""

    def __init__(self, predict: Callable[[np.ndarray, int], np.ndarray], reset: Callable[[], None],
                 vocab_size: int, max_context: int, query_lengths: Sequence[int]):
        self._predict, self._reset = predict, reset
        self.vocab_size, self.max_context = vocab_size, max_context
        self.query_lengths = tuple(query_lengths)
        self._pos = 0

    def reset(self) -> None:
        self._reset()
        self._pos = 0

    def prefill(self, token_ids: Sequence[int]) -> np.ndarray:
        ids = list(token_ids)
        if self._pos + len(ids) > self.max_context:
            raise ContextOverflow(f"position {self._pos + len(ids)} exceeds max_context {self.max_context}")
        rows, i = [], 0
        for take, length in plan_chunks(len(ids), self._pos, self.query_lengths, self.max_context):
            chunk = ids[i:i + take] + [0] * (length - take)  # padding: see the module docstring
            logits = self._predict(np.array([chunk], dtype=np.int32), self._pos)
            rows.append(np.asarray(logits, dtype=np.float32)[0, :take])  # (take, vocab)
            i, self._pos = i + take, self._pos + take
        return np.concatenate(rows)

    def decode(self, token_id: int) -> np.ndarray:
        return self.prefill([token_id])[0]


def _macos_session(package: Path, artifact: Artifact, vocab: int) -> CoreMLSession:
    import coremltools as ct

    units = getattr(ct.ComputeUnit, (artifact.compute_units or "all").upper())
    model = ct.models.MLModel(str(package), compute_units=units)
    io = convention_of(i.name for i in model.get_spec().description.input)
    state = [model.make_state()]

    def predict(tokens: np.ndarray, past: int) -> np.ndarray:
        return model.predict(feeds(io, tokens, past), state=state[0])[LOGITS]

    def reset() -> None:
        state[0] = model.make_state()

    return CoreMLSession(predict, reset, vocab, int(artifact.max_context), list(artifact.query_lengths))


def _interpreter_session(package: Path, artifact: Artifact, vocab: int, bound: str | None) -> CoreMLSession:
    from compress.runtimes.mil_interpreter import Accumulation, MilInterpreter, load_program

    program, spec = load_program(package)
    io = convention_of(i.name for i in spec.description.input)
    interpreter = MilInterpreter(program, accumulation=Accumulation.FP32 if bound is None else
                                 {"fp16_accumulation": Accumulation.FP16_SEQUENTIAL}[bound])

    def predict(tokens: np.ndarray, past: int) -> np.ndarray:
        return interpreter.run(feeds(io, tokens, past))[LOGITS]

    return CoreMLSession(predict, interpreter.reset, vocab, int(artifact.max_context), list(artifact.query_lengths))


def can_predict() -> bool:
    """Core ML prediction exists only on macOS, through coremltools' native extension."""
    return sys.platform == "darwin" and importlib.util.find_spec("coremltools.libcoremlpython") is not None


class CoreMLRuntime:
    name = "coreml"
    bounds = BOUNDS

    def availability(self) -> Availability:
        if importlib.util.find_spec("coremltools") is None:
            return Availability(False, "coremltools is not installed; pip install 'compress[coreml]'")
        return Availability(True, latency_unmeasured="" if can_predict() else LINUX_LATENCY)

    def load(self, artifact: Artifact, threads: int, bound: str | None = None) -> CoreMLSession:
        """`bound`: one of BOUNDS, run in the MIL interpreter on every platform."""
        package = artifact.path / artifact.main
        vocab = int(artifact.vocab_size)
        if bound is not None and bound not in BOUNDS:
            raise ValueError(f"unknown arithmetic bound {bound!r}; choose one of {sorted(BOUNDS)}")
        if can_predict() and bound is None:
            return _macos_session(package, artifact, vocab)
        from threadpoolctl import threadpool_limits

        threadpool_limits(threads, user_api="blas")  # the interpreter's matmuls are numpy's BLAS
        return _interpreter_session(package, artifact, vocab, bound)
