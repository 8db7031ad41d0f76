from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from compress.exporters.safetensors import SafetensorsOptions

from compress import build, models
from compress.build import BuildRequest, run_stages
from compress.cache import StageCache
from compress.progress import Console
from compress.quantized import QuantizeConfig
from compress.registry import Registry
from compress.stages import StageResult
from compress.stages.configs import PruneConfig, StageKind
from compress.targets import ExportSpec, RuntimeSpec, StageSpec, TargetSpec

QUIET = Console(quiet=True)


def test_an_entry_appears_only_when_its_writer_completes(tmp_path: Path):
    cache = StageCache(tmp_path)
    key = cache.key("x", 1)
    with pytest.raises(RuntimeError):
        with cache.write(key, {}) as entry:
            (entry / "half.bin").write_bytes(b"partial")
            raise RuntimeError("crash in the middle")
    assert cache.lookup(key) is None
    assert not list(tmp_path.rglob("*half.bin*"))
    with cache.write(key, {"notes": "ok"}) as entry:
        (entry / "full.bin").write_bytes(b"complete")
    found = cache.lookup(key)
    assert found is not None and (found / "full.bin").read_bytes() == b"complete"
    assert cache.info(key)["notes"] == "ok"
    assert cache.key("x", 1) == key != cache.key("x", 2)


def test_a_killed_writer_leaves_no_entry_and_its_leftovers_are_swept(tmp_path: Path):
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from compress.cache import StageCache
        cache = StageCache(Path({str(tmp_path)!r}))
        with cache.write("deadbeef" * 8, {{}}) as entry:
            (entry / "weights.safetensors").write_bytes(b"x" * 1000)
            os.kill(os.getpid(), signal.SIGKILL)  # kill -9 mid-write
    """)
    proc = subprocess.run([sys.executable, "-c", script])
    assert proc.returncode == -9
    cache = StageCache(tmp_path)
    assert cache.lookup("deadbeef" * 8) is None
    assert len(list(tmp_path.glob("*/*.tmp-*"))) == 1
    assert cache.sweep() == 1
    assert not list(tmp_path.glob("*/*.tmp-*"))


class HalveFinalNorm:
    """A real (if simple) model transform, counting its runs."""

    version = "1"

    def __init__(self) -> None:
        self.runs = 0

    def run(self, model, config, ctx):
        self.runs += 1
        out = copy.deepcopy(model)
        with torch.no_grad():
            out.model.norm.weight.mul_(0.5)
        return StageResult(out, {"scaled": 0.5})


class CrashesOnce(HalveFinalNorm):
    def run(self, model, config, ctx):
        if self.runs == 0:
            self.runs += 1
            raise KeyboardInterrupt  # what Ctrl-C does halfway through a build
        return super().run(model, config, ctx)


def test_a_rerun_after_a_crash_resumes_after_the_last_completed_stage(tiny_dir: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch):
    target = TargetSpec(name="t", export=ExportSpec("safetensors", SafetensorsOptions()),
                        runtime=RuntimeSpec("torch_eager"),
                        stages=(StageSpec(StageKind.PRUNE, PruneConfig(mlp_keep=0.5)), StageSpec(StageKind.QUANTIZE,
                                                                                     QuantizeConfig())))
    first, second = HalveFinalNorm(), CrashesOnce()
    registry = Registry("stage")
    registry.register("prune", first)
    registry.register("quantize", second)
    loaded = models.load(models.resolve(str(tiny_dir), QUIET))
    req = BuildRequest(target=target, model=str(tiny_dir), out_dir=tmp_path / "out", targets_file=tmp_path)
    cache = StageCache(tmp_path / "cache")

    with pytest.raises(KeyboardInterrupt):
        run_stages(req, loaded, cache, QUIET, registry)
    assert (first.runs, second.runs) == (1, 1)

    out = run_stages(req, loaded, cache, QUIET, registry)
    model, key, records = out.model, out.key, out.records
    assert (first.runs, second.runs) == (1, 2)  # stage 1 came from the cache
    assert [r["cached"] for r in records] == [True, False]
    assert records[0]["notes"] == {"scaled": 0.5}
    expected = loaded.model.model.norm.weight * 0.25
    torch.testing.assert_close(model.model.norm.weight, expected)

    out = run_stages(req, loaded, cache, QUIET, registry)
    model, again, records = out.model, out.key, out.records
    assert again == key and [r["cached"] for r in records] == [True, True] and (first.runs, second.runs) == (1, 2)
    torch.testing.assert_close(model.model.norm.weight, expected)

    changed = BuildRequest(target=TargetSpec(name="t", export=target.export, runtime=target.runtime, stages=(
        target.stages[0], StageSpec(StageKind.QUANTIZE, QuantizeConfig(group_size=64)))), model=req.model,
        out_dir=req.out_dir, targets_file=req.targets_file)
    out = run_stages(changed, loaded, cache, QUIET, registry)
    other, records = out.key, out.records
    assert other != key and [r["cached"] for r in records] == [True, False]  # a config change reruns its stage

    # An upgraded library is in every key: the whole chain builds afresh, and each entry records what built it.
    upgraded = {**build.tool_versions(), "torch": "99.0"}
    monkeypatch.setattr(build, "tool_versions", lambda: upgraded)
    out = run_stages(req, loaded, cache, QUIET, registry)
    assert out.key != key and [r["cached"] for r in out.records] == [False, False]
    assert (first.runs, second.runs) == (2, 4) and out.records[0]["tools"]["torch"] == "99.0"
    again = run_stages(req, loaded, cache, QUIET, registry)
    assert again.key == out.key and [r["cached"] for r in again.records] == [True, True]
    assert again.records[1]["tools"]["torch"] == "99.0"


def test_the_code_version_follows_the_steps_source(tmp_path: Path, monkeypatch):
    import importlib

    from compress.cache import code_version

    package = tmp_path / "mystages"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "scale.py").write_text("class Scale:\n    version = '1'\n    factor = 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("mystages.scale")
    before = code_version(module.Scale())
    assert before == code_version(module.Scale())  # stable
    (package / "scale.py").write_text("class Scale:\n    version = '1'\n    factor = 3\n")  # same version string
    assert code_version(module.Scale()) != before
    assert code_version(HalveFinalNorm()) != before


def test_a_writer_that_loses_the_rename_race_keeps_the_winner_s_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Another build installs the same entry between this writer's check and its rename: one entry, no leftovers;
    a rename that fails for another reason still raises."""
    import os

    from compress import cache as cache_module

    cache = StageCache(tmp_path)
    real_replace = os.replace

    def other_build_wins(src, dst):
        Path(dst).mkdir()
        (Path(dst) / "entry.json").write_text('{"winner": true}')
        (Path(dst) / "payload").write_text("theirs")
        real_replace(src, dst)  # onto a non-empty directory: OSError, as on a real race

    monkeypatch.setattr(cache_module.os, "replace", other_build_wins)
    with cache.write("k" * 64, {}) as entry:
        (entry / "payload").write_text("ours")
    assert (cache.path("k" * 64) / "payload").read_text() == "theirs"
    assert not list(tmp_path.glob("*/*.tmp-*"))
    monkeypatch.setattr(cache_module.os, "replace", lambda src, dst: (_ for _ in ()).throw(PermissionError(dst)))
    with pytest.raises(PermissionError):
        with cache.write("j" * 64, {}) as entry:
            (entry / "payload").write_text("ours")
