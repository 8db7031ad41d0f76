"""Measure HF checkpoints (e.g. cached stage outputs) in eager PyTorch with the shared harness.

    python scripts/eager_eval.py CHECKPOINT_DIR... [--threads 2]

Prints the harness's accuracy metrics (default eval set: 8 x 256 tokens of the evaluation split, 4 greedy
prompts) against the default model's fp32 reference: what a stage did, before any exporter is involved.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from compress.runtimes.harness import measure_accuracy, run_reference
from compress.runtimes.torch_eager import TorchEagerRuntime

from compress import checkpoint, models
from compress.data.corpus import build_eval_set
from compress.metrics import param_count
from compress.progress import Console
from compress.targets import EvalSpec
from compress.verification import stop_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console(quiet=True)
    loaded = models.load_spec("smollm2-135m", console)
    spec = EvalSpec()
    eval_set = build_eval_set(loaded.tokenizer, spec)
    stops = stop_ids(loaded.tokenizer)
    ref = run_reference(TorchEagerRuntime.session_for(loaded.model), eval_set, spec.greedy_tokens, stops, console)
    for path in args.checkpoints:
        model, _ = checkpoint.load_stage(path)
        metrics, _ = measure_accuracy(TorchEagerRuntime.session_for(model), ref, eval_set, spec.greedy_tokens, stops,
                                      loaded.tokenizer.decode, console)
        keep = ("mean_kl", "p99_kl", "top1_agreement", "perplexity_ratio", "greedy_match_mean")
        print(json.dumps({"checkpoint": str(path), "params": param_count(model),
                          **{k: round(metrics[k], 4) for k in keep}}))


if __name__ == "__main__":
    main()
