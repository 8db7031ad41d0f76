"""The one orchestrator: load -> stages in order -> export -> verify -> gate, and re-verification.

Every stage's output and the export are cached by content hash, so a re-run after an interruption
resumes from the last completed step. The output directory receives the artifact (installed
atomically), the reports, and `manifest.json`, written last: a directory without one is incomplete.
"""

from __future__ import annotations

import functools
import gc
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from compress import __version__, checkpoint, distributed, gate, memory, models
from compress.artifact import Artifact
from compress.cache import StageCache, code_version
from compress.config import to_data
from compress.data.corpus import build_eval_set, calibration_windows, load_documents
from compress.errors import (
    BudgetBroken,
    CompressError,
    ConfigError,
    ExitCode,
    InputError,
    NotAvailableYet,
    Problem,
    RuntimeUnavailable,
)
from compress.exporters import EXPORTERS
from compress.gate import Verdict
from compress.hashing import sha256_file
from compress.home import compress_home, native_logs_in
from compress.manifest import MANIFEST, Manifest, describe_files, tool_versions
from compress.quantized import QuantizedWeights
from compress.registry import Registry
from compress.report import JUNIT, REPORT_JSON, REPORT_MD, write_failure_junit, write_reports
from compress.runtimes import RUNTIMES
from compress.stages import STAGES, Stage, StageContext
from compress.stages.configs import StageKind
from compress.targets import TargetSpec, load_targets, parse_target
from compress.verification import check_prompts_fit, verify_artifact

BUILD_MARKER = ".compress-build"  # marks a directory compress may overwrite
LOGS = "logs"  # runtimes' native logs while the build is verified (compress.home.native_logs_in)


@dataclass(frozen=True)
class BuildRequest:
    target: TargetSpec
    model: str
    out_dir: Path
    targets_file: Path
    eval_data: str | None = None
    verify: bool = True
    threads: int | None = None
    seed: int = 0
    strict: bool = False  # a budget that cannot be measured here fails the gate
    memory_check: bool = True  # refuse a model whose estimated peak exceeds the memory available


def check_available(target: TargetSpec, verify: bool) -> None:
    """Refuse before any work when a target needs a component this version lacks or cannot run."""
    missing = [f"stage {s.kind.value!r}" for s in target.stages if s.kind.value not in STAGES]
    fmt = target.export.format
    if fmt not in EXPORTERS:
        missing.append(f"exporter for format {fmt!r}")
    if verify and target.runtime.name not in RUNTIMES:
        missing.append(f"runtime {target.runtime.name!r}")
    if missing:
        raise NotAvailableYet(
            f"target {target.name!r} needs {', '.join(missing)}: not available yet in compress {__version__} "
            f"(available: formats {', '.join(EXPORTERS.names())}; stages {', '.join(STAGES.names()) or 'none'}; "
            f"runtimes {', '.join(RUNTIMES.names())})")
    exporter_ok = EXPORTERS.get(fmt).availability()
    if not exporter_ok.ok:
        raise RuntimeUnavailable(f"exporter for {fmt!r} is unavailable: {exporter_ok.reason}")
    if verify:
        runtime_ok = RUNTIMES.get(target.runtime.name).availability()
        if not runtime_ok.ok:
            raise RuntimeUnavailable(f"runtime {target.runtime.name!r} is unavailable: {runtime_ok.reason} "
                                     f"(use --no-verify to build without verifying)")


def check_model(req: BuildRequest, checkpoint: Path, console: Any) -> None:
    """From the model's config alone, before its weights are read: what the target's format cannot hold (RoPE
    scaling, context, block sizes) and whether the build fits this machine's memory."""
    from transformers import LlamaConfig

    config = LlamaConfig.from_pretrained(checkpoint)
    target = req.target
    quantize = next((s.config for s in target.stages if s.kind is StageKind.QUANTIZE), None)
    problems = target.export.options.model_problems(config, quantize)
    if problems:
        raise ConfigError([Problem(f"target {target.name!r} (export.format {target.export.format}): {p.where}",
                                   p.message) for p in problems])
    kinds = {s.kind for s in target.stages}
    work = memory.Work.TRAIN if kinds & {StageKind.PRUNE, StageKind.DISTILL} else \
        memory.Work.QUANTIZE if kinds else memory.Work.EXPORT
    need, have = memory.estimate(config, work), memory.available_bytes()
    if have is None:
        return
    if need.peak_bytes > have and req.memory_check:
        raise InputError(f"target {target.name!r} on this model needs {need.describe()}; this machine has "
                         f"{have / memory.GB:.1f} GB available (--no-memory-check to try anyway)")
    if need.peak_bytes > 0.8 * have:
        console.print(f"  [yellow]memory[/yellow]: the build needs {need.describe()}, close to the "
                      f"{have / memory.GB:.1f} GB available")


