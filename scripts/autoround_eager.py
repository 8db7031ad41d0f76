"""AutoRound (intel/auto-round, SignRound) as a candidate for the quantize stage, measured like
scripts/quant_eager.py: mean KL against the fp32 model on the harness's 8 evaluation windows, eager PyTorch.

    pip install auto-round==0.16.1   # not a dependency of this package: this is a measurement
    python scripts/autoround_eager.py [--model smollm2-135m-offgrid] [--iters 50] [--fit 32]

4-bit, group 32, asymmetric (AutoRound's integer zero points), every decoder linear; the tied embedding / lm_head
stays fp32 (AutoRound's default), so compare with `quant_eager.py gptq:fp32head`. Calibration: --fit windows of
256 tokens from the corpus's calibration split (after the 4 the stage keeps for its own KL probe), never the
evaluation windows. After AutoRound, each linear's weight is its dequantized grid (`scale`, `zp` kept on the
module); the script checks that every group-32 row holds at most 16 distinct levels, i.e. that the weights are on a
4-bit grid the stage could write as codes.
"""

from __future__ import annotations

import argparse
import time

import torch
from quant_eager import setup  # scripts/ is on sys.path when this runs as a script

from compress.metrics import mean_kl


def levels_per_group(weight: torch.Tensor, group: int = 32) -> int:
    """The most distinct values any group of `group` consecutive inputs of a row holds."""
    groups = weight.detach().reshape(-1, group)
    return max(len(torch.unique(g)) for g in groups[:: max(1, len(groups) // 512)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-offgrid")
    parser.add_argument("--iters", type=int, default=50, help="SignRound steps per block (AutoRound's default: 200)")
    parser.add_argument("--fit", type=int, default=32, help="calibration windows of 256 tokens")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    from auto_round import AutoRound

    model, tokenizer, ids, reference, windows = setup(args.model, args.fit, args.threads)  # reference kept first
    fit = windows[4:]
    start = time.perf_counter()
    rounder = AutoRound(model, tokenizer, bits=4, group_size=32, sym=False, iters=args.iters, nsamples=args.fit,
                        seqlen=256, batch_size=args.batch, dataset=[torch.tensor([w]) for w in fit],
                        device_map="cpu", amp=False, enable_torch_compile=False)
    quantized, _ = rounder.quantize()
    seconds = time.perf_counter() - start
    linears = [m for n, m in quantized.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    most = max(levels_per_group(m.weight) for m in linears)
    with torch.no_grad():
        kl = mean_kl(reference, quantized(ids).logits)
    print(f"| {args.model} | autoround iters {args.iters}, {args.fit} x 256 fit | {kl:.4f} | {seconds:.0f} | "
          f"{len(linears)} linears, at most {most} levels per group |", flush=True)


if __name__ == "__main__":
    main()
