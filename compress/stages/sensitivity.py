"""Sensitivity-driven mixed precision: measure what each linear's quantization costs in KL, then keep the most
sensitive at 8 bits until the whole model's KL meets the target, at the smallest size.

Sensitivity is measured, not guessed: for each linear, the model with only that linear quantized is run over the
calibration windows and its mean KL against the unquantized model is recorded (one forward per linear). Linears
are then raised to 8 bits in that order; the smallest prefix whose KL is <= max_kl is found by bisection over
the prefix length (KL falls, not strictly but nearly, as more linears are raised), within the average-bits budget.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from compress.errors import InputError
from compress.metrics import kl_per_position
from compress.quantized import QuantAlgorithm, QuantizeConfig, QuantTensor

RANK_TOKENS = 256  # tokens per sensitivity forward (SmolLM2-135M, 2 cores: ~0.7 s each, 210 linears in ~2.5 min)


class KlProbe:
    """Mean KL(reference || model) over fixed token windows; the reference's log-probs are computed once."""

    def __init__(self, reference: Any, windows: list[list[int]]):
        import torch

        self.windows = [torch.tensor([w], dtype=torch.long) for w in windows]
        with torch.inference_mode():
            self.ref = [reference(w).logits.float() for w in self.windows]  # (1, seq, vocab) each

    def subset(self, max_tokens: int) -> KlProbe:
        """The same probe on its first windows only (at least one), for many cheap comparisons."""
        out = KlProbe.__new__(KlProbe)
        keep, total = 0, 0
        while keep < len(self.windows) and (keep == 0 or total + self.windows[keep].shape[1] <= max_tokens):
            total += self.windows[keep].shape[1]
            keep += 1
        out.windows, out.ref = self.windows[:keep], self.ref[:keep]
        return out

    def __call__(self, model: Any) -> float:
        import torch

        total, count = 0.0, 0
        with torch.inference_mode():
            for w, ref in zip(self.windows, self.ref):
                total += float(kl_per_position(ref, model(w).logits).clamp_min(0).sum())
                count += ref.shape[1]
        return total / count


def rank(model: Any, tensors: dict[str, QuantTensor], measure: KlProbe, console: Any) -> list[tuple[str, float]]:
    """(name, KL with only that linear quantized), most sensitive first; the lm_head is not ranked."""
    import torch

    from compress.stages.quant_plan import linear_weights

    weights = linear_weights(model)
    scores = []
    names = [n for n in tensors if n != "lm_head"]
    measure = measure.subset(RANK_TOKENS)  # one forward per linear: ranking needs the order, not the last digit
    for name in console.track(names, "Measuring each linear's sensitivity (KL)"):
        w = weights[name]
        original = w.detach().clone()
        with torch.no_grad():
            w.copy_(tensors[name].dequantize())
        try:
            scores.append((name, measure(model)))
        finally:
            with torch.no_grad():
                w.copy_(original)
    return sorted(scores, key=lambda s: -s[1])


def promote_until(model: Any, tensors: dict[str, QuantTensor], plans: list[Any], q: QuantizeConfig,
                  measure: KlProbe, console: Any) -> tuple[list[str], float, list[tuple[str, float]]]:
    """Raise the most sensitive linears to 8 bits (in place in `tensors`); returns (promoted, KL, ranking)."""
    from compress.stages.quant_plan import Plan, apply, linear_weights, quantize_one

    ranking = rank(model, tensors, measure, console)
    weights = linear_weights(model)
    body = [n for n in tensors if n != "lm_head"]
    total = sum(weights[n].numel() for n in body)
    code_bits = sum(weights[n].numel() * tensors[n].bits for n in body)
    allowed = 0  # how many of the ranking fit the average-bits budget
    for name, _ in ranking:
        code_bits += weights[name].numel() * (8 - tensors[name].bits)
        if code_bits / total > q.max_avg_bits:
            break
        allowed += 1
    by_name = {p.name: p for p in plans}
    # 8-bit round to nearest (symmetric) for the promoted linears: at 8 bits the algorithm hardly matters, and
    # a symmetric grid is the one every backend's kernels take.
    rtn8 = dataclasses.replace(q, algorithm=QuantAlgorithm.RTN, symmetric=True)
    eight = {name: quantize_one(weights[name], Plan(name, 8, by_name[name].group), rtn8)
             for name, _ in ranking[:allowed]}

    def kl_with(k: int) -> float:
        trial = dict(tensors)
        trial.update({n: eight[n] for n, _ in ranking[:k]})
        return measure(apply(model, trial))

    lo, hi = 0, allowed
    kl_hi = kl_with(hi)
    if kl_hi > q.max_kl:
        raise InputError(f"quantize.max_kl {q.max_kl}: not reachable within max_avg_bits {q.max_avg_bits} "
                         f"(KL {kl_hi:.4g} with the {allowed} most sensitive linears at 8 bits); raise max_avg_bits "
                         f"or max_kl, or use a better algorithm")
    with console.step(f"Bisecting the number of 8-bit linears (up to {allowed})") as step:
        while hi - lo > 1:
            mid = (lo + hi) // 2
            kl_mid = kl_with(mid)
            if kl_mid <= q.max_kl:
                hi, kl_hi = mid, kl_mid
            else:
                lo = mid
        step["detail"] = f"{hi} linears at 8 bits, KL {kl_hi:.4g}"
    promoted = [n for n, _ in ranking[:hi]]
    tensors.update({n: eight[n] for n in promoted})
    return promoted, kl_hi, [(n, round(s, 6)) for n, s in ranking]
