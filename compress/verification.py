"""Verify one artifact against the fp32 reference on the target's own runtime, and gate on its budgets.

Used by `compress build` (after export) and `compress verify OUT_DIR` (re-verification).
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from compress.artifact import Artifact
from compress.data.corpus import build_eval_set
from compress.errors import CompressError, InputError, RuntimeUnavailable, VerificationFailed
from compress.gate import check_budgets
from compress.models import LoadedModel
from compress.runtimes import RUNTIMES
from compress.runtimes.base import ContextOverflow, runtime_bounds
from compress.runtimes.harness import (
    BoundRun,
    ReferenceRun,
    Verification,
    measure_accuracy,
    measure_windows,
    measured_on,
    run_reference,
)
from compress.runtimes.latency import measure_latency
from compress.runtimes.torch_eager import TorchEagerRuntime
from compress.targets import TargetSpec
from compress.threads import torch_threads

# What a bound's pass measures that budgets gate on (the teacher-forced metrics; no greedy pass, no latency).
BOUND_METRICS = ("mean_kl", "p99_kl", "top1_agreement", "perplexity_ratio")
# What the latency child measures that a build records as metrics (compress.gate's speed budgets name them).
LATENCY_METRICS = ("load_s", "ttft_s", "prefill_tok_s", "decode_tok_s", "itl_p50_ms", "itl_p95_ms", "peak_rss_mb")


def stop_ids(tokenizer: Any) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    return {int(i) for i in ids}


def check_prompts_fit(eval_set: Any, spec: Any, max_context: int | None) -> None:
    """The greedy check's longest prompt plus its generated tokens fit the artifact's context."""
    longest_prompt = max(len(p) for p in eval_set.prompt_ids) + spec.greedy_tokens
    if max_context is not None and longest_prompt > max_context:
        raise InputError(f"a prompt plus {spec.greedy_tokens} greedy tokens needs {longest_prompt} positions; "
                         f"export.max_context is {max_context}")


def verify_artifact(target: TargetSpec, artifact: Artifact, reference: LoadedModel, console: Any,
                    eval_data: str | None = None, threads: int | None = None,
                    reload: Callable[[], LoadedModel] | None = None) -> Verification:
    """With `reload`, `reference.model` may be None: the fp32 model is read by `reload` for the reference run and
    let go before the artifact is loaded, so the two are never in memory together (at 1B: 4.9 GB)."""
    runtime_name = target.runtime.name
    runtime = RUNTIMES.get(runtime_name)
    available = runtime.availability()
    if not available.ok:
        raise RuntimeUnavailable(f"runtime {runtime_name!r} is unavailable: {available.reason}")
    threads = threads or target.runtime.threads
    spec = target.eval
    with console.step("Preparing the evaluation set") as step:
        eval_set = build_eval_set(reference.tokenizer, spec, eval_data)
        step["detail"] = f"{len(eval_set.windows)} windows x {len(eval_set.windows[0])} tokens, " \
                         f"{len(eval_set.prompts)} prompts"
    stops = stop_ids(reference.tokenizer)
    max_context = artifact.max_context or target.export.max_context
    check_prompts_fit(eval_set, spec, max_context)
    try:
        with torch_threads(threads):
            if reload is not None:
                with console.step("Loading the fp32 reference again"):
                    model = reload().model
            else:
                model = reference.model
            with console.step("Running the fp32 reference (eager PyTorch)"):
                ref = run_reference(TorchEagerRuntime.session_for(model, max_context), eval_set, spec.greedy_tokens,
                                    stops, console)
            del model  # the reference's outputs are all the rest reads; a reloaded model is freed here
            gc.collect()
            with console.step(f"Loading the artifact on {runtime_name} ({threads} threads)"):
                try:
                    session = runtime.load(artifact, threads)
                except CompressError:
                    raise
                except Exception as err:  # noqa: BLE001  whatever the runtime raises, it refused the artifact
                    first = (str(err).strip().splitlines() or [""])[0]
                    raise VerificationFailed(f"{runtime_name} refused to load the artifact: "
                                             f"{type(err).__name__}: {first}") from None
            with console.step(f"Measuring accuracy on {runtime_name}") as step:
                decode = lambda ids: reference.tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
                metrics, samples = measure_accuracy(session, ref, eval_set, spec.greedy_tokens, stops, decode,
                                                    console)
                step["detail"] = f"mean KL {metrics['mean_kl']:.3g}, top-1 {metrics['top1_agreement']:.4f}, " \
                                 f"PPL ratio {metrics['perplexity_ratio']:.4f}"
            del session  # the bound loads its own; the MIL program's op graph is cyclic, hence the collection
            gc.collect()
            bound = _bound_run(runtime, artifact, threads, spec, eval_set, ref, console) \
                if spec.arithmetic_bound is not None else None
    except ContextOverflow as err:
        raise InputError(f"evaluation does not fit the artifact's context: {err}") from None
    metrics["size_mb"] = artifact.size_bytes() / 1e6
    latency: dict[str, Any] = {}
    unmeasured: dict[str, str] = {}
    if spec.latency and not available.latency_unmeasured:
        with console.step(f"Measuring latency on {runtime_name} in a child process "
                          f"({spec.warmup} warm-up + {spec.repeats} repeats)") as step:
            latency = measure_latency(runtime_name, artifact, threads, list(eval_set.latency_prompt),
                                      spec.decode_tokens, spec.warmup, spec.repeats)
            step["detail"] = f"prefill {latency['prefill_tok_s']:.0f} tok/s, decode " \
                             f"{latency['decode_tok_s']:.1f} tok/s, peak RSS {latency['peak_rss_mb']:.0f} MB"
        for key in LATENCY_METRICS:
            metrics[key] = latency[key]
    else:
        reason = available.latency_unmeasured or "latency disabled (eval.latency: false)"
        for key in LATENCY_METRICS:
            unmeasured[key] = reason
    budgets = check_budgets(target.budgets, metrics, unmeasured)
    if bound is not None:  # the same accuracy budgets, held under the bound's arithmetic too
        budgets += [replace(b, name=f"{b.name} ({bound.name} bound)")
                    for b in check_budgets(target.budgets, bound.metrics, {}) if b.metric in BOUND_METRICS]
    return Verification(runtime_name, threads, metrics, budgets, samples, eval_set.summary(), measured_on(threads),
                        latency, bound)


def _bound_run(runtime: Any, artifact: Artifact, threads: int, spec: Any, eval_set: Any, ref: ReferenceRun,
               console: Any) -> BoundRun:
    """The teacher-forced pass again, with the runtime in the bound's arithmetic, on the first windows."""
    name = spec.arithmetic_bound
    windows = spec.bound_windows or len(eval_set.windows)
    with console.step(f"Measuring accuracy on {runtime.name} under the {name} bound ({windows} windows)") as step:
        session = runtime.load(artifact, threads, bound=name)
        metrics = measure_windows(session, ref.logits[:windows], eval_set.windows[:windows], console,
                                  f"{name} windows")
        step["detail"] = f"mean KL {metrics['mean_kl']:.3g}, top-1 {metrics['top1_agreement']:.4f}, " \
                         f"PPL ratio {metrics['perplexity_ratio']:.4f}"
    return BoundRun(name, runtime_bounds(runtime)[name], windows, metrics, step["seconds"])
