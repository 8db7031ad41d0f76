"""Rotations absorbed into the weights: Hadamard matrices where they exist, the same function, an untied model."""

from __future__ import annotations

import pytest
import torch

from compress.errors import ConfigError
from compress.models.tiny import tiny_llama
from compress.quantized import Precision, QuantizeConfig, Rotation
from compress.stages.rotation import hadamard, random_hadamard, rotate

TOKENS = torch.tensor([list(range(10, 60))])


@pytest.mark.parametrize("n", [1, 2, 12, 20, 28, 36, 64, 72, 576, 960, 3072])
def test_hadamard_matrices_of_the_orders_llamas_use(n):
    h = hadamard(n)
    assert h is not None and set(h.unique().tolist()) <= {-1.0, 1.0}
    torch.testing.assert_close(h @ h.T, n * torch.eye(n, dtype=torch.float64))


def test_an_order_without_a_construction_falls_back_to_a_random_orthogonal_matrix():
    assert hadamard(34) is None  # 34 = 2 x 17; 16 is not prime, 17 is 1 mod 4 but 34 != 2 x (17 + 1)
    q = random_hadamard(34, torch.Generator().manual_seed(0))
    torch.testing.assert_close(q @ q.T, torch.eye(34, dtype=torch.float64))


def test_the_rotated_model_computes_the_same_function_untied_with_unit_norms():
    model = tiny_llama(seed=0, hidden_size=96, num_attention_heads=4, num_key_value_heads=2)
    with torch.no_grad():
        before = model(TOKENS).logits
        rotated = rotate(model, seed=0)
        after = rotated(TOKENS).logits
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    assert not rotated.config.tie_word_embeddings and model.config.tie_word_embeddings  # the input is untouched
    norms = [rotated.model.norm] + [m for layer in rotated.model.layers
                                    for m in (layer.input_layernorm, layer.post_attention_layernorm)]
    assert all(torch.equal(n.weight, torch.ones_like(n.weight)) for n in norms)
    # The residual stream's largest channel is spread out: the max/rms ratio of the embedding drops.
    peak = lambda w: float(w.detach().abs().max() / w.detach().pow(2).mean().sqrt())  # noqa: E731
    model.model.embed_tokens.weight.data[:, 3] *= 20  # one loud channel, as in real checkpoints
    assert peak(rotate(model, 0).model.embed_tokens.weight) < 0.5 * peak(model.model.embed_tokens.weight)


def test_a_rotation_that_would_need_a_quantized_untied_embedding_is_refused():
    with pytest.raises(ConfigError, match="rotation unties the embedding"):
        QuantizeConfig(rotation=Rotation.HADAMARD, embedding=Precision.INT8, lm_head=Precision.INT8)
    QuantizeConfig(rotation=Rotation.HADAMARD, embedding=Precision.FP32, lm_head=Precision.INT8)
