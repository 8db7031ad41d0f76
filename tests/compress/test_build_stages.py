"""`compress build` with prune and distill stages, end to end through the real CLI, on a tiny Llama."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

FAST_EVAL = {"windows": 2, "window_len": 64, "greedy_tokens": 4, "prefill_len": 32, "decode_tokens": 4,
             "warmup": 0, "repeats": 1, "latency": False}


def _targets(tmp_path: Path, stages: list) -> Path:
    path = tmp_path / "targets.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "targets": {"small": {
        "stages": stages, "export": {"format": "safetensors", "dtype": "float32"},
        "runtime": {"name": "torch_eager", "threads": 1}, "eval": FAST_EVAL, "budgets": {"max_mean_kl": 100.0}}}}))
    return path


STAGES = [{"prune": {"mlp_keep": 0.5, "calibration_samples": 4, "calibration_len": 64, "kl_windows": 2}},
          {"distill": {"tokens": 4 * 2 * 64, "batch_size": 2, "seq_len": 64, "learning_rate": 3.0e-3,
                       "warmup_steps": 1, "kl_windows": 2}}]


def test_prune_then_distill_builds_a_smaller_checkpoint_and_records_both_stages(tiny_dir, tmp_path, cli):
    out = tmp_path / "out"
    result = cli("build", "--target", "small", "--model", str(tiny_dir), "--targets", str(_targets(tmp_path, STAGES)),
                 "--out", str(out))
    assert result.code == 0, result.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    prune, distill = manifest["stages"]
    assert prune["kind"] == "prune" and prune["notes"]["mlp_units_per_layer"] == "128 -> 64"
    assert prune["notes"]["params_after"] < prune["notes"]["params_before"] and prune["notes"]["kl_after_prune"] > 0
    assert distill["kind"] == "distill" and distill["notes"]["steps"] == 4 and distill["notes"]["kl_before"] > 0
    config = json.loads((out / "checkpoint" / "config.json").read_text())
    assert config["intermediate_size"] == 64
    # A second build reuses both cached stages.
    again = cli("build", "--target", "small", "--model", str(tiny_dir), "--targets",
                str(_targets(tmp_path, STAGES)), "--out", str(out))
    assert again.code == 0 and "(cached; resuming after it)" in again.stderr


def test_a_prune_that_removes_every_layer_is_one_line_and_exit_2(tiny_dir, tmp_path, cli):
    stages = [{"prune": {"drop_layers": 2}}]
    result = cli("build", "--target", "small", "--model", str(tiny_dir), "--targets", str(_targets(tmp_path, stages)),
                 "--out", str(tmp_path / "out"))
    assert result.code == 2
    assert "error: prune.drop_layers: 2 removes every layer of a 2-layer model; allowed: 0..1" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_same_build_runs_data_parallel_under_torchrun(tiny_dir, tmp_path):
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "compress.cli", "build", "--target", "small", "--model", str(tiny_dir),
                           "--targets", str(_targets(tmp_path, STAGES)), "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("Built ") == 1  # rank 0 alone exports, verifies and writes the manifest
    distill = json.loads((out / "manifest.json").read_text())["stages"][1]["notes"]
    assert distill["ranks"] == 2 and distill["steps"] == 4


def test_a_mixed_precision_build_reports_bits_vs_kl(tiny_dir, tmp_path, cli):
    """The quantize stage's measured bits-vs-KL points reach report.md and `compress report`."""
    out = tmp_path / "out"
    stage = {"quantize": {"algorithm": "rtn", "weight_bits": 4, "group_size": 32, "symmetric": False,
                          "embedding": "int8", "lm_head": "int8", "max_kl": 1.0e-9, "max_avg_bits": 5.0,
                          "calibration_windows": 2, "calibration_len": 64}}
    result = cli("build", "--target", "small", "--model", str(tiny_dir), "--targets", str(_targets(tmp_path, [stage])),
                 "--out", str(out))
    assert result.code == 0, result.stderr[-2000:]
    assert "not reached within max_avg_bits 5.0" in result.stderr
    notes = json.loads((out / "manifest.json").read_text())["stages"][0]["notes"]
    assert notes["max_kl_reached"] is False and 4.0 < notes["avg_code_bits"] <= 5.0
    chosen = len(notes["promoted_to_8bit"])
    for text in ((out / "report.md").read_text(), cli("report", str(out)).stdout):
        assert "### Quantize stage: average code bits vs KL" in text and "**not reached" in text
        rows = [line for line in text.splitlines() if line.endswith("| chosen |")]
        cells = rows[0].split("|") if len(rows) == 1 else []
        assert int(cells[1]) == chosen and abs(float(cells[2]) - notes["avg_code_bits"]) < 1.5e-3
