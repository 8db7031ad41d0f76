"""The distill stage on tiny Llamas: refusals, KL goes down, checkpoints resume, fallback data, QAT."""

from __future__ import annotations

import random
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from compress.config import parse
from compress.distributed import World
from compress.errors import ConfigError, InputError
from compress.models.tiny import tiny_llama
from compress.progress import Console
from compress.stages import STAGES, StageContext, fake_quant
from compress.stages.configs import DistillConfig, FakeQuant, Importance, PruneConfig
from compress.stages.distill import check
from compress.stages.prune import prune

QUIET = Console(quiet=True)
FAST = dict(batch_size=4, seq_len=32, learning_rate=3e-3, warmup_steps=2, kl_windows=4)


def _windows(count: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(length)] for _ in range(count)]


def _ctx(reference, work: Path, console=QUIET, calibration=None) -> StageContext:
    return StageContext(0, work, calibration or (lambda n, length: _windows(n, length)), reference, console)


@pytest.fixture(scope="module")
def teacher_student():
    teacher = tiny_llama(0, num_hidden_layers=3, intermediate_size=128)
    # the plain slice (no refit): these tests are about distillation, and 256 calibration tokens are too few to fit
    # a 128-unit refit on this random model
    plain = PruneConfig(mlp_keep=0.5, drop_layers=1, reconstruct=False, importance=Importance.ACTIVATION)
    student = prune(teacher, plain, _windows(8, 32, seed=9)).model
    return teacher, student


def test_a_budget_of_zero_steps_is_refused_when_the_config_is_read():
    with pytest.raises(ConfigError, match=r"distill.tokens: 1000 is less than one batch \(batch_size 4 x seq_len "
                                          r"256 = 1024 tokens\): zero training steps"):
        parse(DistillConfig, {"tokens": 1000}, "distill")
    with pytest.raises(ConfigError, match=r"fake_quant.group_size: 48 is not a power of two"):
        parse(DistillConfig, {"fake_quant": {"group_size": 48}}, "distill")


def test_impossible_runs_are_refused_before_work(teacher_student):
    teacher, student = teacher_student
    with pytest.raises(InputError, match="batch_size: 4 does not split across 3 data-parallel ranks"):
        check(student, DistillConfig(**FAST, tokens=512), teacher, World(0, 3))
    other = tiny_llama(0, hidden_size=32, num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(InputError, match="hidden size 32 differs from the teacher's 64"):
        check(other, DistillConfig(**FAST, tokens=512, hidden_loss_weight=0.5), teacher, World())


def test_distillation_lowers_the_kl_to_the_teacher(teacher_student, tmp_path):
    teacher, student = teacher_student
    before = {k: v.clone() for k, v in student.state_dict().items()}
    config = DistillConfig(**FAST, tokens=30 * 4 * 32, hidden_loss_weight=0.1)
    result = STAGES.get("distill").run(student, config, _ctx(teacher, tmp_path))
    notes = result.notes
    assert notes["steps"] == 30 and notes["data"] == "calibration" and notes["tokens_per_s"] > 0
    assert notes["kl_after"] < 0.7 * notes["kl_before"], notes
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in before.items())  # the input is untouched
    assert not list(tmp_path.glob("distill-*.pt"))  # the finished run's checkpoint is removed


class _Interrupting(Console):
    """Ctrl-C after `at` steps: what a user does to a long run."""

    def __init__(self, at: int):
        super().__init__(quiet=True)
        self.at = at

    @contextmanager
    def meter(self, description, total, start=0):
        def update(completed, status):
            if completed >= self.at:
                raise KeyboardInterrupt
        yield update


