"""Decode/prefill speed of a built target against llama.cpp on the same model, same prompt, same threads.

    python scripts/bench_vs_llamacpp.py [--build out/android] [--gguf FILE] [--threads 2] [--rounds 3]
           [--install-llamacpp]

Any build directory works (android .pte on ExecuTorch, web/desktop ONNX on ONNX Runtime, ...): the artifact
runs on its target's runtime through the harness's latency child, exactly as `compress build` measures it.

The peer is llama.cpp (llama-cpp-python) on the default model's source GGUF (Q4_1), in its own virtual
environment `.venv-bench` (llama-cpp-python compiles llama.cpp on install: ~10 minutes on 2 cores;
`--install-llamacpp` does it). Both runtimes get the harness's latency prompt as token ids and run in
child processes, alternating over `--rounds` so a noisy machine hits both alike; each round reports
medians over its repeats and the summary is the median of the rounds. Printed as a ratio to llama.cpp,
because absolute numbers on shared machines drift.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH_VENV = REPO / ".venv-bench"
LLAMACPP = "llama-cpp-python==0.3.36"


def _llamacpp_python(install: bool) -> Path:
    python = BENCH_VENV / "bin" / "python"
    if not python.exists() or subprocess.run([python, "-c", "import llama_cpp"], check=False, capture_output=True).returncode:
        if not install:
            sys.exit(f"llama-cpp-python is not installed in {BENCH_VENV}; re-run with --install-llamacpp")
        subprocess.run([sys.executable, "-m", "venv", BENCH_VENV], check=True)
        subprocess.run([python, "-m", "pip", "install", LLAMACPP, "numpy"], check=True)
    return python


def _llamacpp_latency(python: Path, gguf: Path, prompt: list[int], args: argparse.Namespace) -> dict:
    request = {"gguf": str(gguf), "threads": args.threads, "n_ctx": 512, "prompt_ids": prompt,
               "decode_tokens": args.decode_tokens, "warmup": 1, "repeats": args.repeats}
    proc = subprocess.run([python, REPO / "scripts" / "llamacpp_latency.py"], input=json.dumps(request),
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", type=Path, default=REPO / "out" / "android")
    parser.add_argument("--gguf", type=Path, default=None, help="default: the catalog model's source GGUF")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--install-llamacpp", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()

    from compress import models
    from compress.data.corpus import build_eval_set
    from compress.manifest import Manifest
    from compress.models.default import DEFAULT_MODEL, get
    from compress.progress import Console
    from compress.targets import parse_target
    from runtimes.latency import measure_latency

    manifest = Manifest.read(args.build)
    manifest.check_files(args.build)
    target = parse_target(manifest.target["spec"], manifest.target["name"])
    artifact = manifest.artifact_obj(args.build)
    gguf = args.gguf or get(DEFAULT_MODEL).model_dir() / Path(get(DEFAULT_MODEL).member).name
    loaded = models.load(models.resolve(manifest.model["reopen"], Console(quiet=True)))
    prompt = list(build_eval_set(loaded.tokenizer, target.eval).latency_prompt)
    python = _llamacpp_python(args.install_llamacpp)

    runtime = target.runtime.name.value
    rounds: dict[str, list[dict]] = {runtime: [], "llama.cpp": []}
    for r in range(args.rounds):
        rounds[runtime].append(measure_latency(runtime, artifact, args.threads, prompt,
                                                    args.decode_tokens, 1, args.repeats))
        rounds["llama.cpp"].append(_llamacpp_latency(python, gguf, prompt, args))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{k} decode {v[-1]['decode_tok_s']:.1f} tok/s prefill {v[-1]['prefill_tok_s']:.0f} tok/s"
            for k, v in rounds.items()), file=sys.stderr)
    summary = {k: {m: statistics.median(x[m] for x in v) for m in ("decode_tok_s", "prefill_tok_s", "load_s",
                                                                  "peak_rss_mb")} for k, v in rounds.items()}
    et, peer = summary[runtime], summary["llama.cpp"]
    result = {"threads": args.threads, "prompt_tokens": len(prompt), "decode_tokens": args.decode_tokens,
              "rounds": args.rounds, "repeats": args.repeats, "summary": summary,
              "runtime": runtime, "artifact_size_mb": artifact.size_bytes() / 1e6, "gguf_size_mb": gguf.stat().st_size / 1e6,
              "decode_ratio": et["decode_tok_s"] / peer["decode_tok_s"],
              "prefill_ratio": et["prefill_tok_s"] / peer["prefill_tok_s"], "raw": rounds}
    print("| runtime | size MB | prefill tok/s | decode tok/s | peak RSS MB |\n|---|---|---|---|---|")
    print(f"| {runtime} {artifact.format.value} ({manifest.target['name']}) | {result['artifact_size_mb']:.0f} | {et['prefill_tok_s']:.0f} | "
          f"{et['decode_tok_s']:.1f} | {et['peak_rss_mb']:.0f} |")
    print(f"| llama.cpp {gguf.name} | {result['gguf_size_mb']:.0f} | {peer['prefill_tok_s']:.0f} | "
          f"{peer['decode_tok_s']:.1f} | {peer['peak_rss_mb']:.0f} |")
    print(f"\ndecode ratio {result['decode_ratio']:.2f}x, prefill ratio {result['prefill_ratio']:.2f}x "
          f"(medians of {args.rounds} alternating rounds x {args.repeats} repeats, {args.threads} threads)")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
