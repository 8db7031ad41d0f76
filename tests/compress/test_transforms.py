"""Function-preserving weight transforms: the outputs stay, the weights move (off a quantization grid)."""

from __future__ import annotations

import torch

from compress.models.tiny import tiny_llama
from compress.models.transforms import fold_norm_gains

TOKENS = torch.tensor([list(range(10, 60))])


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


def test_folding_the_decoder_norm_gains_keeps_the_outputs_and_moves_the_weights():
    model = tiny_llama(seed=0)
    before, q_before = _logits(model), model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    fold_norm_gains(model)
    torch.testing.assert_close(_logits(model), before, atol=1e-5, rtol=1e-5)
    for layer in model.model.layers:
        assert torch.equal(layer.input_layernorm.weight, torch.ones_like(layer.input_layernorm.weight))
        assert torch.equal(layer.post_attention_layernorm.weight, torch.ones_like(layer.input_layernorm.weight))
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, q_before)
    assert model.config.tie_word_embeddings  # the final norm stays: the embedding stays tied


def test_folding_the_final_norm_unties_the_lm_head_and_survives_a_save(tmp_path):
    from transformers import LlamaForCausalLM

    model = tiny_llama(seed=0)
    before = _logits(model)
    fold_norm_gains(model, final=True)
    torch.testing.assert_close(_logits(model), before, atol=1e-5, rtol=1e-5)
    assert not model.config.tie_word_embeddings
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    model.save_pretrained(tmp_path, safe_serialization=True)
    again = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert not again.config.tie_word_embeddings
    torch.testing.assert_close(_logits(again), before, atol=1e-5, rtol=1e-5)
