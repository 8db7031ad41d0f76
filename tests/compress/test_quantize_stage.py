"""The quantize stage on tiny Llamas: algorithms, codes on disk, mixed precision, and errors before work."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchao")

from compress import checkpoint
from compress.errors import ConfigError, InputError
from compress.models.tiny import tiny_llama
from compress.progress import Console
from compress.quantized import (
    Activations,
    LayerOverride,
    Precision,
    QuantAlgorithm,
    QuantizeConfig,
    QuantizedWeights,
    QuantTensor,
    ZeroPoint,
    rtn,
)
from compress.stages import STAGES, StageContext
from compress.stages.configs import StageKind
from compress.stages.quant_algorithms import hqq, recover_grid
from compress.stages.quant_plan import linear_weights
from compress.targets import parse_target

QUIET = Console(quiet=True)


def _q41_like(out: int = 8, width: int = 64, seed: int = 0) -> torch.Tensor:
    """What a GGUF Q4_1 tensor dequantizes to: w = d * q + m per group of 32, d and m fp16."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (out, width), generator=gen)
    q[:, 0::32], q[:, 1::32] = 0, 15  # ggml's Q4_1 maps each group's min to 0 and max to 15
    d = (torch.rand(out, width // 32, generator=gen) * 0.01 + 1e-3).half().float()
    m = (-torch.rand(out, width // 32, generator=gen) * 0.08).half().float()
    return (d.repeat_interleave(32, 1) * q + m.repeat_interleave(32, 1)).float()


def _ctx(reference, tmp_path: Path) -> StageContext:
    gen = torch.Generator().manual_seed(1)
    windows = [torch.randint(0, 256, (48,), generator=gen).tolist() for _ in range(8)]
    return StageContext(seed=0, work_dir=tmp_path, reference=reference, console=QUIET,
                        calibration=lambda count, length: [w[:length] for w in windows[:count]])


def _config(**kw) -> QuantizeConfig:
    base = dict(weight_bits=4, group_size=32, symmetric=False, activations=Activations.NONE,
                embedding=Precision.INT8, lm_head=Precision.INT8, calibration_windows=2, calibration_len=48)
    return QuantizeConfig(**{**base, **kw})


def test_keep_gguf_recovers_a_q4_1_grid_bit_exactly_and_refuses_a_random_matrix():
    w = _q41_like()
    t, err = recover_grid(w, 4, 32)
    assert t is not None and err == 0.0
    assert torch.equal(t.dequantize(), w)
    assert not t.symmetric and t.integer_zero_points() is None  # Q4_1's offsets are arbitrary floats
    codes = torch.randint(-127, 128, (4, 64))
    codes[:, 0::32] = -127  # ggml's Q8_0: d = amax / 127, so each group's largest magnitude is code +-127
    q8 = codes * torch.tensor(0.01).half().float()
    t8, _ = recover_grid(q8, 8, 32)
    assert t8 is not None and t8.symmetric and torch.allclose(t8.dequantize(), q8, atol=1e-7)
    assert recover_grid(torch.randn(8, 64), 4, 32)[0] is None


@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_stays_within_half_a_step_and_has_integer_zero_points(symmetric):
    w = torch.randn(16, 64)
    t = rtn(w, 4, 32, symmetric)
    err = (t.dequantize() - w).abs().reshape(16, 2, 32).amax(-1)
    # An fp16 scale (rtn): rounded up when symmetric, to nearest when asymmetric (an extreme may then be clamped)
    assert torch.all(err <= t.scale.abs() * (0.5 if symmetric else 0.5 + 8 * 2**-11) + 1e-6)
    assert t.symmetric is symmetric
    assert t.integer_zero_points() is not None
    assert int(t.codes.max()) <= 15


def test_hqq_beats_rtn_on_a_q4_1_grid():
    w = _q41_like(out=32, width=128)
    mse = lambda t: float((t.dequantize() - w).pow(2).mean())
    assert mse(hqq(w, 4, 32)) < 0.1 * mse(rtn(w, 4, 32, symmetric=False))


def test_residual_offset_is_exact_for_signed_codes():
    t = hqq(torch.randn(8, 64), 4, 32)
    signed = t.signed_codes().float().reshape(8, 2, 32) * t.scale.unsqueeze(-1) + t.residual_offset().unsqueeze(-1)
    torch.testing.assert_close(signed.reshape(8, 64), t.dequantize(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("make", [lambda w: rtn(w, 4, 32, True), lambda w: rtn(w, 4, 32, False),
                                  lambda w: rtn(w, 8, 32, True), lambda w: hqq(w, 4, 32), lambda w: hqq(w, 8, 32)],
                         ids=["rtn4-sym", "rtn4-asym", "rtn8-sym", "hqq4", "hqq8"])
def test_scales_and_residual_offsets_are_fp16_values_and_the_codes_are_chosen_on_them(make):
    """What lets ONNX (and any fp16-storing format) hold the stage's grid exactly: every scale and every float
    offset's residual is an fp16 value, and each code is still the nearest on that grid (within half a step)."""
    w = torch.randn(64, 128) * 0.02
    w[3, 5] = 0.9  # an outlier: its group's grid is coarse
    t = make(w)
    # Integer zero points are what formats store for round to nearest; float offsets go in as residuals.
    assert t.fp16_scales() and (t.fp16_residuals() or t.integer_zero_points() is not None)
    step = t.scale.abs().repeat_interleave(32, dim=1)
    inside = (t.codes > 0) & (t.codes < 2 ** t.bits - 1)  # clamped codes may sit further away
    assert torch.all(((t.dequantize() - w).abs() <= step * 0.5 + 1e-7)[inside])
    off_grid = torch.full_like(t.scale, 1.0001)  # not an fp16 value: the checks can fail
    assert not QuantTensor(t.codes, off_grid, t.offset, t.bits, 32).fp16_scales()
    assert not QuantTensor(t.codes, t.scale, t.offset + 1e-5 * t.scale, t.bits, 32).fp16_residuals()


def test_gptq_codes_are_on_fp16_values_too():
    from compress.stages.gptq import gptq

    x = torch.randn(512, 128)
    t = gptq(torch.randn(32, 128), x.T @ x, 4, 32)
    assert t.fp16_scales() and t.fp16_residuals()


@pytest.mark.parametrize("bits", [4, 8])
def test_8_bit_scales_are_codes_times_a_power_of_two_per_row_and_cost_little(bits):
    """scale_bits 8 (double quantization): each row's scales are 1..255 times one power of two, its residual
    offsets -127..127 times another; still fp16 values; the codes nearest on that grid; at 4 bits the output error
    barely above the fp16 grid's (at 8 bits the scales' own rounding shows, more so in a row with an outlier). An
    fp16 grid is not on it (the check can fail)."""
    from compress.stages.gptq import gptq

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=gen) * 0.02
    w[3, 5] = 0.9
    x = torch.randn(1024, 256, generator=gen)
    for t, t16 in ((hqq(w, bits, 32, scale_bits=8), hqq(w, bits, 32)),
                   (gptq(w, x.T @ x, bits, 32, scale_bits=8), gptq(w, x.T @ x, bits, 32))):
        scales, residuals = t.scale_codes(), t.residual_codes()
        assert scales is not None and residuals is not None
        (q, f), (r, g) = scales, residuals
        assert q.dtype == torch.uint8 and int(q.min()) >= 1 and r.dtype == torch.int8 and int(r.abs().max()) <= 127
        assert torch.equal(torch.log2(f).round(), torch.log2(f)) and torch.equal(torch.log2(g).round(), torch.log2(g))
        assert f.shape == g.shape == (64, 1)
        assert torch.equal(q.float() * f, t.scale) and torch.equal(r.float() * g, t.residual_offset())
        assert t.fp16_scales() and t.fp16_residuals()
        assert t16.scale_codes() is None  # an fp16 grid's scales need more than 8 bits per row
        err = lambda u: float(((u.dequantize() - w) @ x.T).pow(2).mean())  # noqa: E731
        assert err(t) < (1.1 if bits == 4 else 1.5) * err(t16)
    step = t.scale.abs().repeat_interleave(32, dim=1)  # hqq: each code nearest on its grid
    t = hqq(w, bits, 32, scale_bits=8)
    inside = (t.codes > 0) & (t.codes < 2 ** bits - 1)
    assert torch.all(((t.dequantize() - w).abs() <= step * 0.5 + 1e-7)[inside])


def test_8_bit_scales_need_a_float_offset_grid():
    with pytest.raises(ConfigError, match="scale_bits: 8 with algorithm 'rtn'"):
        QuantizeConfig(algorithm=QuantAlgorithm.RTN, scale_bits=8)


@pytest.mark.parametrize("algorithm", [QuantAlgorithm.RTN, QuantAlgorithm.KEEP_GGUF])
@pytest.mark.parametrize("zero_point", [ZeroPoint.INTEGER, ZeroPoint.MIDDLE])
def test_integer_zero_points_are_a_choice_of_the_hqq_and_gptq_grids_only(algorithm, zero_point):
    with pytest.raises(ConfigError, match=f"zero_point: '{zero_point.value}' with algorithm '{algorithm.value}'"):
        QuantizeConfig(algorithm=algorithm, zero_point=zero_point)


def test_integer_zero_points_store_a_4_bit_zero_or_none_instead_of_a_float_offset(tmp_path):
    model = tiny_llama(seed=0)
    stored = {}
    for zero_point in ZeroPoint:
        config = _config(algorithm=QuantAlgorithm.HQQ, scale_bits=8, zero_point=zero_point)
        qw = STAGES.get("quantize").run(model, config, _ctx(model, tmp_path / zero_point.value)).quantized
        body = [t for n, t in qw.tensors.items() if n != "lm_head"]
        assert all((t.integer_zero_points() is not None) is (zero_point is not ZeroPoint.FLOAT) for t in body)
        assert all(t.symmetric is (zero_point is ZeroPoint.MIDDLE) for t in body)
        stored[zero_point] = qw.bits_summary()["avg_stored_bits"]
        assert ("zero_point" in qw.scheme) is (zero_point is not ZeroPoint.FLOAT)
    # an 8-bit scale per group of 32, plus an 8-bit offset, a 4-bit zero, or nothing
    assert stored == {ZeroPoint.FLOAT: 4.5, ZeroPoint.INTEGER: 4.375, ZeroPoint.MIDDLE: 4.25}


def test_stage_output_runs_its_own_codes_and_survives_the_cache(tmp_path):
    model = tiny_llama(seed=0)
    result = STAGES.get("quantize").run(model, _config(algorithm=QuantAlgorithm.HQQ), _ctx(model, tmp_path))
    qw = result.quantized
    weights = linear_weights(result.model)
    assert set(qw.tensors) == set(weights)  # 14 body linears + lm_head
    for name, t in qw.tensors.items():
        assert torch.equal(weights[name].detach(), t.dequantize()), name
    assert not torch.equal(linear_weights(model)["lm_head"], weights["lm_head"])
    notes = result.notes
    assert notes["avg_code_bits"] == 4.0 and notes["linears_quantized"] == 15
    assert 0 < notes["kl_vs_unquantized"] < 1
    assert notes["calibration"]["windows"] == 2 and notes["calibration"]["tokens"] == 96
    checkpoint.save_stage(result.model, qw, tmp_path / "ckpt")
    model_back, back = checkpoint.load_stage(tmp_path / "ckpt")
    assert back.config == qw.config and back.scheme == qw.scheme and back.promoted_to_8bit == ()
    assert torch.equal(linear_weights(model_back)["lm_head"], weights["lm_head"])
    for name, t in qw.tensors.items():
        u = back.tensors[name]
        assert (u.bits, u.group) == (t.bits, t.group) and torch.equal(u.codes, t.codes)
        assert torch.equal(u.scale, t.scale) and torch.equal(u.offset, t.offset)


def _assert_same_stage_result(owned, copied) -> None:
    """The same KL, promotions, codes and weights (every parameter, bitwise) from both stages."""
    assert owned.notes["kl_vs_unquantized"] == copied.notes["kl_vs_unquantized"] > 0
    assert owned.notes.get("promoted_to_8bit") == copied.notes.get("promoted_to_8bit")
    for name, t in copied.quantized.tensors.items():
        u = owned.quantized.tensors[name]
        assert torch.equal(u.codes, t.codes) and torch.equal(u.scale, t.scale) and torch.equal(u.offset, t.offset)
    got, want = owned.model.state_dict(), copied.model.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("extra", [{}, {"max_kl": 1e-6, "max_avg_bits": 5.0}], ids=["plain", "with the search"])
def test_a_stage_that_owns_the_reference_changes_it_in_place_with_the_same_result(extra, tmp_path):
    """Owning its input is a memory change only: the same codes, the same weights, the same KL as a stage that
    copies, the probe read from the reference before anything changed it. Plain rounding quantizes the owned
    model itself; the search (which needs the float weights) copies it once and then sets its trials in it."""
    config = _config(algorithm=QuantAlgorithm.RTN, **extra)
    copied = STAGES.get("quantize").run(tiny_llama(seed=0), config, _ctx(tiny_llama(seed=0), tmp_path))
    model = tiny_llama(seed=0)
    owned = STAGES.get("quantize").run(model, config, dataclasses.replace(_ctx(model, tmp_path), owns_model=True))
    _assert_same_stage_result(owned, copied)
    assert owned.model is model  # plain: quantized in place; with the search: its trials set in the owned model


_SEARCH = {"max_kl": 1e-6, "max_avg_bits": 5.0}


@pytest.mark.parametrize("extra, kept", [
    ({"algorithm": QuantAlgorithm.HQQ, "smoothing": 0.5}, True),
    ({"algorithm": QuantAlgorithm.HQQ, "smoothing": 0.3}, False),
    ({"algorithm": QuantAlgorithm.HQQ, "smoothing": 0.5, **_SEARCH}, True),
    ({"algorithm": QuantAlgorithm.HQQ, "smoothing": 0.3, **_SEARCH}, False),
    ({"algorithm": QuantAlgorithm.GPTQ, "smoothing": 0.8, "fit_windows": 2}, True),
    ({"algorithm": QuantAlgorithm.RTN, **_SEARCH}, None),
], ids=["smoothing kept", "smoothing lost", "smoothing kept, then the search", "smoothing lost, then the search",
        "gptq, smoothing kept", "the search"])
def test_an_owned_model_whose_floats_can_be_restored_is_never_copied_and_gives_the_same_result(extra, kept,
                                                                                                tmp_path, monkeypatch):
    """With its float weights readable again from its checkpoint (ctx.restore_floats), an owned model is quantized
    in place, restored for the smoothing candidate (smoothed in place), restored again when the candidate loses
    or the search needs them: no copy of the whole model is ever made, and the codes, weights and KL are those of
    a stage that copies."""
    import copy

    from transformers import LlamaForCausalLM

    config = _config(**extra)
    copied = STAGES.get("quantize").run(tiny_llama(seed=0), config, _ctx(tiny_llama(seed=0), tmp_path))
    model = tiny_llama(seed=0)
    model.save_pretrained(tmp_path / "source", safe_serialization=True)
    restore = checkpoint.float_restorer(model, tmp_path / "source")
    assert restore is not None
    restored, copies, deepcopy = [], [], copy.deepcopy

    def counting(obj, *args, **kwargs):
        copies.extend([type(obj).__name__] if isinstance(obj, LlamaForCausalLM) else [])
        return deepcopy(obj, *args, **kwargs)

    monkeypatch.setattr(copy, "deepcopy", counting)
    ctx = dataclasses.replace(_ctx(model, tmp_path), owns_model=True,
                              restore_floats=lambda m: (restored.append(m), restore(m)))
    owned = STAGES.get("quantize").run(model, config, ctx)
    assert copies == [] and owned.model is model and restored and all(m is model for m in restored)
    if kept is not None:  # the candidate won or lost as the parameter says, for both stages alike
        assert owned.notes["smoothing"] == copied.notes["smoothing"] and copied.notes["smoothing"]["kept"] is kept
    _assert_same_stage_result(owned, copied)  # norm gains too: smoothed only when kept


def test_float_weights_are_restored_bitwise_from_a_bf16_checkpoint_and_refused_where_keys_differ(tmp_path):
    from safetensors.torch import load_file, save_file

    source = tiny_llama(seed=0).to(torch.bfloat16)
    source.save_pretrained(tmp_path / "bf16", safe_serialization=True)
    loaded, _ = checkpoint.load_stage(tmp_path / "bf16")  # fp32, as the build loads a bf16 checkpoint
    model = tiny_llama(seed=5)
    restore = checkpoint.float_restorer(model, tmp_path / "bf16")
    restore(model)
    want = loaded.state_dict()
    assert all(torch.equal(v, want[k]) and v.dtype == torch.float32 for k, v in model.state_dict().items())
    (tmp_path / "renamed").mkdir()
    tensors = load_file(tmp_path / "bf16" / "model.safetensors")
    save_file({k.removeprefix("model."): v for k, v in tensors.items()}, tmp_path / "renamed" / "model.safetensors")
    assert checkpoint.float_restorer(model, tmp_path / "renamed") is None
    assert checkpoint.float_restorer(model, tmp_path / "empty") is None


def test_rtn_rounds_a_large_matrix_row_block_by_row_block_with_the_same_result():
    w = torch.randn(37, 96, generator=torch.Generator().manual_seed(3)) * 0.05
    for symmetric in (True, False):
        whole = rtn(w, 4, 32, symmetric)
        blocks = rtn(w, 4, 32, symmetric, block_elements=5 * 96)  # 8 blocks, the last of 2 rows
        assert torch.equal(whole.codes, blocks.codes) and torch.equal(whole.scale, blocks.scale)
        assert torch.equal(whole.offset, blocks.offset)
        out = torch.empty_like(w)
        whole.dequantize_into(out, block_elements=5 * 96)
        assert torch.equal(out, whole.dequantize())


def test_mixed_precision_raises_the_most_sensitive_linears_until_the_kl_is_met(tmp_path):
    model = tiny_llama(seed=0)
    ctx = _ctx(model, tmp_path)
    plain = STAGES.get("quantize").run(model, _config(algorithm=QuantAlgorithm.RTN), ctx)
    target = plain.notes["kl_vs_unquantized"] / 3
    mixed = STAGES.get("quantize").run(model, _config(algorithm=QuantAlgorithm.RTN, max_kl=target,
                                                      max_avg_bits=6.0), ctx)
    notes = mixed.notes
    assert notes["kl_vs_unquantized"] <= target
    assert 0 < len(notes["promoted_to_8bit"]) < 14
    assert 4.0 < notes["avg_code_bits"] <= 6.0
    bits = {n: t.bits for n, t in mixed.quantized.tensors.items()}
    assert mixed.quantized.promoted_to_8bit == tuple(notes["promoted_to_8bit"])
    assert all(bits[n] == 8 for n in notes["promoted_to_8bit"])
    ranked = [n for n, _ in notes["sensitivity_top"]]
    assert set(notes["promoted_to_8bit"]) == set(ranked[:len(notes["promoted_to_8bit"])])  # most sensitive first
    assert notes["max_kl_reached"] is True
    frontier = notes["bits_vs_kl"]  # k = 0, four budget levels and the bisection's points, in order of k
    assert frontier[0] == {"linears_at_8bit": 0, "avg_code_bits": 4.0, "kl": plain.notes["kl_vs_unquantized"]}
    assert [p["linears_at_8bit"] for p in frontier] == sorted({p["linears_at_8bit"] for p in frontier})
    assert all(4.0 <= p["avg_code_bits"] <= 6.0 for p in frontier) and frontier[-1]["kl"] < frontier[0]["kl"]
    chosen = next(p for p in frontier if p["linears_at_8bit"] == len(notes["promoted_to_8bit"]))
    assert chosen["kl"] == notes["kl_vs_unquantized"] and chosen["avg_code_bits"] == pytest.approx(
        notes["avg_code_bits"], abs=1e-3)
    # The search sets its trials in one model in place: the model it hands back holds exactly the chosen codes,
    # its KL is the one recorded, and the stage's input (here the reference itself) is left as it was.
    from compress.stages.quant_plan import apply
    from compress.stages.sensitivity import KlProbe

    expected = apply(model, mixed.quantized.tensors)
    got, want = linear_weights(mixed.model), linear_weights(expected)
    assert all(torch.equal(got[n], want[n]) for n in want)
    assert torch.equal(linear_weights(model)["layers.0.mlp.up_proj"], linear_weights(tiny_llama(seed=0))[
        "layers.0.mlp.up_proj"])
    probe = KlProbe(model, ctx.calibration(2, 48))
    assert probe(mixed.model) == pytest.approx(notes["kl_vs_unquantized"], rel=1e-5)


def test_the_search_in_place_chooses_what_fresh_copies_chose(tmp_path):
    """The in-place trials are a memory change only: the same promotions and KLs as one fresh copy per trial."""
    from compress.stages import sensitivity
    from compress.stages.quant_plan import apply, plan, quantize_model

    model = tiny_llama(seed=0)
    config = _config(algorithm=QuantAlgorithm.RTN, max_kl=1e-4, max_avg_bits=6.0)
    probe = sensitivity.KlProbe(model, _ctx(model, tmp_path).calibration(2, 48))
    quantized, qw = quantize_model(model, config)
    plain = probe(quantized)
    results = []
    for work in (None, apply(model, {})):
        tensors = dict(qw.tensors)
        mixed = sensitivity.promote_until(model, tensors, plan(model, config), config, probe, Console(quiet=True),
                                          plain, work=work)
        results.append((mixed.promoted, mixed.kl, [dataclasses.astuple(p) for p in mixed.frontier]))
        assert work is None or mixed.model is work
    fresh = []
    for k in range(len(results[0][0]) + 1):  # the chosen prefix measured on a fresh copy, as before
        trial = dict(qw.tensors)
        trial.update({n: tensors[n] for n in results[0][0][:k]})
        fresh.append(probe(apply(model, trial)))
    assert results[0] == results[1]
    assert fresh[-1] == pytest.approx(results[0][1], rel=1e-6)


def test_mixed_precision_that_cannot_reach_max_kl_spends_the_whole_bits_budget(tmp_path):
    model = tiny_llama(seed=0)
    ctx = _ctx(model, tmp_path)
    mixed = STAGES.get("quantize").run(model, _config(algorithm=QuantAlgorithm.RTN, max_kl=1e-9, max_avg_bits=4.5),
                                       ctx)
    notes = mixed.notes
    assert notes["max_kl_reached"] is False and notes["kl_vs_unquantized"] > 1e-9
    assert 4.0 < notes["avg_code_bits"] <= 4.5
    # the next linear in the ranking at 8 bits would break the budget
    weights = linear_weights(model)
    body = [n for n in mixed.quantized.tensors if n != "lm_head"]
    total = sum(weights[n].numel() for n in body)
    left = (4.5 - notes["avg_code_bits"]) * total
    ranked = [n for n, _ in notes["sensitivity_top"]]
    nxt = next((n for n in ranked if n not in notes["promoted_to_8bit"]), None)
    assert nxt is not None and weights[nxt].numel() * 4 > left - 1e-3 * total  # avg_code_bits is rounded
    assert notes["bits_vs_kl"][-1]["linears_at_8bit"] == len(notes["promoted_to_8bit"])


@pytest.mark.parametrize("config, message", [
    (_config(algorithm=QuantAlgorithm.AWQ), "'awq' is not available in the quantize stage; choose one of rtn, hqq, gptq"),
    (_config(group_size=128), "group_size 128 does not divide"),
    (_config(overrides=(LayerOverride("layers.*.mlp.nope"),)), "pattern 'layers.*.mlp.nope' matches no linear"),
    (_config(embedding=Precision.FP32), "ties them"),
    (_config(algorithm=QuantAlgorithm.KEEP_GGUF), "is not on a 4-bit grid"),
])
def test_bad_configs_fail_with_one_clear_error(config, message, tmp_path):
    model = tiny_llama(seed=0)
    with pytest.raises(InputError, match=message):
        STAGES.get("quantize").run(model, config, _ctx(model, tmp_path))


def test_overrides_keep_a_layer_fp32_or_8_bit(tmp_path):
    model = tiny_llama(seed=0)
    config = _config(overrides=(LayerOverride("layers.0.*", weight_bits=16), LayerOverride("*down_proj", weight_bits=8,
                                                                                           group_size=32)))
    qw = STAGES.get("quantize").run(model, config, _ctx(model, tmp_path)).quantized
    assert not any(n.startswith("layers.0.") for n in qw.tensors)
    assert qw.tensors["layers.1.mlp.down_proj"].bits == 8 and qw.tensors["layers.1.mlp.up_proj"].bits == 4


def _target(**extra):
    raw = {"stages": [{"quantize": {"weight_bits": 4}}], "export": {"format": "onnx"},
           "runtime": {"name": "onnxruntime"}}
    for key, value in extra.items():
        raw[key] = value
    return parse_target(raw, "t")


@pytest.mark.parametrize("extra, message", [
    ({"export": {"format": "onnx", "quantize": {"weight_bits": 4}}}, r"export.quantize: unknown key"),
    ({"stages": [{"quantize": {}}, {"prune": {"mlp_keep": 0.5}}]}, r"stages\[1\]: prune after quantize .* only distill may follow"),
    ({"stages": [{"quantize": {}}, {"distill": {"fake_quant": {}}}]}, r"stages\[1\].fake_quant: .* remove fake_quant"),
    ({"export": {"format": "gguf"}, "runtime": {"name": "llamacpp"}}, "cannot hold the quantize stage's codes"),
])
def test_targets_refuse_a_stage_the_export_would_undo(extra, message):
    with pytest.raises(ConfigError, match=message):
        _target(**extra)


def test_a_distill_may_follow_quantize_and_another_may_precede_it():
    target = _target(stages=[{"distill": {}}, {"quantize": {"weight_bits": 4}}, {"distill": {}}])
    assert [s.kind.value for s in target.stages] == ["distill", "quantize", "distill"]
    with pytest.raises(ConfigError, match=r"stages\[1\]: stage 'distill' appears twice"):
        _target(stages=[{"distill": {}}, {"distill": {}}, {"quantize": {}}])


def test_quantized_tensor_refuses_inconsistent_shapes():
    with pytest.raises(ValueError, match="inconsistent"):
        QuantTensor(torch.zeros(4, 64, dtype=torch.uint8), torch.ones(4, 3), torch.zeros(4, 3), 4, 32)
    assert QuantizedWeights({}, QuantizeConfig()).bits_summary() == {"linear_weights": 0}
    assert dataclasses.is_dataclass(QuantizedWeights)


@pytest.mark.parametrize("fmt, runtime, export, quantize, where, message", [
    ("pte", "executorch", {}, {"weight_bits": 4, "activations": "none"}, "stages[0].quantize.activations",
     "int8 dynamic activations"),
    ("onnx", "onnxruntime", {}, {"weight_bits": 4, "group_size": 8}, "stages[0].quantize.group_size",
     "not a MatMulNBits block size"),
    ("onnx", "onnxruntime", {}, {"weight_bits": 4, "group_size": None}, "stages[0].quantize.group_size",
     "not a MatMulNBits block size"),
    ("onnx", "onnxruntime", {}, {"embedding": "int4", "lm_head": "int8"}, "stages[0].quantize.embedding",
     "shares the output layer's quantized matrix"),
    ("mlpackage", "coreml", {"compute_units": "cpu_and_gpu"}, {"activations": "int8_dynamic"},
     "stages[0].quantize.activations", "fp16 activations"),
    ("mlpackage", "coreml", {"io": "fixed_shape", "compute_units": "cpu_and_ne"}, {"group_size": 32},
     "stages[0].quantize.group_size",
     "Neural Engine"),
])
def test_what_a_format_cannot_hold_of_the_codes_is_refused_when_targets_are_read(fmt, runtime, export, quantize,
                                                                                 where, message):
    raw = {"stages": [{"quantize": quantize}], "export": {"format": fmt, **export}, "runtime": {"name": runtime}}
    with pytest.raises(ConfigError, match=message) as err:
        parse_target(raw, "t")
    assert f"targets.t.{where}" in str(err.value) and f"(export.format {fmt})" in str(err.value)


def test_every_shipped_quantized_target_holds_its_codes():
    from compress.targets import load_targets

    shipped = load_targets()
    quantized = [t for t in shipped.targets.values() if any(s.kind is StageKind.QUANTIZE for s in t.stages)]
    assert {t.name for t in quantized} == {"android", "android-small", "ios", "ios-coreai", "web", "desktop"}
    for t in quantized:
        stage = next(s for s in t.stages if s.kind is StageKind.QUANTIZE)
        assert t.export.options.codes_problems(stage.config) == [], t.name


def test_reading_targets_does_not_import_torch():
    """The stage registry names the built-ins without importing them (they import torch)."""
    import subprocess
    import sys

    code = "import sys, compress.targets, compress.stages; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    assert STAGES.get("quantize").version == "3"


@pytest.mark.slow
def test_keep_gguf_recovers_every_tensor_of_the_real_model_bit_exactly(smollm2, tmp_path):
    """SmolLM2-135M ships as a Q4_1 GGUF with a Q8_0 embedding: its codes come back exactly, so the KL is 0."""
    config = _config(algorithm=QuantAlgorithm.KEEP_GGUF, calibration_windows=1, calibration_len=64)
    result = STAGES.get("quantize").run(smollm2.model, config, _ctx(smollm2.model, tmp_path))
    qw = result.quantized
    assert len(qw.tensors) == 211 and qw.tensors["lm_head"].bits == 8 and qw.tensors["lm_head"].symmetric
    source = linear_weights(smollm2.model)
    for name, t in qw.tensors.items():
        assert torch.equal(t.dequantize(), source[name].detach()), name
    assert result.notes["kl_vs_unquantized"] == 0.0
