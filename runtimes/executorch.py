"""The ExecuTorch runtime (`executorch.runtime`) over a `.pte` from exporters/executorch.py.

The program's KV cache lives in its mutable buffers; the custom SDPA op only reads positions before
`input_pos + seq`, so `reset()` just rewinds the position and stale entries are overwritten, never read.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Any

import numpy as np
from compress.runtimes.base import ContextOverflow, native_log_path, native_stderr_to

from compress.artifact import Artifact, Availability
from compress.errors import InputError


class ExecuTorchSession:
    """`last_only` programs return one row of logits per call: `prefill` then feeds one token per call to give every
    position's logits (the teacher-forced accuracy pass), and `prefill_last` feeds the prompt in chunks, as an app."""

    def __init__(self, method: Any, vocab_size: int, max_context: int, max_seq_len: int, last_only: bool):
        self._method = method
        self.vocab_size = vocab_size
        self.max_context = max_context
        self.max_seq_len = max_seq_len  # tokens per call: longer inputs go in chunks, as the stock runner does
        self._last_only = last_only
        self._pos = 0

    def reset(self) -> None:
        self._pos = 0

    def _run(self, ids: Sequence[int]) -> np.ndarray:
        import torch

        if self._pos + len(ids) > self.max_context:
            raise ContextOverflow(f"position {self._pos + len(ids)} exceeds max_context {self.max_context}")
        ids = list(ids)
        parts = []
        for first in range(0, len(ids), self.max_seq_len):
            chunk = ids[first:first + self.max_seq_len]
            tokens = torch.tensor([chunk], dtype=torch.long)  # (1, seq)
            pos = torch.tensor([self._pos], dtype=torch.long)  # (1,)
            # (1, seq, vocab), (1, 1, vocab), or (1, vocab) from ExecuTorch's own export_llm: rows of logits
            parts.append(self._method.execute([tokens, pos])[0].numpy().reshape(-1, self.vocab_size))
            self._pos += len(chunk)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def prefill(self, token_ids: Sequence[int]) -> np.ndarray:
        if self._last_only:
            return np.stack([self._run([token])[-1] for token in token_ids])
        return self._run(token_ids)

    def prefill_last(self, token_ids: Sequence[int]) -> np.ndarray:
        return self._run(token_ids)[-1]

    def decode(self, token_id: int) -> np.ndarray:
        return self._run([token_id])[0]


class ExecuTorchRuntime:
    name = "executorch"
    # The pip runtime's llama::custom_sdpa kernel calls MKL's sgemm (linked from libtorch) from inside ExecuTorch's
    # own thread pool; MKL then starts OpenMP threads of its own on the same cores. Measured (SmolLM2, 2 threads,
    # decode at positions 128..192): 230-250 us per custom_sdpa call with MKL threaded, 45 us single-threaded.
    # A phone build has no MKL (ExecuTorch's own gemm runs on the calling thread), so this is also what a phone
    # does. MKL reads the variable when it starts: processes that time the runtime set it before launch.
    process_env = {"MKL_NUM_THREADS": "1"}

    def availability(self) -> Availability:
        if importlib.util.find_spec("executorch") is None:
            return Availability(False, "executorch is not installed; pip install 'compress[executorch]'")
        return Availability(True)

    def load(self, artifact: Artifact, threads: int) -> ExecuTorchSession:
        data = artifact.data  # the weights file (model.ptd) when the program keeps them outside
        if data and not (artifact.path / data).is_file():
            raise InputError(f"{artifact.path / data} is missing: the program keeps its weights there; copy it "
                             f"beside {artifact.main}")
        # ExecuTorch's C++ logs ([cpuinfo_utils.cpp], [threadpool.cpp], ...) go to the build's logs/ (compress.home).
        with native_stderr_to(native_log_path(self.name)):
            # Kernel libraries the program calls outside XNNPACK: quantized embedding, llama custom ops.
            import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401
            import executorch.kernels.quantized  # noqa: F401
            from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
            from executorch.runtime import Runtime

            _unsafe_reset_threadpool(threads)
            program = Runtime.get().load_program(artifact.path / artifact.main,
                                                 data_path=artifact.path / data if data else None)
            method = program.load_method("forward")
            vocab = int(program.load_method("get_vocab_size").execute([])[0])
            # Tokens per call: get_max_seq_len, within the bound the token input was planned for (export_llm
            # plans max_seq_length - 1 and reports max_seq_length).
            per_call = min(int(program.load_method("get_max_seq_len").execute([])[0]),
                           int(program.metadata("forward").input_tensor_meta(0).sizes()[-1]))
        return ExecuTorchSession(method, vocab, int(artifact.max_context), per_call, artifact.last_logits_only)
