"""Shared fixtures. Every test gets its own COMPRESS_HOME unless it asks for the real model's cache."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parent.parent
# The real model's cache: the user's own (or CI's) COMPRESS_HOME, captured before tests isolate theirs.
REAL_HOME = Path(os.environ.get("COMPRESS_HOME") or Path.home() / ".cache" / "compress")


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Path:
    home = REAL_HOME if "real_home" in request.fixturenames else tmp_path / "compress-home"
    monkeypatch.setenv("COMPRESS_HOME", str(home))
    return home


@pytest.fixture
def real_home() -> Path:
    """Use the persistent cache, where the default model is fetched once and reused."""
    return REAL_HOME


@pytest.fixture(scope="session")
def smollm2():
    """The real default model loaded once per session from the persistent cache (fetched there on first use).
    Tests must not modify it (copy it first): every slow test shares this one instance."""
    from compress import models
    from compress.home import compress_home
    from compress.progress import Console

    old = os.environ.get("COMPRESS_HOME")
    os.environ["COMPRESS_HOME"] = str(REAL_HOME)  # the autouse isolated_home fixture is function-scoped
    try:
        assert compress_home() == REAL_HOME
        yield models.load_spec("smollm2-135m", Console(quiet=True))
    finally:
        if old is None:
            os.environ.pop("COMPRESS_HOME", None)
        else:
            os.environ["COMPRESS_HOME"] = old


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from compress.models.tiny import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama", seed=0)


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> CliResult:
    """Run the real `compress` entry point in a child process, as a user would."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "compress.cli", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd or REPO, timeout=1800)
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture
def cli():
    return run_cli
