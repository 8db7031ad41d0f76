"""What drives the accuracy loss of a quantization scheme: each scheme applied with torchao to the export
module, measured by the shared harness (KL, top-1, PPL ratio vs the fp32 reference), in eager PyTorch.

    python scripts/quant_ablation.py [--model smollm2-135m] [--windows 8] [--out results.json]

Eager torchao runs the same integer arithmetic as the lowered program (the shipped 8da4w setting gives
the same KL here as its .pte through the ExecuTorch runtime), but takes seconds per scheme, not minutes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from compress import models
from compress.data.corpus import build_eval_set
from compress.progress import Console
from compress.stages.configs import Activations, Precision, QuantAlgorithm, QuantizeConfig
from compress.targets import EvalSpec
from exporters.llama import AttentionBackend, ExportLlama
from exporters.torchao_quant import apply_plan, plan_linears
from runtimes.harness import measure_accuracy, run_reference
from runtimes.torch_eager import TorchEagerRuntime

DA, NONE = Activations.INT8_DYNAMIC, Activations.NONE
I8, I4, F32 = Precision.INT8, Precision.INT4, Precision.FP32
SCHEMES = {
    "8da4w g32, emb int8, head int4 (shipped v1)": QuantizeConfig(4, 32, True, DA, I8, I4),
    "8da4w g32, emb int8, head int8": QuantizeConfig(4, 32, True, DA, I8, I8),
    "8da4w g32, emb fp32, head fp32": QuantizeConfig(4, 32, True, DA, F32, F32),
    "8da4w g64, emb int8, head int8": QuantizeConfig(4, 64, True, DA, I8, I8),
    "8da4w g32 hqq, emb int8, head int8": QuantizeConfig(4, 32, True, DA, I8, I8, QuantAlgorithm.HQQ),
    "int4 g32 weight-only sym, emb int8, head int8": QuantizeConfig(4, 32, True, NONE, I8, I8),
    "int4 g32 weight-only ASYM, emb int8, head int8": QuantizeConfig(4, 32, False, NONE, I8, I8),
    "8da8w per-channel, emb int8, head int8": QuantizeConfig(8, None, True, DA, I8, I8),
    "int8 weight-only per-channel, emb fp32, head fp32": QuantizeConfig(8, None, True, NONE, F32, F32),
}


class ModuleSession:
    """The Session protocol over an ExportLlama in eager PyTorch (plain-ops attention)."""

    def __init__(self, module: ExportLlama):
        self.module, self.vocab_size, self.max_context, self._pos = module, module.dims.vocab_size, \
            module.max_context, 0

    def reset(self) -> None:
        self._pos = 0

    def prefill(self, ids):
        with torch.inference_mode():
            out = self.module(torch.tensor([list(ids)]), torch.tensor([self._pos]))[0].float().numpy()
        self._pos += len(ids)
        return out

    def decode(self, token_id):
        return self.prefill([token_id])[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--only", default=None, help="substring of the scheme names to run")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    loaded = models.load_spec(args.model, Console(quiet=True))
    spec = EvalSpec(windows=args.windows)
    eval_set = build_eval_set(loaded.tokenizer, spec)
    stops = {loaded.tokenizer.eos_token_id}
    ref = run_reference(TorchEagerRuntime.session_for(loaded.model), eval_set, spec.greedy_tokens, stops,
                        Console(quiet=True))
    results = {}
    print("| scheme | mean KL | p99 KL | top-1 | PPL ratio | greedy match |\n|---|---|---|---|---|---|")
    for name, q in SCHEMES.items():
        if args.only and args.only not in name:
            continue
        start = time.perf_counter()
        module = ExportLlama.from_hf(loaded.model, 512, AttentionBackend.EAGER)
        apply_plan(module, plan_linears(module, q), q)
        m, _ = measure_accuracy(ModuleSession(module), ref, eval_set, spec.greedy_tokens, stops,
                                loaded.tokenizer.decode, Console(quiet=True))
        results[name] = {**m, "seconds": time.perf_counter() - start}
        print(f"| {name} | {m['mean_kl']:.3f} | {m['p99_kl']:.2f} | {m['top1_agreement']:.3f} | "
              f"{m['perplexity_ratio']:.3f} | {m['greedy_match_mean']:.1f} |", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2, default=float))


if __name__ == "__main__":
    main()
