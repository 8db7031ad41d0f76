from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from compress.exporters.safetensors import SafetensorsExporter, SafetensorsOptions
from compress.runtimes.harness import measure_accuracy, run_reference
from compress.runtimes.latency import measure_latency
from compress.runtimes.torch_eager import TorchEagerRuntime

from compress.artifact import Artifact
from compress.data.corpus import build_eval_set
from compress.gate import Budgets, check_budgets
from compress.models.tiny import byte_tokenizer, tiny_llama
from compress.progress import Console
from compress.targets import EvalSpec, load_targets

QUIET = Console(quiet=True)
SPEC = EvalSpec(windows=4, window_len=96, greedy_tokens=12, prefill_len=32, decode_tokens=8, warmup=1, repeats=3)


def _accuracy(reference, candidate, spec=SPEC):
    tokenizer = byte_tokenizer()
    eval_set = build_eval_set(tokenizer, spec)
    stops = {tokenizer.eos_token_id}
    ref = run_reference(TorchEagerRuntime.session_for(reference), eval_set, spec.greedy_tokens, stops, QUIET)
    return measure_accuracy(TorchEagerRuntime.session_for(candidate), ref, eval_set, spec.greedy_tokens, stops,
                            tokenizer.decode, QUIET)


def test_the_reference_against_itself_gives_kl_zero_and_full_agreement():
    model = tiny_llama(seed=0)
    metrics, samples = _accuracy(model, model)
    assert metrics["mean_kl"] == 0.0 and metrics["p99_kl"] == 0.0
    assert metrics["top1_agreement"] == 1.0 and metrics["perplexity_ratio"] == 1.0
    assert metrics["positions"] == 4 * 96
    assert all(s.match == 12 and s.reference == s.candidate for s in samples)


def _damaged(model, layer: int, scale: float):
    bad = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        w = bad.model.layers[layer].mlp.down_proj.weight
        w.add_(scale * w.std() * torch.randn(w.shape, generator=gen))
    return bad


@pytest.mark.parametrize("target", ["android", "desktop", "web", "ios"])
def test_a_damaged_model_is_caught_by_the_shipped_budgets(target):
    model = tiny_llama(seed=0)
    metrics, _ = _accuracy(model, _damaged(model, layer=1, scale=3.0))
    results = check_budgets(load_targets().get(target).budgets, metrics, {})
    broken = {r.name for r in results if r.passed is False}
    assert "max_mean_kl" in broken, metrics
    assert all(r.margin < 0 for r in results if r.passed is False)


def test_damage_grows_the_divergence_monotonically():
    model = tiny_llama(seed=0)
    kls = [_accuracy(model, _damaged(model, 0, s))[0]["mean_kl"] for s in (0.05, 0.5, 3.0)]
    assert 0 < kls[0] < kls[1] < kls[2]


def test_budget_results_carry_value_limit_margin_and_unmeasured_notes():
    budgets = Budgets(max_mean_kl=0.1, min_top1_agreement=0.9, min_decode_tok_s=10, max_itl_p95_ms=20)
    results = {r.name: r for r in check_budgets(budgets, {"mean_kl": 0.25, "top1_agreement": 0.95, "itl_p95_ms": 25.0},
                                                {"decode_tok_s": "needs macOS"})}
    assert results["max_itl_p95_ms"].passed is False and results["max_itl_p95_ms"].margin == pytest.approx(-5)
    assert results["max_mean_kl"].passed is False and results["max_mean_kl"].margin == pytest.approx(-0.15)
    assert results["min_top1_agreement"].passed is True and results["min_top1_agreement"].margin == pytest.approx(0.05)
    assert results["min_decode_tok_s"].passed is None and results["min_decode_tok_s"].note == "needs macOS"


def test_latency_is_measured_in_a_child_process(tmp_path: Path):
    model = tiny_llama(seed=0)
    artifact = SafetensorsExporter().export(model, byte_tokenizer(), SafetensorsOptions(), tmp_path / "ckpt", QUIET)
    assert artifact.format == "safetensors" and "model.safetensors" in artifact.files
    result = measure_latency("torch_eager", artifact, threads=1, prompt_ids=list(range(32)), decode_tokens=8,
                             warmup=1, repeats=3)
    assert len(result["decode_all_s"]) == 3 and len(result["ttft_all_s"]) == 3
    assert result["prefill_tok_s"] > 0 and result["decode_tok_s"] > 0
    # 3 repeats x 8 steps timed one by one: their median is near the mean step; p95 is at least p50
    assert 0 < result["itl_p50_ms"] <= result["itl_p95_ms"]
    assert result["itl_p50_ms"] < 3 * result["decode_ms_per_token"]
    assert result["peak_rss_mb"] >= result["rss_before_load_mb"] > 0
    missing = Artifact(tmp_path / "gone", "safetensors", ("model.safetensors",))
    from compress.errors import RuntimeUnavailable

    with pytest.raises(RuntimeUnavailable, match="latency run of torch_eager on gone failed: OSError"):
        measure_latency("torch_eager", missing, 1, [1, 2], 2, 0, 1)


def test_the_childs_peak_rss_is_its_own_not_the_parents(tmp_path: Path):
    ballast = bytearray(1536 * 1024 * 1024)  # 1.5 GB touched in the parent: fork+exec must not inherit it
    ballast[:: 4096] = b"x" * len(range(0, len(ballast), 4096))
    artifact = SafetensorsExporter().export(tiny_llama(seed=0), byte_tokenizer(), SafetensorsOptions(),
                                            tmp_path / "ckpt", QUIET)
    result = measure_latency("torch_eager", artifact, 1, list(range(8)), 2, 0, 1)
    assert result["peak_rss_mb"] < 1200, result["peak_rss_mb"]
    del ballast


def test_the_latency_child_runs_the_installed_compress_whatever_the_working_directory(tmp_path: Path, monkeypatch):
    """`python -m` puts the working directory first on sys.path; a folder named compress there (another
    checkout, an old copy) must not be what the child imports."""
    artifact = SafetensorsExporter().export(tiny_llama(seed=0), byte_tokenizer(), SafetensorsOptions(),
                                            tmp_path / "ckpt", QUIET)
    decoy = tmp_path / "elsewhere" / "compress"
    decoy.mkdir(parents=True)
    (decoy / "__init__.py").write_text("raise ImportError('the decoy compress package was imported')\n")
    monkeypatch.chdir(decoy.parent)
    result = measure_latency("torch_eager", artifact, 1, list(range(8)), 2, 0, 1)
    assert result["decode_tok_s"] > 0
