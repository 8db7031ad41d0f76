"""Latency and footprint of one artifact on its runtime, measured in a child process.

The parent (`measure_latency`) starts `python -m runtimes.latency`, sends the request as JSON on stdin
and reads one JSON object from stdout. The child loads the artifact, then for warm-up + repeats runs:
reset -> prefill the fixed prompt (time to first token; only the last position's logits where the runtime can skip
the others, as an app's prompt processing does: runtimes/base.prompt_logits) -> greedy-decode a fixed number of tokens.
Reported: load time, median TTFT, prefill tok/s, decode tok/s over the repeats, the inter-token latency
(each decode step timed; p50 and p95 over all the repeats' steps), and the child's peak RSS (the whole process: interpreter and imports included; `rss_before_load_mb` is that baseline).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from compress.runtimes.base import process_env, prompt_logits

from compress.artifact import Artifact
from compress.errors import RuntimeUnavailable


def measure_latency(runtime: str, artifact: Artifact, threads: int, prompt_ids: list[int], decode_tokens: int,
                    warmup: int, repeats: int, timeout_s: float = 1800,
                    depths: tuple[int, ...] = ()) -> dict[str, Any]:
    """`depths`: also time decoding after that many tokens are in the cache (decode_tok_s_at_depth); a depth the
    artifact's context cannot hold with the decoded tokens is listed in depths_not_measured."""
    request = {"runtime": runtime, "artifact": artifact.to_data(), "root": str(artifact.path.parent),
               "threads": threads, "prompt_ids": prompt_ids, "decode_tokens": decode_tokens,
               "warmup": warmup, "repeats": repeats, "depths": list(depths)}
    from compress.runtimes import RUNTIMES

    env = {**os.environ, **process_env(RUNTIMES.get(runtime))}
    try:
        proc = subprocess.run([sys.executable, "-P", "-m", "compress.runtimes.latency"], input=json.dumps(request),
                              capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        raise RuntimeUnavailable(f"latency measurement on {runtime} did not finish in {timeout_s:.0f} s") from None
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeUnavailable(f"latency child for {runtime} failed (exit {proc.returncode}): {tail}")
    result = json.loads(lines[-1])
    if "error" in result:
        raise RuntimeUnavailable(result["error"])
    return result


def _peak_rss_mb() -> float:
    """This process's peak RSS. Linux's ru_maxrss survives fork+exec, so a child started from a large
    parent would report the parent's footprint; VmHWM belongs to the new address space and resets at exec."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 1024 * 1024)


def _decode_at(session: Any, prompt: list[int], depth: int, n: int) -> float:
    """Seconds for `n` greedy decode steps after `depth` tokens are in the cache (the prompt repeated, fed in
    prompt-sized chunks, each computing its last position's logits only), as llama-bench's n_depth does."""
    import numpy as np

    session.reset()
    context = (prompt * (depth // len(prompt) + 1))[:depth]
    for start in range(0, depth, len(prompt)):
        logits = prompt_logits(session, context[start:start + len(prompt)])
    token = int(np.argmax(logits))
    t0 = time.perf_counter()
    for _ in range(n):
        token = int(np.argmax(session.decode(token)))
    return time.perf_counter() - t0


def _run(request: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    from compress.runtimes import RUNTIMES

    runtime = RUNTIMES.get(request["runtime"])
    available = runtime.availability()
    if not available.ok:
        return {"error": f"runtime {request['runtime']} unavailable: {available.reason}"}
    artifact = Artifact.from_data(request["artifact"], Path(request["root"]))
    rss_before = _peak_rss_mb()
    start = time.perf_counter()
    session = runtime.load(artifact, request["threads"])
    load_s = time.perf_counter() - start
    prompt, n = request["prompt_ids"], request["decode_tokens"]
    ttft, decode_s, steps = [], [], []
    for i in range(request["warmup"] + request["repeats"]):
        session.reset()
        t0 = time.perf_counter()
        token = int(np.argmax(prompt_logits(session, prompt)))
        t1 = time.perf_counter()
        ticks = [t1]
        for _ in range(n):
            token = int(np.argmax(session.decode(token)))
            ticks.append(time.perf_counter())
        if i >= request["warmup"]:
            ttft.append(t1 - t0)
            decode_s.append(ticks[-1] - t1)
            steps += np.diff(ticks).tolist()  # each decode step: the inter-token latency an app sees
    ttft_med, decode_med = statistics.median(ttft), statistics.median(decode_s)
    itl_p50, itl_p95 = (float(np.percentile(steps, q)) * 1000 for q in (50, 95)) if steps else (None, None)
    at_depth, skipped = {}, {}
    for depth in request.get("depths", ()):
        if depth + n > session.max_context:
            skipped[str(depth)] = f"needs {depth + n} positions; the artifact holds {session.max_context}"
            continue
        at_depth[str(depth)] = n / statistics.median(_decode_at(session, prompt, depth, n)
                                                     for _ in range(request["repeats"]))
    return {
        "load_s": load_s,
        "ttft_s": ttft_med,
        "prefill_tok_s": len(prompt) / ttft_med,
        "decode_tok_s": n / decode_med,
        "decode_ms_per_token": 1000 * decode_med / n,
        "itl_p50_ms": itl_p50,
        "itl_p95_ms": itl_p95,
        "decode_tok_s_at_depth": at_depth,  # {depth: tok/s}, each the median of `repeats` runs
        "depths_not_measured": skipped,
        "prefill_len": len(prompt),
        "decode_tokens": n,
        "warmup": request["warmup"],
        "repeats": request["repeats"],
        "ttft_all_s": ttft,
        "decode_all_s": decode_s,
        "rss_before_load_mb": rss_before,
        "peak_rss_mb": _peak_rss_mb(),
        # What the child ran under, as it saw it (the runtime's `process_env`): part of how the number was made.
        "process_env": {k: os.environ.get(k) for k in process_env(runtime)},
    }


def main() -> None:
    request = json.loads(sys.stdin.read())
    try:
        result = _run(request)
    except Exception as err:  # reported to the parent as one line; it raises RuntimeUnavailable
        where = f"{request['runtime']} on {request['artifact']['path']}"
        result = {"error": f"latency run of {where} failed: {type(err).__name__}: {err}"}
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
