"""The quantize stage's algorithms in eager PyTorch: mean KL against the fp32 model on the harness's evaluation
windows, without exporting. What each algorithm and rotation costs before any runtime adds its own arithmetic.

    python scripts/quant_eager.py [--model smollm2-135m-offgrid] [--fit 32] gptq hqq rtn gptq:rotation

Each variant is ALGORITHM[:rotation][:sym][:mixed] (4-bit, group 32, asymmetric unless :sym, embedding and lm_head
int8; with :rotation the embedding stays fp32, as the stage requires; with :mixed the stage's sensitivity search
spends the whole --max-avg-bits budget on the most sensitive linears at 8 bits). The fit windows come from the corpus's
calibration split, after the 4 the stage measures its own KL on.
"""

from __future__ import annotations

import argparse
import time

import torch

from compress.data.corpus import build_eval_set, calibration_windows
from compress.metrics import mean_kl
from compress.models import load_spec
from compress.progress import Console
from compress.quantized import Precision, QuantAlgorithm, QuantizeConfig, Rotation
from compress.stages.quant_plan import apply, plan, quantize_model
from compress.stages.sensitivity import KlProbe, promote_until
from compress.stages.rotation import rotate
from compress.targets import EvalSpec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="+")
    parser.add_argument("--model", default="smollm2-135m-offgrid")
    parser.add_argument("--fit", type=int, default=32, help="calibration windows a calibrated algorithm fits on")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-avg-bits", type=float, default=4.5, help="the budget :mixed spends")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_spec(args.model, Console(quiet=True))
    model, tokenizer = loaded.model, loaded.tokenizer
    ids = torch.tensor(build_eval_set(tokenizer, EvalSpec(), None).windows)  # (8, 256)
    with torch.no_grad():
        reference = model(ids).logits
    probe_windows = calibration_windows(tokenizer, "pydoc", 4 + args.fit, 256)
    probe, fit = KlProbe(model, probe_windows[:4]), probe_windows[4:]
    print(f"| model | variant | mean KL | seconds |\n|---|---|---|---|")
    for variant in args.variants:
        name, *flags = variant.split(":")
        rotated = "rotation" in flags
        q = QuantizeConfig(algorithm=QuantAlgorithm(name), weight_bits=4, group_size=32, symmetric="sym" in flags,
                           embedding=Precision.FP32 if rotated else Precision.INT8, lm_head=Precision.INT8,
                           rotation=Rotation.HADAMARD if rotated else Rotation.NONE,
                           max_kl=1e-9 if "mixed" in flags else None, max_avg_bits=args.max_avg_bits)
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
