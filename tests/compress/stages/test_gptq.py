"""GPTQ on CPU: codes on HQQ's grid, less output error than rounding each weight to its nearest code there."""

from __future__ import annotations

import pytest
import torch

from compress.quantized import QuantTensor, ZeroPoint, rtn
from compress.stages.gptq import gptq
from compress.stages.quant_algorithms import _codes_on, hqq


def _inputs(tokens: int, width: int, seed: int) -> torch.Tensor:
    """Correlated inputs with a few loud channels, like a transformer's: (tokens, width)."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(width, width, generator=gen) / width ** 0.5
    x = torch.randn(tokens, width, generator=gen) @ mix
    x[:, :4] *= 8.0
    return x


@pytest.mark.parametrize("bits, group", [(4, 32), (8, 64), (4, 16)])
def test_gptq_beats_nearest_rounding_on_the_same_grid(bits, group):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(48, 128, generator=gen) / 128 ** 0.5
    x = _inputs(512, 128, seed=2)
    t = gptq(w, x.T @ x, bits, group)
    assert t.codes.dtype == torch.uint8 and int(t.codes.max()) <= 2 ** bits - 1
    assert (t.bits, t.group, tuple(t.scale.shape)) == (bits, group, (48, 128 // group))
    # Every code sits on its group's grid: dequantizing is exactly scale * code + offset.
    grouped = t.codes.reshape(48, -1, group).float() * t.scale.unsqueeze(-1) + t.offset.unsqueeze(-1)
    torch.testing.assert_close(t.dequantize(), grouped.reshape(48, 128))
    out = lambda m: x @ m.T  # noqa: E731  (tokens, out)
    err_gptq = (out(w) - out(t.dequantize())).pow(2).mean()
    nearest = hqq(w, bits, group)  # the grid GPTQ rounds onto, each weight to its nearest code
    torch.testing.assert_close(t.scale, nearest.scale) and torch.testing.assert_close(t.offset, nearest.offset)
    err_nearest = (out(w) - out(nearest.dequantize())).pow(2).mean()
    assert err_gptq < 0.8 * err_nearest, (float(err_gptq), float(err_nearest))
    assert err_gptq < (out(w) - out(rtn(w, bits, group, symmetric=False).dequantize())).pow(2).mean()


@pytest.mark.parametrize("scale_bits", [16, 8])
def test_integer_zero_points_sit_next_to_hqqs_and_gptq_still_beats_nearest_rounding(scale_bits):
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(48, 128, generator=gen) / 128 ** 0.5
    x = _inputs(512, 128, seed=5)
    floating = hqq(w, 4, 32, scale_bits)
    nearest = hqq(w, 4, 32, scale_bits, ZeroPoint.INTEGER)
    assert floating.integer_zero_points() is None  # HQQ's own zeros are floats
    zero = nearest.integer_zero_points()
    assert zero is not None and int(zero.max()) <= 15
    # The code just below or just above HQQ's zero, with a refitted scale; still the stage's fp16 / 8-bit scales.
    hqq_zero = -floating.offset / floating.scale
    assert bool(((zero.float() - hqq_zero).abs() < 1).all())
    assert nearest.scale_codes() is not None if scale_bits == 8 else nearest.fp16_scales()
    # Weight error: the integer grid costs something against float offsets, and beats rounding HQQ's zero.
    mse = lambda t: float((t.dequantize() - w).pow(2).mean())
    rounded_offset = -hqq_zero.round().clamp(0, 15) * floating.scale
    rounded = QuantTensor(_codes_on(w, floating.scale, rounded_offset, 4, 32), floating.scale, rounded_offset, 4, 32)
    assert mse(floating) < mse(nearest) < mse(rounded)
    t = gptq(w, x.T @ x, 4, 32, scale_bits, ZeroPoint.INTEGER)
    torch.testing.assert_close(t.scale, nearest.scale) and torch.testing.assert_close(t.offset, nearest.offset)
    assert torch.equal(t.integer_zero_points(), zero)
    out = lambda m: x @ m.T
    err = lambda m: float((out(w) - out(m.dequantize())).pow(2).mean())
    assert err(t) < 0.8 * err(nearest)
    assert err(t) < err(rtn(w, 4, 32, symmetric=False))
    # The middle zero point: symmetric codes (no offset term on XNNPACK), GPTQ still beating symmetric rtn.
    middle = gptq(w, x.T @ x, 4, 32, scale_bits, ZeroPoint.MIDDLE)
    assert middle.symmetric and bool((middle.integer_zero_points() == 8).all())
    assert middle.scale_codes() is not None if scale_bits == 8 else middle.fp16_scales()
    assert err(t) < err(middle) < err(rtn(w, 4, 32, symmetric=True))


def test_inputs_that_never_fire_do_not_break_the_factorisation():
    w = torch.randn(8, 64)
    x = _inputs(256, 64, seed=3)
    x[:, 10] = 0.0  # a dead input channel: a zero row and column in the Hessian
    t = gptq(w, x.T @ x, 4, 32)
    assert torch.isfinite(t.dequantize()).all()


def test_the_stage_fits_gptq_on_windows_apart_from_those_it_measures_and_beats_rtn(tmp_path):
    from compress.models.tiny import tiny_llama
    from compress.progress import Console
    from compress.quantized import Precision, QuantAlgorithm, QuantizeConfig
    from compress.stages import STAGES, StageContext

    model = tiny_llama(seed=0)
    gen = torch.Generator().manual_seed(1)
    pool = [torch.randint(0, 256, (48,), generator=gen).tolist() for _ in range(16)]
    asked = []

    def calibration(count: int, length: int) -> list[list[int]]:
        asked.append(count)
        return [w[:length] for w in pool[:count]]

    ctx = StageContext(seed=0, work_dir=tmp_path, reference=model, console=Console(quiet=True),
                       calibration=calibration)
    config = dict(weight_bits=4, group_size=32, symmetric=False, embedding=Precision.INT8, lm_head=Precision.INT8,
                  calibration_windows=2, calibration_len=48, fit_windows=8)
    fitted = STAGES.get("quantize").run(model, QuantizeConfig(algorithm=QuantAlgorithm.GPTQ, **config), ctx)
    rounded = STAGES.get("quantize").run(model, QuantizeConfig(algorithm=QuantAlgorithm.RTN, **config), ctx)
    assert asked == [10, 2]  # probe + fit windows for gptq; the probe's alone for rtn
    assert fitted.notes["fit"]["windows"] == 8 and fitted.notes["calibration"]["windows"] == 2
    assert fitted.notes["calibration"]["token_ids_sha256"] != fitted.notes["fit"]["token_ids_sha256"]
    assert len(fitted.quantized.tensors) == 15
    assert fitted.notes["kl_vs_unquantized"] < rounded.notes["kl_vs_unquantized"]


def test_linears_reading_one_input_share_one_hessian_equal_to_its_own():
    from compress.stages.layerwise import first_layer_inputs, input_grams

    from compress.models.tiny import tiny_llama

    model = tiny_llama(seed=1)
    layer = model.model.layers[0]
    linears = {name: m for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    windows = [[int(t) for t in torch.randint(0, 256, (32,), generator=torch.Generator().manual_seed(i))]
               for i in range(3)]
    hidden, kwargs = first_layer_inputs(model, windows)
    inputs = {}
    handles = [m.register_forward_hook(lambda _m, args, _o, n=n: inputs.__setitem__(n, args[0].reshape(-1, args[0]
                                                                                                          .shape[-1])))
               for n, m in linears.items()]
    with torch.no_grad():
        layer(hidden, **kwargs)
    for h in handles:
        h.remove()
    sums = input_grams(layer, linears, hidden, kwargs)
    for name, x in inputs.items():
        torch.testing.assert_close(sums[name], x.T @ x)
    assert sums["self_attn.q_proj"] is sums["self_attn.k_proj"] is sums["self_attn.v_proj"]
    assert sums["mlp.gate_proj"] is sums["mlp.up_proj"] and sums["mlp.down_proj"] is not sums["mlp.up_proj"]
    assert sums["self_attn.o_proj"] is not sums["self_attn.q_proj"]
