from __future__ import annotations

import pytest
import torch

from compress.models.tiny import tiny_llama
from exporters.llama import AttentionBackend, ExportLlama


@pytest.mark.parametrize("backend", list(AttentionBackend))
def test_export_module_matches_hf_in_one_pass_and_incrementally(backend):
    if backend is not AttentionBackend.EAGER:
        pytest.importorskip("executorch")
        import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401
    hf = tiny_llama(seed=4, num_attention_heads=6, num_key_value_heads=2, hidden_size=96)
    tokens = torch.randint(0, 256, (1, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens).logits  # (1, 48, vocab)
        module = ExportLlama.from_hf(hf, max_context=64, backend=backend)
        torch.testing.assert_close(module(tokens, torch.tensor([0])), expected, atol=1e-4, rtol=1e-4)
        module.reset_cache()
        parts = [module(tokens[:, :20], torch.tensor([0]))]
        parts += [module(tokens[:, i:i + 1], torch.tensor([i])) for i in range(20, 48)]
        torch.testing.assert_close(torch.cat(parts, dim=1), expected, atol=1e-4, rtol=1e-4)


def test_tied_embeddings_become_two_deliberate_copies():
    hf = tiny_llama(seed=0)
    module = ExportLlama.from_hf(hf, max_context=32)
    assert module.lm_head.weight.data_ptr() != module.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(module.lm_head.weight, hf.model.embed_tokens.weight)


def test_unsupported_rope_scaling_is_refused():
    hf = tiny_llama(seed=0)
    hf.config.rope_parameters = {"rope_type": "llama3", "rope_theta": 10000.0}
    with pytest.raises(ValueError, match="RoPE scaling 'llama3' is not supported"):
        ExportLlama.from_hf(hf, max_context=32)