def test_an_interrupted_run_resumes_from_its_checkpoint_and_ends_where_an_uninterrupted_one_does(
        teacher_student, tmp_path):
    teacher, student = teacher_student
    config = DistillConfig(**FAST, tokens=10 * 4 * 32, checkpoint_every=3)
    straight = STAGES.get("distill").run(student, config, _ctx(teacher, tmp_path / "a"))
    with pytest.raises(KeyboardInterrupt):
        STAGES.get("distill").run(student, config, _ctx(teacher, tmp_path / "b", _Interrupting(at=7)))
    assert len(list((tmp_path / "b").glob("distill-*.pt"))) == 1  # steps 3 and 6 were saved
    resumed = STAGES.get("distill").run(student, config, _ctx(teacher, tmp_path / "b"))
    assert resumed.notes["resumed_from_step"] == 6 and resumed.notes["steps"] == 10
    assert resumed.notes["losses"] == pytest.approx(straight.notes["losses"], rel=1e-5)
    for name, value in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, atol=1e-5, rtol=1e-5)


def test_a_different_config_does_not_resume_another_runs_checkpoint(teacher_student, tmp_path):
    teacher, student = teacher_student
    config = DistillConfig(**FAST, tokens=6 * 4 * 32, checkpoint_every=2)
    with pytest.raises(KeyboardInterrupt):
        STAGES.get("distill").run(student, config, _ctx(teacher, tmp_path, _Interrupting(at=3)))
    other = DistillConfig(**{**FAST, "learning_rate": 1e-3}, tokens=6 * 4 * 32, checkpoint_every=2)
    assert STAGES.get("distill").run(student, other, _ctx(teacher, tmp_path)).notes["resumed_from_step"] is None


def _too_small(count: int, length: int):
    raise InputError(f"calibration split of 'tiny.txt' has 40 tokens; {count} windows of {length} need more")


def test_teacher_generated_text_when_the_corpus_is_too_small(teacher_student, tmp_path):
    teacher, student = teacher_student
    config = DistillConfig(**FAST, tokens=8 * 4 * 32, generated_windows=8)
    result = STAGES.get("distill").run(student, config, _ctx(teacher, tmp_path, calibration=_too_small))
    assert result.notes["data"] == "teacher-generated" and result.notes["distinct_windows"] == 8
    assert result.notes["kl_after"] < result.notes["kl_before"]
    refuse = DistillConfig(**FAST, tokens=8 * 4 * 32, generated_windows=0)
    with pytest.raises(InputError, match="or set distill.generated_windows"):
        STAGES.get("distill").run(student, refuse, _ctx(teacher, tmp_path, calibration=_too_small))


@pytest.mark.parametrize("symmetric", [True, False])
def test_fake_quantization_rounds_to_the_grid_and_passes_gradients_straight_through(symmetric):
    w = torch.randn(8, 64, requires_grad=True)
    q = fake_quant.fake_quantize(w.detach(), 4, 32, symmetric)
    for group in q.view(8, 2, 32).flatten(0, 1):
        assert group.unique().numel() <= 16  # 4-bit codes
    assert float((q - w.detach()).abs().max()) < float(w.detach().abs().max()) / 7
    ste = fake_quant._StraightThrough(FakeQuant(4, 32, symmetric))
    out = ste(w)
    torch.testing.assert_close(out, q)
    out.sum().backward()
    torch.testing.assert_close(w.grad, torch.ones_like(w))


def test_quantization_aware_distillation_recovers_fake_quantized_kl(teacher_student, tmp_path):
    teacher, student = teacher_student
    config = DistillConfig(**FAST, tokens=20 * 4 * 32, fake_quant=FakeQuant(4, 32, symmetric=False))
    result = STAGES.get("distill").run(student, config, _ctx(teacher, tmp_path))
    assert "4-bit fake quantization" in result.notes["kl_measured_on"]
    assert result.notes["kl_after"] < 0.8 * result.notes["kl_before"]
    # The returned model is plain again: latent weights, no parametrization left behind.
    assert not any("parametrizations" in k for k in result.model.state_dict())
    assert type(result.model).__name__ == "LlamaForCausalLM"
