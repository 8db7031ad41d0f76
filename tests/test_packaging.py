"""A wheel, installed without the repository on the path, is the whole tool: one top-level package, the shipped
targets file inside it, and a target that builds from it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """`pip wheel .` then `pip install --target`: a non-editable install in a directory of its own."""
    root = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "--wheel-dir", str(root / "dist"), str(REPO)], check=True, capture_output=True, cwd=root)
    wheel, = (root / "dist").glob("compress-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target",
                    str(root / "site"), str(wheel)], check=True, capture_output=True, cwd=root)
    return root


def _run(installed: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Python started outside the repository with only the installed wheel ahead of site-packages."""
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=installed,
                          env={**os.environ, "PYTHONPATH": str(installed / "site"), **(env or {})})


def test_the_wheel_holds_one_top_level_package_and_the_targets_file(installed):
    wheel, = (installed / "dist").glob("compress-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"compress"}
    assert {"compress/targets.yaml", "compress/exporters/onnx.py", "compress/runtimes/harness.py"} <= set(names)


def test_the_installed_package_reads_its_targets_and_builds_a_target(installed, tmp_path):
    code = ("import compress, compress.exporters, compress.runtimes, json; "
            "from compress.targets import load_targets; "
            "print(json.dumps([compress.__file__, compress.exporters.__file__, sorted(load_targets().targets)]))")
    probe = _run(installed, "-c", code)
    assert probe.returncode == 0, probe.stderr
    where, exporters, targets = json.loads(probe.stdout)
    assert where.startswith(str(installed / "site")) and exporters.startswith(str(installed / "site"))
    assert {"android", "web", "ios", "desktop", "reference"} <= set(targets)

    from compress.models.tiny import save_tiny_llama

    model = save_tiny_llama(tmp_path / "tiny", seed=0)
    out = tmp_path / "out"
    build = _run(installed, "-c", "from compress.cli import main; main()", "build", "--target", "reference",
                 "--model", str(model), "--out", str(out), env={"COMPRESS_HOME": str(tmp_path / "home")})
    assert build.returncode == 0, build.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    # The same fp32 weights through the same eager code; the reference target's budgets allow fp32 noise (1e-6), and
    # one clean-clone CI run measured 2.6e-9 here (every other run 0.0). Why is not established: same weights, same
    # code; kernel paths that depend on the tensors' allocation are a guess, not a finding.
    assert manifest["verdict"] == "pass" and manifest["verification"]["metrics"]["mean_kl"] < 1e-6