def check_out_dir(out_dir: Path) -> None:
    """Refuse an --out the build may not write into, writing nothing."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out {out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / BUILD_MARKER).exists():
        raise InputError(f"--out {out_dir}: exists, is not empty and is not a compress build directory; "
                         f"choose another --out")


def check_text(req: BuildRequest, tokenizer: Any) -> None:
    """The calibration and evaluation text read, decoded and long enough, before any stage or export runs."""
    load_documents(req.eval_data or req.target.eval.data)
    if req.verify:  # and the greedy check's prompts fit the context the export is asked for
        check_prompts_fit(build_eval_set(tokenizer, req.target.eval, req.eval_data), req.target.eval,
                          req.target.export.max_context)


def prepare_out_dir(out_dir: Path) -> None:
    check_out_dir(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / BUILD_MARKER).touch()
    # From here until the new manifest is written, the directory is an incomplete build.
    for name in (MANIFEST, REPORT_MD, REPORT_JSON, JUNIT):
        (out_dir / name).unlink(missing_ok=True)


def _data_identity(source: str) -> str:
    path = Path(source)
    return sha256_file(path) if path.is_file() else source


@dataclass
class StagesOutput:
    model: Any
    quantized: QuantizedWeights | None  # the quantize stage's codes, when the target has that stage
    key: str  # the cache key of the last stage's output (the model's content hash without stages)
    records: list[dict[str, Any]]  # one per stage, for the manifest
    reference_intact: bool = True  # False: a stage that owned the reference changed it (read it again to verify)

    def take_model(self) -> Any:
        """The model, which this output then no longer holds: a taker that drops it frees it (the exporter, which
        lets the fp32 weights go as soon as it has read them)."""
        model, self.model = self.model, None
        return model


def run_stages(req: BuildRequest, loaded: models.LoadedModel, cache: StageCache, console: Any,
               stages: Registry[Stage] = STAGES, world: distributed.World = distributed.World()) -> StagesOutput:
    """Run (or load from the cache) every stage.

    Under torchrun every rank runs every stage (a training stage needs all of them); only rank 0 writes
    the cache, and all ranks decide what is cached before any of them writes.
    """
    calib = req.eval_data or req.target.eval.data
    keys, prev = [], loaded.source.sha256
    tools = tool_versions()  # in every key: an upgraded library builds afresh; each entry records what built it
    for spec in req.target.stages:
        stage = stages.get(spec.kind.value)
        prev = cache.key("stage", prev, spec.kind.value, to_data(spec.config), stage.version, code_version(stage),
                         _data_identity(calib), req.seed, tools)
        keys.append(prev)
    if world.size > 1:
        import torch.distributed as dist

        dist.barrier()
    last_hit = max((i for i, k in enumerate(keys) if cache.lookup(k)), default=-1)
    model, quantized, records, intact = loaded.model, None, [], True
    for i, (spec, key) in enumerate(zip(req.target.stages, keys)):
        title = f"Stage {i + 1}/{len(keys)}: {spec.kind.value}"
        if i <= last_hit:
            info = cache.info(key)
            records.append({"kind": spec.kind.value, "config": to_data(spec.config), "cache_key": key,
                            "cached": True, "seconds": info["seconds"], "notes": info["notes"],
                            "tools": info.get("tools")})
            if i == last_hit:
                with console.step(f"{title} (cached; resuming after it)"):
                    model, quantized = checkpoint.load_stage(cache.path(key))
            continue
        # A stage owns its input unless that is the reference and a later stage still reads it (ctx.reference).
        owns = model is not loaded.model or i == len(keys) - 1
        intact = intact and not (owns and model is loaded.model)
        # Where an owned model's float weights can be read again: the source checkpoint, or the previous stage's
        # cache entry (written by rank 0 alone, so only a single process reads it back).
        saved = loaded.source.checkpoint if model is loaded.model else cache.path(keys[i - 1])
        saved = saved if model is loaded.model or world.size == 1 else None
        ctx = StageContext(seed=req.seed, work_dir=cache.root / "work", console=console, reference=loaded.model,
                           calibration=functools.partial(calibration_windows, loaded.tokenizer, calib),
                           quantized=quantized, owns_model=owns,
                           restore_floats=checkpoint.float_restorer(model, saved) if owns and saved else None)
        with console.step(title) as step:
            start = time.perf_counter()
            result = stages.get(spec.kind.value).run(model, spec.config, ctx)
            seconds = time.perf_counter() - start
            if world.main:
                with cache.write(key, {"kind": spec.kind.value, "seconds": seconds, "notes": result.notes,
                                       "tools": tools}) as entry:
                    checkpoint.save_stage(result.model, result.quantized, entry)
        model, quantized = result.model, result.quantized
        records.append({"kind": spec.kind.value, "config": to_data(spec.config), "cache_key": key, "cached": False,
                        "seconds": step.get("seconds", seconds), "notes": result.notes, "tools": tools})
    return StagesOutput(model, quantized, keys[-1] if keys else loaded.source.sha256, records, intact)


def run_export(req: BuildRequest, staged: StagesOutput, tokenizer: Any, cache: StageCache,
               console: Any) -> tuple[Artifact, dict]:
    """Export (or reuse the cached export) and install the artifact atomically in the output directory."""
    fmt = req.target.export.format
    exporter = EXPORTERS.get(fmt)
    options = req.target.export.options
    key = cache.key("export", staged.key, fmt, to_data(options), exporter.version, code_version(exporter),
                    tool_versions())
    name = exporter.artifact_name
    cached = cache.lookup(key) is not None
    with console.step(f"Export to {fmt}" + (" (cached)" if cached else "")) as step:
        if not cached:
            with cache.write(key, {"kind": "export", "tools": tool_versions()}) as entry:
                art = exporter.export(staged.take_model(), tokenizer, options, entry / name, console,
                                      staged.quantized)
                (entry / "artifact.json").write_text(json.dumps(art.to_data()))
        entry = cache.path(key)
        art = Artifact.from_data(json.loads((entry / "artifact.json").read_text()), entry)
        installed = install_artifact(art, req.out_dir / name)
        step["detail"] = f"{installed.size_bytes() / 1e6:.1f} MB"
    record = {"format": fmt, "options": to_data(options), "cache_key": key, "cached": cached,
              "seconds": step["seconds"], "exporter_version": exporter.version,
              "tools": cache.info(key).get("tools")}  # the versions that wrote the artifact
    return installed, record


def install_artifact(art: Artifact, final: Path) -> Artifact:
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    if art.path.is_dir():
        shutil.copytree(art.path, tmp)
    else:
        shutil.copy2(art.path, tmp)
    if final.is_dir():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return art.at(final)


def _finish(out_dir: Path, manifest: Manifest, verification: Any, target: TargetSpec, console: Any,
            strict: bool = False) -> Manifest:
    if verification is not None:
        data = verification.to_data()
        write_reports(out_dir, data, f"compress {target.name}", manifest.stages)
        manifest.verification = data
        manifest.verdict = gate.verdict(verification.budgets, strict)
    manifest.write(out_dir)
    if manifest.verdict is Verdict.FAIL:
        broken = gate.broken_summary(verification.budgets, strict)
        raise BudgetBroken(f"target {target.name!r}: budget broken ({broken}); "
                           f"see {out_dir / REPORT_MD}")
    said = {Verdict.PASS: "all budgets met", Verdict.UNVERIFIED: "not verified"}[manifest.verdict]
    unmeasured = [b.name for b in verification.budgets if b.passed is None] if verification is not None else []
    if unmeasured:  # a budget this machine cannot measure is not a met one
        said = f"every measured budget met; not measured here: {', '.join(unmeasured)}"
    console.print(f"[bold green]Built[/bold green] {out_dir} ({said}; manifest written last)")
    return manifest


def build(req: BuildRequest, console: Any) -> Manifest | None:
    """The whole pipeline. Under torchrun, ranks other than 0 run the stages only and return None."""
    check_available(req.target, req.verify)
    world = distributed.init_from_env()
    if not world.main:
        from compress.progress import Console

        console = Console(quiet=True)
    else:
        check_out_dir(req.out_dir)
    cache = StageCache(compress_home() / "cache")
    if world.main and (swept := cache.sweep()):
        console.print(f"  removed {swept} incomplete cache entr{'y' if swept == 1 else 'ies'} from an interrupted run")
    with console.step(f"Resolving model {req.model!r}") as step:
        source = models.resolve(req.model, console)
        step["detail"] = f"{source.kind.value}, sha256 {source.sha256[:12]}"
    check_model(req, source.checkpoint, console)
    with console.step("Loading the fp32 reference"):
        loaded = models.load(source)
    check_text(req, loaded.tokenizer)
    if not world.main:
        run_stages(req, loaded, cache, console, world=world)
        return None
    prepare_out_dir(req.out_dir)  # nothing is written to --out until the inputs have been checked
    phase = "stages"
    try:
        staged = run_stages(req, loaded, cache, console, world=world)
        phase = "export"
        # The export reads the stages' model only: where a stage made its own copy, the fp32 reference is let go
        # for the export and read again for the verification (at 1B: 4.9 GB; android's export peak ~20 -> 16.3 GB);
        # where a stage owned the reference and changed it in place, it is read again too.
        released = staged.model is not loaded.model or not staged.reference_intact
        if released:
            loaded = replace(loaded, model=None)
            gc.collect()
        artifact, export_record = run_export(req, staged, loaded.tokenizer, cache, console)
        # The export was the last reader of the model (a cached export did not take it) and of the codes (1.3 GB at
        # 1B): the verification reads the artifact, and of the stages only their records.
        staged = replace(staged, model=None, quantized=None)
        gc.collect()
        phase = "verification"
        # A released reference is read again inside the verification, which lets it go once its outputs are known.
        reload = functools.partial(models.load, source) if released else None
        return _verify_and_finish(req, source, staged, artifact, export_record, loaded, console, reload)
    except BaseException as err:
        if not (req.out_dir / JUNIT).exists():  # a CI reading junit.xml sees the stopped build as a failed test
            write_failure_junit(req.out_dir, f"compress {req.target.name}", phase, err)
        raise


def _verify_and_finish(req: BuildRequest, source: models.ModelSource, staged: StagesOutput, artifact: Artifact,
                       export_record: dict[str, Any], loaded: models.LoadedModel, console: Any,
                       reload: Callable[[], models.LoadedModel] | None = None) -> Manifest:
    manifest = Manifest(
        model=source.to_data(),
        target={"name": req.target.name, "targets_file": str(req.targets_file),
                "targets_sha256": sha256_file(req.targets_file), "spec": req.target.to_data()},
        stages=staged.records, export=export_record,
        artifact={**artifact.to_data(), "file_hashes": describe_files(artifact),
                  "total_bytes": artifact.size_bytes()},
    )
    verification = None
    if req.verify:
        with native_logs_in(req.out_dir / LOGS):
            verification = verify_artifact(req.target, artifact, loaded, console, req.eval_data, req.threads,
                                           reload)
    return _finish(req.out_dir, manifest, verification, req.target, console, req.strict)


@dataclass(frozen=True)
class TargetOutcome:
    """One target of a multi-target build: its exit code and one line (the verdict and headline metrics, or why
    it stopped)."""

    target: str
    out_dir: Path
    exit_code: ExitCode
    line: str


def build_many(reqs: list[BuildRequest], console: Any) -> list[TargetOutcome]:
    """Build several targets one after another; stages with the same inputs run once (the cache shares them).
    Every target's components and output directory are checked before the first one starts."""
    for req in reqs:
        check_available(req.target, req.verify)
        check_out_dir(req.out_dir)
    outcomes = []
    for i, req in enumerate(reqs, 1):
        console.print(f"[bold]Target {i}/{len(reqs)}: {req.target.name}[/bold] -> {req.out_dir}")
        try:
            manifest = build(req, console)
        except CompressError as err:
            first = (str(err).splitlines() or [type(err).__name__])[0]
            outcomes.append(TargetOutcome(req.target.name, req.out_dir, err.exit_code, first))
            console.print(f"  [red]{req.target.name} stopped[/red]: {first}")
            continue
        assert manifest is not None  # the main process
        metrics = (manifest.verification or {}).get("metrics", {})
        shown = [f"{manifest.verdict.value}"] + [f"{label} {metrics[key]:{fmt}}" for key, label, fmt in (
            ("mean_kl", "KL", ".4g"), ("top1_agreement", "top-1", ".3f"), ("size_mb", "MB", ".1f"),
            ("decode_tok_s", "decode tok/s", ".1f")) if metrics.get(key) is not None]
        outcomes.append(TargetOutcome(req.target.name, req.out_dir, ExitCode.OK, ", ".join(shown)))
    return outcomes


