"""Eager PyTorch over a transformers Llama with a real (dynamic) KV cache: the reference runtime."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from compress.runtimes.base import ContextOverflow

from compress.artifact import Artifact, Availability


class TorchEagerSession:
    def __init__(self, model: Any, max_context: int | None = None):
        self.model = model.eval()
        self.vocab_size = int(model.config.vocab_size)
        self.max_context = int(max_context or model.config.max_position_embeddings)
        self._cache: Any = None
        self._pos = 0

    def reset(self) -> None:
        self._cache = None
        self._pos = 0

    def _forward(self, ids: Sequence[int]) -> np.ndarray:
        import torch
        from transformers import DynamicCache

        if self._pos + len(ids) > self.max_context:
            raise ContextOverflow(f"position {self._pos + len(ids)} exceeds max_context {self.max_context}")
        if self._cache is None:
            self._cache = DynamicCache(config=self.model.config)
        with torch.inference_mode():
            input_ids = torch.tensor([list(ids)], dtype=torch.long)  # (1, seq)
            positions = torch.arange(self._pos, self._pos + len(ids)).unsqueeze(0)  # (1, seq)
            out = self.model(input_ids=input_ids, position_ids=positions, past_key_values=self._cache,
                             use_cache=True)
        self._cache = out.past_key_values
        self._pos += len(ids)
        return out.logits[0].float().numpy()  # (seq, vocab)

    def prefill(self, token_ids: Sequence[int]) -> np.ndarray:
        return self._forward(token_ids)

    def decode(self, token_id: int) -> np.ndarray:
        return self._forward([token_id])[0]


class TorchEagerRuntime:
    name = "torch_eager"

    def availability(self) -> Availability:
        return Availability(True)

    def load(self, artifact: Artifact, threads: int) -> TorchEagerSession:
        import torch
        from transformers import LlamaForCausalLM

        torch.set_num_threads(threads)  # per process: the harness runs latency in a child process
        model = LlamaForCausalLM.from_pretrained(artifact.path, dtype="auto", use_safetensors=True)
        return TorchEagerSession(model, artifact.max_context)

    @staticmethod
    def session_for(model: Any, max_context: int | None = None) -> TorchEagerSession:
        """A session over an in-memory model (the reference, or a model a test built)."""
        return TorchEagerSession(model, max_context)
