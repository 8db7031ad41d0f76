from __future__ import annotations

import numpy as np
import pytest
import torch
from compress.runtimes.base import ContextOverflow
from compress.runtimes.torch_eager import TorchEagerRuntime

from compress.models.tiny import tiny_llama


def test_kv_cache_prefill_in_chunks_and_decode_match_one_full_pass():
    model = tiny_llama(seed=3)
    tokens = [int(t) for t in torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(0))]
    with torch.no_grad():
        full = model(torch.tensor([tokens])).logits[0].numpy()  # (40, vocab), no cache
    session = TorchEagerRuntime.session_for(model)
    np.testing.assert_allclose(session.prefill(tokens), full, atol=1e-4, rtol=1e-4)
    session.reset()
    chunks = [session.prefill(tokens[:16]), session.prefill(tokens[16:30])]
    steps = [session.decode(t)[None] for t in tokens[30:]]
    np.testing.assert_allclose(np.concatenate(chunks + steps), full, atol=1e-4, rtol=1e-4)
    assert session.prefill([1, 2]).shape == (2, model.config.vocab_size)


def test_writing_past_max_context_is_an_error():
    session = TorchEagerRuntime.session_for(tiny_llama(seed=0), max_context=8)
    session.prefill([1, 2, 3, 4, 5, 6, 7, 8])
    with pytest.raises(ContextOverflow, match="exceeds max_context 8"):
        session.decode(9)
    session.reset()
    assert session.decode(1).shape == (session.vocab_size,)
