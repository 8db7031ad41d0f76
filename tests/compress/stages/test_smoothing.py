"""SmoothQuant-style smoothing in the quantize stage: the same function, smaller activation outliers."""

from __future__ import annotations

import random

import pytest
import torch

from compress.errors import ConfigError
from compress.models.tiny import tiny_llama
from compress.quantized import QuantizeConfig, Rotation
from compress.stages.smoothing import smooth


def _windows(count: int, length: int) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(256) for _ in range(length)] for _ in range(count)]


def test_smoothing_keeps_the_function_and_shrinks_the_outlier_channels():
    model = tiny_llama(0, num_hidden_layers=2, intermediate_size=128)
    with torch.no_grad():
        for layer in model.model.layers:  # a few channels always large, as massive activations are
            layer.input_layernorm.weight[3] = 40.0
            layer.post_attention_layernorm.weight[7] = -25.0
    ids = torch.tensor(_windows(2, 32))
    smoothed, info = smooth(model, _windows(4, 32), alpha=0.5)
    with torch.no_grad():
        torch.testing.assert_close(smoothed(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)
    assert info["sites"] == 4 and info["alpha"] == 0.5
    assert info["outlier_ratio_after"] < 0.5 * info["outlier_ratio_before"]
    assert float(smoothed.model.layers[0].input_layernorm.weight[3].abs()) < 40.0  # range moved into the weights
    assert model.model.layers[0].input_layernorm.weight[3] == 40.0  # the input model is untouched
    nothing, _ = smooth(model, _windows(4, 32), alpha=0.0)  # alpha 0: scales follow the weights only
    with torch.no_grad():
        torch.testing.assert_close(nothing(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)


def test_smoothing_and_rotation_together_are_refused():
    with pytest.raises(ConfigError, match="smoothing: with rotation 'hadamard'"):
        QuantizeConfig(smoothing=0.5, rotation=Rotation.HADAMARD)


def _stage_ctx(reference, tmp_path):
    from compress.progress import Console
    from compress.stages import StageContext

    return StageContext(0, tmp_path, _windows, reference, Console(quiet=True))


def _uneven(model):
    """`model` with wildly uneven gains folded into its weights: same function, columns far apart in size."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm, linears in ((layer.input_layernorm, (layer.self_attn.q_proj, layer.self_attn.k_proj,
                                                           layer.self_attn.v_proj)),
                                  (layer.post_attention_layernorm, (layer.mlp.gate_proj, layer.mlp.up_proj))):
                g = torch.exp(2.0 * torch.randn(norm.weight.shape, generator=gen))
                norm.weight.div_(g)
                for lin in linears:
                    lin.weight.mul_(g)
    return model


def test_the_quantize_stage_keeps_smoothing_only_when_it_measures_better(tmp_path):
    from compress.quantized import Activations, Precision, QuantAlgorithm
    from compress.stages import STAGES

    model = _uneven(tiny_llama(0, num_hidden_layers=2, intermediate_size=128))
    base = dict(weight_bits=4, group_size=32, symmetric=False, activations=Activations.NONE, embedding=Precision.INT8,
                lm_head=Precision.INT8, algorithm=QuantAlgorithm.RTN, calibration_windows=2, calibration_len=32)
    plain = STAGES.get("quantize").run(model, QuantizeConfig(**base), _stage_ctx(model, tmp_path))
    smoothed = STAGES.get("quantize").run(model, QuantizeConfig(**base, smoothing=0.5), _stage_ctx(model, tmp_path))
    info = smoothed.notes["smoothing"]
    assert info["kept"] is True and info["kl_without"] == plain.notes["kl_vs_unquantized"]
    assert smoothed.notes["kl_vs_unquantized"] == info["kl_with"] < 0.5 * info["kl_without"]
    ids = torch.tensor(_windows(2, 32))
    from compress.stages.quant_plan import linear_weights

    weights = linear_weights(smoothed.model)  # the kept model is the smoothed one, holding the codes exactly
    for name, t in smoothed.quantized.tensors.items():
        assert torch.equal(weights[name].detach(), t.dequantize()), name
    with torch.no_grad():
        assert not torch.equal(smoothed.model(ids).logits, plain.model(ids).logits)
    # A KL already under max_kl: smoothing is not even tried.
    loose = STAGES.get("quantize").run(model, QuantizeConfig(**base, smoothing=0.5, max_kl=10.0),
                                       _stage_ctx(model, tmp_path))
    assert "smoothing" not in loose.notes
    # Weights already on the grid (the plain stage's output, as its own reference): smoothing moves them off it.
    on_grid = plain.model
    again = STAGES.get("quantize").run(on_grid, QuantizeConfig(**base, smoothing=0.5), _stage_ctx(on_grid, tmp_path))
    assert again.notes["smoothing"]["kept"] is False
    assert again.notes["smoothing"]["kl_without"] < again.notes["smoothing"]["kl_with"]
    # Round to nearest of its own output gives back its codes, but for groups where the scale's fp16 rounding
    # moves an extreme weight across a rounding boundary (compress.quantized.rtn)
    same = sum(int((t.codes == plain.quantized.tensors[n].codes).sum()) for n, t in again.quantized.tensors.items())
    assert same >= 0.99 * sum(t.codes.numel() for t in again.quantized.tensors.values())


def test_smoothing_rebuilds_bitwise_and_the_search_promotes_from_the_smoothed_float_weights(tmp_path):
    """The stage quantizes the smoothed copy in place and rebuilds its float weights from the scales for the
    mixed-precision search: the rebuild is bitwise, and the 8-bit codes come from the float weights (from the
    4-bit values they would sit a 4-bit step away)."""
    from compress.quantized import Activations, Precision, QuantAlgorithm
    from compress.stages import STAGES
    from compress.stages.quant_plan import linear_weights
    from compress.stages.smoothing import smoothing_for

    model = _uneven(tiny_llama(0, num_hidden_layers=2, intermediate_size=128))
    smoothing = smoothing_for(model, _windows(2, 32), 0.5)
    first, second = linear_weights(smoothing.apply(model)), linear_weights(smoothing.apply(model))
    assert all(torch.equal(first[n], second[n]) for n in first)
    assert all(torch.equal(a, b) for a, b in zip(smooth(model, _windows(2, 32), 0.5)[0].state_dict().values(),
                                                  smoothing.apply(model).state_dict().values()))
    config = QuantizeConfig(weight_bits=4, group_size=32, symmetric=False, activations=Activations.NONE,
                            embedding=Precision.INT8, lm_head=Precision.INT8, algorithm=QuantAlgorithm.RTN,
                            calibration_windows=2, calibration_len=32, smoothing=0.5, max_kl=1e-9,
                            max_avg_bits=6.0)
    result = STAGES.get("quantize").run(model, config, _stage_ctx(model, tmp_path))
    assert result.notes["smoothing"]["kept"] is True and result.notes["promoted_to_8bit"]
    for name in result.notes["promoted_to_8bit"]:
        t = result.quantized.tensors[name]
        assert t.bits == 8
        error = (t.dequantize() - first[name]).abs().reshape(t.scale.shape[0], t.scale.shape[1], -1)
        assert bool((error <= 0.5001 * t.scale.unsqueeze(-1) + 1e-7).all()), name