def verify_build(out_dir: Path, console: Any, targets_file: Path | None = None, eval_data: str | None = None,
                 threads: int | None = None, strict: bool = False) -> Manifest:
    """Re-run verification of a finished build: same protocol, same gate, same exit codes."""
    manifest = Manifest.read(out_dir)
    with console.step("Checking artifact files against the manifest"):
        manifest.check_files(out_dir)
    name = manifest.target["name"]
    target = load_targets(targets_file).get(name) if targets_file else parse_target(manifest.target["spec"], name)
    artifact = manifest.artifact_obj(out_dir)
    if target.export.format != artifact.format:
        raise InputError(f"target {name!r} now exports {target.export.format!r} but the build holds "
                         f"{artifact.format!r}; rebuild instead")
    check_available(target, verify=True)
    with console.step("Resolving the reference model") as step:
        source = models.resolve(manifest.model["reopen"], console, fresh=True)
        if source.sha256 != manifest.model["sha256"]:
            raise InputError(f"reference model {manifest.model['spec']!r} changed since the build (sha256 "
                             f"{source.sha256[:12]} != {manifest.model['sha256'][:12]}); rebuild instead")
        step["detail"] = f"sha256 {source.sha256[:12]} matches the manifest"
        loaded = models.load(source)
    with native_logs_in(out_dir / LOGS):
        verification = verify_artifact(target, artifact, loaded, console, eval_data, threads)
    (out_dir / MANIFEST).unlink()
    return _finish(out_dir, manifest, verification, target, console, strict)
