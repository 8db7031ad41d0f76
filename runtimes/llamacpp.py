"""llama.cpp through llama-cpp-python's low-level C API, over a `.gguf` (ours, or any llama.cpp GGUF as a peer).

One context with one sequence: every token of a prefill is marked as an output, so llama.cpp returns logits
for every position (what the harness compares); the KV cache persists between calls; `reset()` clears it.

llama.cpp runs as its users run it: its default buffer types, so the CPU_REPACK buffer type repacks Q4_0/Q8_0
weights for its interleaved AVX2/AVX-512 (and AMX) kernels. Some VMs advertise Intel AMX without granting AMX
tile state, and there llama.cpp's AMX repacking crashes in llama_decode (SIGSEGV, llama-cpp-python 0.3.36). So
before the first load of a file in a process, a child process loads it with the defaults and decodes a few
tokens; only when that child dies are the extra buffer types turned off, and the session says so
(`LlamaCppSession.settings`, which `compress bench` records per entry).
"""

from __future__ import annotations

import functools
import signal
import subprocess
import sys
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
from compress.runtimes.base import ContextOverflow

from compress import llamacpp_lib
from compress.artifact import Artifact, Availability
from compress.llamacpp_lib import INSTALL_HINT, llama_cpp_quiet

DEFAULT_CONTEXT = 2048  # for a GGUF without our exporter's record (a peer): capped by the model's own context
MAX_BATCH = 512  # tokens per llama_decode call; longer prefills are fed in chunks


class LlamaCppError(RuntimeError):
    pass


class LlamaCppSession:
    def __init__(self, lib: Any, model: Any, ctx: Any, vocab_size: int, max_context: int, n_batch: int,
                 settings: dict[str, Any] | None = None):
        self._lib, self._ctx = lib, ctx
        self.settings = settings or {}  # what differs from llama.cpp's defaults, and why
        self.vocab_size = vocab_size
        self.max_context = max_context
        self._n_batch = n_batch
        self._batch = lib.llama_batch_init(n_batch, 0, 1)
        self._pos = 0
        # Free the C objects with the session (and never twice); the model outlives its context.
        self._finalizer = weakref.finalize(self, _free, lib, model, ctx, self._batch)

    def reset(self) -> None:
        self._lib.llama_memory_clear(self._lib.llama_get_memory(self._ctx), True)
        self._pos = 0

    def _run(self, ids: Sequence[int], every_position: bool = True) -> np.ndarray:
        """Logits (seq, vocab) for every position, or (1, vocab) for the last one only (llama.cpp then computes
        no output rows for the others, as its own tools do for a prompt)."""
        if self._pos + len(ids) > self.max_context:
            raise ContextOverflow(f"position {self._pos + len(ids)} exceeds max_context {self.max_context}")
        out = np.empty((len(ids) if every_position else 1, self.vocab_size), dtype=np.float32)
        batch = self._batch
        for start in range(0, len(ids), self._n_batch):
            chunk = ids[start:start + self._n_batch]
            batch.n_tokens = len(chunk)
            for i, token in enumerate(chunk):
                batch.token[i] = int(token)
                batch.pos[i] = self._pos + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = every_position or start + i == len(ids) - 1
            rc = self._lib.llama_decode(self._ctx, batch)
            if rc != 0:
                raise LlamaCppError(f"llama_decode returned {rc} at position {self._pos}")
            # llama_get_logits holds the rows asked for, in order (C memory)
            if every_position:
                out[start:start + len(chunk)] = np.ctypeslib.as_array(self._lib.llama_get_logits(self._ctx),
                                                                      shape=(len(chunk), self.vocab_size))
            elif start + len(chunk) == len(ids):
                out[0] = np.ctypeslib.as_array(self._lib.llama_get_logits(self._ctx), shape=(1, self.vocab_size))[0]
            self._pos += len(chunk)
        return out

    def prefill(self, token_ids: Sequence[int]) -> np.ndarray:
        return self._run(list(token_ids))

    def prefill_last(self, token_ids: Sequence[int]) -> np.ndarray:
        return self._run(list(token_ids), every_position=False)[0]

    def decode(self, token_id: int) -> np.ndarray:
        return self._run([token_id])[0]


