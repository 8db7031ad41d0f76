"""GGUF file types through llama.cpp, measured by the shared harness against the fp32 reference.

    python scripts/gguf_sweep.py [--model smollm2-135m] [--types f32,f16,q8_0,q4_0,q4_k_m] [--rounds 2] [--out r.json]

Each type is exported by exporters/gguf.py from the same fp32 reference and run by runtimes/llamacpp.py; the
source GGUF of the catalog model (Q4_1) is run as a peer. Accuracy: the harness's default eval set (8 x 256
tokens, 4 greedy prompts). Latency: runtimes/latency.py's child process (128-token prompt, 64 decode tokens,
1 warm-up + 5 repeats), all artifacts in alternating rounds; the median over rounds is reported with its
ratio to Q4_0 from the same run, because this machine's speed drifts. Needs llama-cpp-python (the
`llamacpp` extra). `compress bench` supersedes this once it exists.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from compress import models
from compress.artifact import Artifact
from compress.data.corpus import build_eval_set
from compress.export_options import GgufOptions, GgufType
from compress.models.default import CATALOG
from compress.progress import Console
from compress.targets import EvalSpec, Format
from exporters.gguf import GgufExporter, describe_gguf
from runtimes.harness import measure_accuracy, run_reference
from runtimes.latency import measure_latency
from runtimes.llamacpp import LlamaCppRuntime
from runtimes.torch_eager import TorchEagerRuntime

QUIET = Console(quiet=True)


def sweep(args: argparse.Namespace, loaded: Any, eval_set: Any, ref: Any, work: Path) -> dict[str, dict]:
    spec, stops = EvalSpec(), {loaded.tokenizer.eos_token_id}
    artifacts: dict[str, Artifact] = {}
    for name in args.types.split(","):
        artifacts[name] = GgufExporter().export(loaded.model, loaded.tokenizer, GgufOptions(file_type=GgufType(name)),
                                                work / f"{name}.gguf", QUIET)
    if args.model in CATALOG:  # the source GGUF, exactly as shipped: a peer
        source = CATALOG[args.model].model_dir() / Path(CATALOG[args.model].member).name
        artifacts["source Q4_1 (peer)"] = Artifact(source, Format.GGUF, (source.name,),
                                                   {"max_context": 2048, **describe_gguf(source)})
    results: dict[str, dict] = {}
    for name, art in artifacts.items():
        session = LlamaCppRuntime().load(art, args.threads)
        m, _ = measure_accuracy(session, ref, eval_set, spec.greedy_tokens, stops, loaded.tokenizer.decode, QUIET)
        del session
        results[name] = {**m, "size_mb": art.size_bytes() / 1e6, "tensor_type_counts": art.extra["tensor_type_counts"],
                         "prefill_all": [], "decode_all": []}
        print(f"{name}: {results[name]['size_mb']:.1f} MB, KL {m['mean_kl']:.4f}", flush=True)
    for _ in range(args.rounds):
        for name, art in artifacts.items():
            lat = measure_latency("llamacpp", art, args.threads, list(eval_set.latency_prompt), spec.decode_tokens,
                                  spec.warmup, spec.repeats)
            results[name]["prefill_all"].append(lat["prefill_tok_s"])
            results[name]["decode_all"].append(lat["decode_tok_s"])
            results[name]["peak_rss_mb"] = lat["peak_rss_mb"]
    for r in results.values():
        r["prefill_tok_s"] = statistics.median(r["prefill_all"]) if r["prefill_all"] else None
        r["decode_tok_s"] = statistics.median(r["decode_all"]) if r["decode_all"] else None
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--types", default="f32,f16,q8_0,q4_0,q4_k_m")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="alternating latency rounds; 0 skips latency")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = models.load_spec(args.model, QUIET)
    spec = EvalSpec()
    eval_set = build_eval_set(loaded.tokenizer, spec)
    stops = {loaded.tokenizer.eos_token_id}
    ref = run_reference(TorchEagerRuntime.session_for(loaded.model), eval_set, spec.greedy_tokens, stops, QUIET)
    with tempfile.TemporaryDirectory(prefix="gguf-sweep-") as tmp:  # ~1 GB of GGUFs, removed at the end
        results = sweep(args, loaded, eval_set, ref, Path(tmp))
    base = results.get("q4_0", {})
    print("| GGUF | size MB | mean KL | p99 KL | top-1 | PPL ratio | greedy | prefill tok/s | decode tok/s | "
          "vs q4_0 (prefill / decode) |\n|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        speed, ratio = "n/a | n/a", "n/a"
        if r["decode_tok_s"]:
            speed = f"{r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f}"
            if base.get("decode_tok_s"):
                ratio = f"{r['prefill_tok_s'] / base['prefill_tok_s']:.2f} / {r['decode_tok_s'] / base['decode_tok_s']:.2f}"
        print(f"| {name} | {r['size_mb']:.1f} | {r['mean_kl']:.4f} | {r['p99_kl']:.3f} | {r['top1_agreement']:.3f} | "
              f"{r['perplexity_ratio']:.3f} | {r['greedy_match_mean']:.1f} | {speed} | {ratio} |")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2, default=float))


if __name__ == "__main__":
    main()
