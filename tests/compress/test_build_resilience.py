"""Builds that are killed, or run side by side on one cold cache, through the real CLI on a tiny Llama exported
to ExecuTorch: the result is the artifact a clean build writes, byte for byte, and the cache holds no leftovers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("executorch", reason="needs compress[executorch]")

EVAL = {"windows": 2, "window_len": 32, "greedy_tokens": 4, "prefill_len": 16, "decode_tokens": 4, "warmup": 0,
        "repeats": 1, "latency": False}


def _targets(tmp_path: Path) -> Path:
    path = tmp_path / "targets.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "targets": {"edge": {
        "stages": [{"quantize": {"weight_bits": 4, "group_size": 32, "activations": "int8_dynamic",
                                 "algorithm": "rtn", "calibration_windows": 2, "calibration_len": 32}}],
        "export": {"format": "pte", "max_context": 128}, "runtime": {"name": "executorch", "threads": 1},
        "eval": EVAL, "budgets": {"max_mean_kl": 100.0}}}}))
    return path


def _build(tiny_dir: Path, targets: Path, out: Path, home: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "compress.cli", "build", "--target", "edge", "--model",
                             str(tiny_dir), "--targets", str(targets), "--out", str(out)],
                            env={**os.environ, "COMPRESS_HOME": str(home)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _artifact_hashes(out: Path) -> dict[str, str]:
    """sha256 of every artifact file but the sidecar, which also records how long the export's steps took; its
    other fields are compared as data."""
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["verdict"] == "pass"
    hashes = {f["path"]: f["sha256"] for f in manifest["artifact"]["file_hashes"] if f["path"] != "compress-pte.json"}
    sidecar = json.loads((out / manifest["artifact"]["path"] / "compress-pte.json").read_text())
    sidecar.pop("export_seconds")
    return {**hashes, "compress-pte.json": json.dumps(sidecar, sort_keys=True)}


def _leftovers(home: Path) -> list[Path]:
    return list((home / "cache").glob("*/*.tmp-*"))


@pytest.fixture(scope="module")
def clean(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The artifact's files from one uninterrupted build on its own cache."""
    root = tmp_path_factory.mktemp("clean")
    proc = _build(tiny_dir, _targets(root), root / "out", root / "home")
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-2000:]
    hashes = _artifact_hashes(root / "out")
    assert "model.pte" in hashes
    return hashes


def test_a_build_killed_during_its_export_resumes_and_writes_the_clean_build_s_bytes(tiny_dir, tmp_path, clean):
    home, out, targets = tmp_path / "home", tmp_path / "out", _targets(tmp_path)
    proc = _build(tiny_dir, targets, out, home)
    seen = []
    for line in proc.stderr:  # the console's step lines, as they are printed
        seen.append(line)
        if "Export to pte" in line:
            proc.send_signal(signal.SIGKILL)  # kill -9 inside the exporter
            break
    proc.wait(timeout=900)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)[-2000:]
    assert not (out / "manifest.json").exists()
    again = _build(tiny_dir, targets, out, home)
    _, err = again.communicate(timeout=900)
    assert again.returncode == 0, err[-2000:]
    assert "(cached; resuming after it)" in err and "Export to pte" in err
    assert _artifact_hashes(out) == clean
    assert not _leftovers(home)


def test_two_builds_sharing_one_cold_cache_both_succeed_with_the_same_bytes(tiny_dir, tmp_path, clean):
    home, targets = tmp_path / "home", _targets(tmp_path)
    procs = [_build(tiny_dir, targets, tmp_path / f"out{i}", home) for i in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-2000:]
    assert _artifact_hashes(tmp_path / "out0") == _artifact_hashes(tmp_path / "out1") == clean
    assert not _leftovers(home)


def test_prompts_longer_than_the_export_s_context_are_refused_before_any_stage(tiny_dir, tmp_path):
    targets = _targets(tmp_path)
    targets.write_text(targets.read_text().replace("max_context: 128", "max_context: 64"))
    proc = _build(tiny_dir, targets, tmp_path / "out", tmp_path / "home")
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 2 and "greedy tokens needs 74 positions; export.max_context is 64" in err
    assert "Stage 1/1" not in err and not (tmp_path / "out").exists()
