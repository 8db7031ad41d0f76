"""docs/github-actions.yml, run as written: its shell steps with its own env, pointed at a tiny model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree as ET

import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = yaml.safe_load((REPO / "docs" / "github-actions.yml").read_text())
EVAL = {"windows": 2, "window_len": 32, "greedy_tokens": 4, "prefill_len": 16, "decode_tokens": 4, "warmup": 0,
        "repeats": 1, "latency": False}


def _job() -> dict:
    return WORKFLOW["jobs"]["build"]


def _step(step_id: str) -> dict:
    return next(s for s in _job()["steps"] if s.get("id") == step_id)


def _run(step_id: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    """The step's `run:` as Actions runs it on Linux (bash --noprofile --norc -eo pipefail), with the job's env
    overridden by `env`, and this interpreter's scripts (the installed `compress`) first on PATH."""
    full = {**os.environ, **{k: str(v) for k, v in _job()["env"].items()}, **env,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", _step(step_id)["run"]],
                          cwd=cwd, env=full, capture_output=True, text=True, timeout=1800)


def _uploaded(out: Path) -> list[Path]:
    """What the upload step's path patterns match under OUT (`**` matches zero or more directories)."""
    upload = next(s for s in _job()["steps"] if str(s.get("uses", "")).startswith("actions/upload-artifact"))
    assert upload["if"] == "always()"  # the reports are kept when the gate fails
    lines = upload["with"]["path"].splitlines()
    assert lines and all(line.startswith("${{ env.OUT }}/**/") for line in lines)
    names = [line.rsplit("/", 1)[-1] for line in lines]
    return sorted(p for name in names for p in out.glob(f"**/{name}"))


def test_the_workflow_checks_builds_gates_and_keeps_the_reports(tiny_dir: Path, tmp_path: Path):
    spec = {"export": {"format": "safetensors"}, "runtime": {"name": "torch_eager", "threads": 1}, "eval": EVAL}
    (tmp_path / "budgets.yaml").write_text(yaml.safe_dump({"version": 1, "targets": {
        "a": {**spec, "budgets": {"max_mean_kl": 1e-6}},
        "b": {**spec, "budgets": {"max_mean_kl": 1e-6, "max_size_mb": 1000}},
        "tiny-size": {**spec, "budgets": {"max_size_mb": 0.001}}}}))  # no checkpoint is that small
    summary = tmp_path / "summary.md"
    env = {"MODEL": str(tiny_dir), "TARGETS_FILE": "budgets.yaml", "OUT": "out", "TARGETS": "a,b",
           "COMPRESS_HOME": str(tmp_path / "home"), "GITHUB_STEP_SUMMARY": str(summary)}
    check = _run("check", env, tmp_path)
    assert check.returncode == 0, check.stderr
    built = _run("build", env, tmp_path)
    assert built.returncode == 0, built.stderr[-2000:]
    assert "compress a: PASS" in summary.read_text() and "compress b: PASS" in summary.read_text()
    kept = _uploaded(tmp_path / "out")
    assert {p.name for p in kept} == {"report.md", "report.json", "manifest.json", "junit.xml"}
    assert {p.parent.name for p in kept} == {"a", "b"}

    failing = {**env, "TARGETS": "tiny-size", "OUT": "out-fail"}
    gated = _run("build", failing, tmp_path)
    assert gated.returncode == 4, gated.stderr[-2000:]  # the job fails on a broken budget
    assert "compress tiny-size: FAIL" in summary.read_text()
    junit = [p for p in _uploaded(tmp_path / "out-fail") if p.name == "junit.xml"]
    cases = {c.get("name"): c for c in ET.parse(junit[0]).getroot().iter("testcase")}
    assert cases["max_size_mb"].find("failure") is not None

    broken = tmp_path / "broken.yaml"
    broken.write_text("version: 1\ntargets: {a: {export: {format: pte}, runtime: onnxruntime}}\n")
    refused = _run("check", {**env, "TARGETS_FILE": "broken.yaml"}, tmp_path)
    assert refused.returncode == 2 and "broken.yaml: targets.a" in refused.stderr


def test_the_install_step_pins_the_cpu_torch_and_installs_the_named_package():
    install = _step("install")["run"]
    assert '"torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu' in install
    assert 'pip install "$COMPRESS_PACKAGE"' in install
    assert _job()["env"]["COMPRESS_PACKAGE"].startswith(".[")
