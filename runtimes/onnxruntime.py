"""ONNX Runtime over an ONNX folder from exporters/onnx.py: one InferenceSession, the KV cache carried between calls.

Two ways to carry the cache, both over the same graph:
- `shared` (default, what onnxruntime-genai does): one pre-allocated (1, kv_heads, max_context, head_dim) buffer
  per layer and key/value, bound through IO binding as both `past_key_values.N.*` and `present.N.*`, so
  GroupQueryAttention writes the new positions in place and nothing is copied between steps.
- `concat` (what optimum and transformers.js do): past of the current length in, present one longer out.
Tests run both and compare; the harness and the latency measurement use `shared`.
"""

from __future__ import annotations

import enum
import importlib.util
from collections.abc import Sequence
from typing import Any

import numpy as np
from compress.runtimes.base import ContextOverflow

from compress.artifact import LOGITS_TO_KEEP, Artifact, Availability
from compress.errors import RuntimeUnavailable


class KvMode(enum.StrEnum):
    SHARED = "shared"  # one pre-allocated buffer bound as past and present (onnxruntime-genai's way)
    CONCAT = "concat"  # past in, a longer present out (optimum's and transformers.js's way)


class OnnxRuntimeSession:
    def __init__(self, session: Any, artifact: Artifact, kv_mode: KvMode = KvMode.SHARED):
        self._session = session
        self._mode = kv_mode
        self.vocab_size = int(artifact.vocab_size)
        self.max_context = int(artifact.max_context)
        cache = artifact.cache
        self._layers = cache.layers
        self._shape = (1, cache.kv_heads, self.max_context, cache.head_dim)
        self._dtype = np.float32
        self._pos = 0
        self._cache: dict[str, Any] = {}
        # exporters/onnx.py graphs take `num_logits_to_keep`; a builder graph of its defaults does not
        self._keep = LOGITS_TO_KEEP in {i.name for i in session.get_inputs()}
        self.reset()

    def _names(self) -> list[tuple[str, str]]:
        return [(f"past_key_values.{i}.{kind}", f"present.{i}.{kind}")
                for i in range(self._layers) for kind in ("key", "value")]

    def reset(self) -> None:
        import onnxruntime as ort

        self._pos = 0
        if self._mode is KvMode.SHARED:
            # Positions at or past the sequence length are never read (GroupQueryAttention uses
            # attention_mask's sum), so reset only rewinds; buffers are allocated once per session.
            if not self._cache:
                self._cache = {past: ort.OrtValue.ortvalue_from_numpy(np.zeros(self._shape, self._dtype))
                               for past, _ in self._names()}
        else:
            empty = np.zeros((*self._shape[:2], 0, self._shape[3]), self._dtype)
            self._cache = {past: empty for past, _ in self._names()}

    def _run(self, ids: Sequence[int], keep: int = 0) -> np.ndarray:
        """Logits of the last `keep` positions of the call, where the graph can skip the others (0: every one)."""
        if self._pos + len(ids) > self.max_context:
            raise ContextOverflow(f"position {self._pos + len(ids)} exceeds max_context {self.max_context}")
        input_ids = np.asarray([list(ids)], dtype=np.int64)  # (1, seq)
        mask = np.ones((1, self._pos + len(ids)), dtype=np.int64)  # (1, past + seq)
        if self._mode is KvMode.SHARED:
            binding = self._session.io_binding()
            binding.bind_cpu_input("input_ids", input_ids)
            binding.bind_cpu_input("attention_mask", mask)
            if self._keep:
                binding.bind_cpu_input(LOGITS_TO_KEEP, np.asarray(keep, dtype=np.int64))
            binding.bind_output("logits")  # first bound output: get_outputs()[0]
            for past, present in self._names():
                binding.bind_ortvalue_input(past, self._cache[past])
                binding.bind_ortvalue_output(present, self._cache[past])
            self._session.run_with_iobinding(binding)
            logits = binding.get_outputs()[0].numpy()
        else:
            feed = {"input_ids": input_ids, "attention_mask": mask, **self._cache}
            if self._keep:
                feed[LOGITS_TO_KEEP] = np.asarray(keep, dtype=np.int64)
            outputs = dict(zip(self._output_names(), self._session.run(None, feed)))
            logits = outputs["logits"]
            self._cache = {past: outputs[present] for past, present in self._names()}
        self._pos += len(ids)
        return logits[0].astype(np.float32, copy=False)  # (seq, vocab)

    def _output_names(self) -> list[str]:
        return [o.name for o in self._session.get_outputs()]

    def prefill(self, token_ids: Sequence[int]) -> np.ndarray:
        return self._run(token_ids)

    def prefill_last(self, token_ids: Sequence[int]) -> np.ndarray:
        """The prompt's last position's logits (vocab,); only that row is computed where the graph allows it."""
        return self._run(token_ids, keep=1)[-1]

    def decode(self, token_id: int) -> np.ndarray:
        return self._run([token_id], keep=1)[0]


class OnnxRuntimeRuntime:
    name = "onnxruntime"

    def availability(self) -> Availability:
        if importlib.util.find_spec("onnxruntime") is None:
            return Availability(False, "onnxruntime is not installed; pip install 'compress[onnx]'")
        return Availability(True)

    def load(self, artifact: Artifact, threads: int, kv_mode: KvMode = KvMode.SHARED) -> OnnxRuntimeSession:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        path = artifact.path / artifact.main
        try:
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # noqa: BLE001  ORT raises its own Fail/InvalidGraph/NotImplemented types
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise RuntimeUnavailable(f"onnxruntime {ort.__version__} cannot load {path.name}: {first}") from None
        return OnnxRuntimeSession(session, artifact, kv_mode)
