"""The quantize stage's algorithms in eager PyTorch: mean KL against the fp32 model on the harness's evaluation
windows, without exporting. What each algorithm and rotation costs before any runtime adds its own arithmetic.

    python scripts/quant_eager.py [--model smollm2-135m-offgrid] [--fit 32] gptq hqq rtn gptq:rotation

Each variant is ALGORITHM[:rotation][:sym][:mixed][:fp32head][:intzp|:midzp][:sb8] (4-bit, group 32, asymmetric
unless :sym, float zero points unless :intzp (integer) or :midzp (the middle code), fp16 scales unless :sb8, embedding
and lm_head int8, or fp32 with :fp32head; with :rotation the embedding stays fp32, as the stage requires; with
:mixed the stage's sensitivity search spends the whole --max-avg-bits budget on the most sensitive linears at 8
bits). The fit windows come from the corpus's
calibration split, after the 4 the stage measures its own KL on.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from compress.data.corpus import build_eval_set, calibration_windows
from compress.metrics import mean_kl
from compress.models import load_spec
from compress.progress import Console
from compress.quantized import Precision, QuantAlgorithm, QuantizeConfig, Rotation, ZeroPoint
from compress.stages.quant_plan import apply, plan, quantize_model
from compress.stages.rotation import rotate
from compress.stages.sensitivity import KlProbe, promote_until
from compress.targets import EvalSpec


def setup(spec: str, fit: int, threads: int) -> tuple[Any, Any, torch.Tensor, torch.Tensor, list[list[int]]]:
    """The model, its tokenizer, the 8 evaluation windows, its fp32 logits on them, and 4 + `fit` calibration
    windows of 256 tokens (the stage's 4 probe windows first)."""
    torch.set_num_threads(threads)
    loaded = load_spec(spec, Console(quiet=True))
    ids = torch.tensor(build_eval_set(loaded.tokenizer, EvalSpec(), None).windows)  # (8, 256)
    with torch.no_grad():
        reference = loaded.model(ids).logits
    return loaded.model, loaded.tokenizer, ids, reference, calibration_windows(loaded.tokenizer, "pydoc", 4 + fit, 256)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="+")
    parser.add_argument("--model", default="smollm2-135m-offgrid")
    parser.add_argument("--fit", type=int, default=32, help="calibration windows a calibrated algorithm fits on")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-avg-bits", type=float, default=4.5, help="the budget :mixed spends")
    args = parser.parse_args()
    model, _, ids, reference, probe_windows = setup(args.model, args.fit, args.threads)
    probe, fit = KlProbe(model, probe_windows[:4]), probe_windows[4:]
    print("| model | variant | mean KL | seconds |\n|---|---|---|---|")
    for variant in args.variants:
        name, *flags = variant.split(":")
        rotated = "rotation" in flags
        head = Precision.FP32 if "fp32head" in flags else Precision.INT8
        q = QuantizeConfig(algorithm=QuantAlgorithm(name), weight_bits=4, group_size=32, symmetric="sym" in flags,
                           embedding=Precision.FP32 if rotated or "fp32head" in flags else Precision.INT8,
                           lm_head=head,
                           rotation=Rotation.HADAMARD if rotated else Rotation.NONE,
                           max_kl=1e-9 if "mixed" in flags else None, max_avg_bits=args.max_avg_bits,
                           zero_point=ZeroPoint.INTEGER if "intzp" in flags else
                           ZeroPoint.MIDDLE if "midzp" in flags else ZeroPoint.FLOAT,
                           scale_bits=8 if "sb8" in flags else 16)
        start = time.perf_counter()
        base = rotate(model, 0) if rotated else model
        quantized, qw = quantize_model(base, q, None, fit)
        if q.max_kl is not None:
            tensors = dict(qw.tensors)
            promote_until(base, tensors, plan(base, q), q, probe, Console(quiet=True), probe(quantized))
            quantized = apply(base, tensors)
        with torch.no_grad():
            kl = mean_kl(reference, quantized(ids).logits)
        print(f"| {args.model} | {variant} | {kl:.4f} | {time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
