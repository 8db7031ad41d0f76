"""Distillation after the quantize stage trains its grids: codes fixed, scales and offsets (and norms) trained,
the result again exactly the stage's codes."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from compress.config import parse
from compress.errors import ConfigError, InputError
from compress.models.tiny import tiny_llama
from compress.progress import Console
from compress.quantized import (
    Activations,
    Precision,
    QuantAlgorithm,
    QuantizeConfig,
    QuantizedWeights,
    QuantTensor,
    Rotation,
    ZeroPoint,
)
from compress.stages import STAGES, StageContext, StageResult
from compress.stages.configs import DistillConfig
from compress.stages.grid_tuning import GridLinear
from compress.stages.quant_plan import apply, linear_weights

QUIET = Console(quiet=True)


def _windows(count: int, length: int) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(256) for _ in range(length)] for _ in range(count)]


def _ctx(reference, work: Path, quantized=None) -> StageContext:
    return StageContext(0, work, _windows, reference, QUIET, quantized)


def _quantize(model, tmp_path: Path, **kw):
    q = QuantizeConfig(**{**dict(weight_bits=4, group_size=32, symmetric=False, activations=Activations.NONE,
                                 embedding=Precision.INT8, lm_head=Precision.INT8, algorithm=QuantAlgorithm.RTN,
                                 calibration_windows=2, calibration_len=32), **kw})
    return STAGES.get("quantize").run(model, q, _ctx(model, tmp_path))


@pytest.mark.parametrize("symmetric, integer", [(False, False), (True, False), (False, True)])
def test_distilling_a_quantized_model_trains_its_grids_and_keeps_its_codes(symmetric, integer, tmp_path):
    teacher = tiny_llama(0, num_hidden_layers=2, intermediate_size=128)
    before = _quantize(teacher, tmp_path, symmetric=symmetric, **(
        {"algorithm": QuantAlgorithm.HQQ, "zero_point": ZeroPoint.INTEGER} if integer else {}))
    # Every scale (and offset) 20% too large: an error the grids can undo, on any text.
    tensors = {n: t if n == "lm_head" else QuantTensor(t.codes, t.scale * 1.2, t.offset * 1.2, t.bits, t.group)
               for n, t in before.quantized.tensors.items()}
    skewed = QuantizedWeights(tensors, before.quantized.config)
    config = DistillConfig(batch_size=4, seq_len=32, learning_rate=1e-2, warmup_steps=2, kl_windows=4,
                           tokens=30 * 4 * 32)
    after = STAGES.get("distill").run(apply(before.model, tensors), config, _ctx(teacher, tmp_path, skewed))
    notes, qw = after.notes, after.quantized
    before = StageResult(before.model, before.notes, skewed)
    assert "codes fixed, scales and offsets trained" in notes["kl_measured_on"]
    assert notes["grids_trained"] == 14 and notes["avg_code_bits"] == 4.0
    assert notes["kl_after"] < 0.5 * notes["kl_before"]
    ratio = torch.cat([(t.scale / skewed.tensors[n].scale).flatten() for n, t in qw.tensors.items() if n != "lm_head"])
    assert float(ratio.median()) < 0.99  # the scales moved back towards their own (the norms took some)
    assert qw is not None and set(qw.tensors) == set(before.quantized.tensors) and qw.config == before.quantized.config
    weights = linear_weights(after.model)
    moved = 0
    for name, t in qw.tensors.items():
        old = before.quantized.tensors[name]
        assert torch.equal(t.codes, old.codes) and (t.bits, t.group) == (old.bits, old.group), name
        assert torch.equal(weights[name].detach(), t.dequantize()), name  # the model is exactly the codes
        assert t.fp16_scales() and (t.fp16_residuals() or t.integer_zero_points() is not None), name  # fp16 values
        if name == "lm_head":
            assert torch.equal(t.scale, old.scale) and torch.equal(t.offset, old.offset)  # frozen
        else:
            moved += not torch.equal(t.scale, old.scale)
            assert t.symmetric is symmetric  # a symmetric grid stays symmetric (offset tied to scale)
            if integer:  # and integer zero points stay the same integers (MatMulNBits keeps taking them)
                assert torch.equal(t.integer_zero_points(), old.integer_zero_points()), name
    assert moved == 14
    assert not any(isinstance(m, GridLinear) for m in after.model.modules())
    assert type(after.model).__name__ == "LlamaForCausalLM"
    norms = [m.weight for m in after.model.modules() if type(m).__name__.endswith("RMSNorm")]
    assert any(not torch.equal(w, torch.ones_like(w)) for w in norms)  # norm gains trained too
    assert all(p.requires_grad for p in after.model.parameters())


def test_a_hidden_state_loss_on_a_rotated_student_is_refused(tmp_path):
    teacher = tiny_llama(0, num_hidden_layers=2, intermediate_size=128)
    rotated = _quantize(teacher, tmp_path, rotation=Rotation.HADAMARD, embedding=Precision.FP32)
    config = DistillConfig(batch_size=4, seq_len=32, kl_windows=0, tokens=4 * 32, hidden_loss_weight=0.5)
    with pytest.raises(InputError, match="rotated the student's hidden states"):
        STAGES.get("distill").run(rotated.model, config, _ctx(teacher, tmp_path, rotated.quantized))


def test_recovery_skips_a_model_already_close_and_never_hands_on_a_worse_one(tmp_path):
    teacher = tiny_llama(0, num_hidden_layers=2, intermediate_size=128)
    before = _quantize(teacher, tmp_path)
    ctx = _ctx(teacher, tmp_path, before.quantized)
    skip = DistillConfig(batch_size=4, seq_len=32, kl_windows=4, tokens=4 * 4 * 32, skip_below_kl=10.0)
    skipped = STAGES.get("distill").run(before.model, skip, ctx)
    assert skipped.notes["skipped"] is True and skipped.quantized is before.quantized
    assert skipped.model is before.model
    wild = DistillConfig(batch_size=4, seq_len=32, kl_windows=4, tokens=10 * 4 * 32, learning_rate=0.9,
                         warmup_steps=0)
    kept = STAGES.get("distill").run(before.model, wild, ctx)
    assert kept.notes["kl_after"] >= kept.notes["kl_before"] and kept.notes["kept"] == "input"
    assert kept.quantized is before.quantized and kept.model is before.model


def test_skip_below_kl_needs_held_out_windows():
    with pytest.raises(ConfigError, match=r"distill.skip_below_kl: needs held-out windows"):
        parse(DistillConfig, {"skip_below_kl": 0.01, "kl_windows": 0}, "distill")


def test_trained_grids_go_back_onto_8_bit_scales_when_the_stage_wrote_them():
    """A stage run with scale_bits 8: the trained scales and offsets are snapped back onto 8-bit codes times a power
    of two per row (what ONNX then stores in 8 bits), the codes unchanged; at 16 they stay fp16 values only."""
    from compress.stages.quant_algorithms import hqq

    t = hqq(torch.randn(16, 64) * 0.02, 4, 32, scale_bits=8)
    grid = GridLinear(t, None)
    with torch.no_grad():
        grid.a.uniform_(-0.05, 0.05)
        grid.b.uniform_(-0.3, 0.3)
    eight, sixteen = grid.to_tensor(8), grid.to_tensor(16)
    assert torch.equal(eight.codes, t.codes) and not torch.equal(eight.scale, t.scale)
    assert eight.scale_codes() is not None and eight.residual_codes() is not None
    assert sixteen.fp16_scales() and sixteen.scale_codes() is None