def _free(lib: Any, model: Any, ctx: Any, batch: Any) -> None:
    lib.llama_batch_free(batch)
    lib.llama_free(ctx)
    lib.llama_model_free(model)


class LlamaCppRuntime:
    """llama.cpp as deployed: its default f16 KV cache and flash attention (auto).

    `exact=True` keeps the KV cache in f32 and disables flash attention (which computes in f16): an f32 GGUF
    then matches eager PyTorch to ~1e-5, which is how the tests pin the tensor layout down.
    """

    name = "llamacpp"

    def __init__(self, exact: bool = False):
        self.exact = exact

    def availability(self) -> Availability:
        if not llamacpp_lib.installed():  # through the module, so a test can take it away
            return Availability(False, f"llama-cpp-python is not installed; {INSTALL_HINT}")
        return Availability(True)

    def load(self, artifact: Artifact, threads: int, probe: bool = True) -> LlamaCppSession:
        settings: dict[str, Any] = {}
        extra_bufts, why = default_buffer_types_work(str(artifact.path), threads) if probe else (True, "")
        if not extra_bufts:
            settings["use_extra_bufts"] = {"value": False, "why": why}
        lib = llama_cpp_quiet()
        lib.llama_backend_init()
        mparams = lib.llama_model_default_params()
        mparams.use_extra_bufts = extra_bufts
        mparams.n_gpu_layers = 0
        model = lib.llama_model_load_from_file(str(artifact.path).encode(), mparams)
        if not model:
            raise LlamaCppError(f"llama.cpp could not load {artifact.path}")
        n_ctx = int(artifact.max_context or min(DEFAULT_CONTEXT, lib.llama_model_n_ctx_train(model)))
        n_batch = min(n_ctx, MAX_BATCH)
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = cparams.n_ubatch = n_batch
        cparams.n_seq_max = 1
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.no_perf = True
        if self.exact:
            cparams.type_k = cparams.type_v = 0  # GGML_TYPE_F32
            cparams.flash_attn_type = 0  # LLAMA_FLASH_ATTN_TYPE_DISABLED
            settings["kv_cache_and_flash_attention"] = {"value": "f32 KV cache, flash attention off",
                                                        "why": "exact mode (tests pin the layout against eager)"}
        ctx = lib.llama_init_from_model(model, cparams)
        if not ctx:
            lib.llama_model_free(model)
            raise LlamaCppError(f"llama.cpp could not create a context of {n_ctx} tokens for {artifact.path}")
        vocab = int(lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model)))
        return LlamaCppSession(lib, model, ctx, vocab, n_ctx, n_batch, settings)


PROBE_TIMEOUT_S = 120


@functools.cache
def default_buffer_types_work(path: str, threads: int) -> tuple[bool, str]:
    """(True, "") when a child process loads `path` with llama.cpp's default buffer types and decodes; else
    (False, why). Once per file and process: a crash must not take the caller down with it."""
    cmd = [sys.executable, "-m", "compress.runtimes.llamacpp", path, str(threads)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        return False, f"a probe with llama.cpp's default buffer types did not finish in {PROBE_TIMEOUT_S} s"
    if proc.returncode == 0:
        return True, ""
    if proc.returncode < 0:
        died = signal.Signals(-proc.returncode).name
        return False, (f"a probe with llama.cpp's default buffer types died with {died} (on a VM that advertises "
                       f"AMX without granting its tile state, AMX weight repacking crashes); extra buffer types off")
    last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return False, f"a probe with llama.cpp's default buffer types failed ({last}); extra buffer types off"


def _probe(path: str, threads: int) -> None:
    """The child of `default_buffer_types_work`: load with the defaults, prefill and decode a few tokens."""
    from pathlib import Path

    from compress.artifact import Artifact

    session = LlamaCppRuntime().load(Artifact(Path(path), "gguf", (Path(path).name,), max_context=64), threads,
                                     probe=False)
    session.prefill([1] * 16)
    session.decode(1)


if __name__ == "__main__":
    _probe(sys.argv[1], int(sys.argv[2]))
