"""Sensitivity-driven mixed precision: measure what each linear's quantization costs in KL, then keep the most
sensitive at 8 bits until the whole model's KL meets the target, at the smallest size.

Sensitivity is measured, not guessed: for each linear, the model with only that linear quantized is run over the
calibration windows and its mean KL against the unquantized model is recorded (one forward per linear). Linears
are then raised to 8 bits in that order. The KL is measured at four levels of the average-bits budget (the
bits-vs-KL frontier the report shows), then the smallest prefix whose KL is <= max_kl is found by bisection over
the prefix length (KL falls, not strictly but nearly, as more linears are raised). When even the whole budget
does not reach max_kl, the whole budget is spent and the stage says so: the build's budgets are the gate.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from compress.metrics import kl_per_position
from compress.quantized import QuantAlgorithm, QuantizeConfig, QuantTensor, ZeroPoint

RANK_TOKENS = 256  # tokens per sensitivity forward (SmolLM2-135M, 2 cores: ~0.7 s each, 210 linears in ~2.5 min)


class KlProbe:
    """Mean KL(reference || model) over fixed token windows; the reference's log-probs are computed once."""

    def __init__(self, reference: Any, windows: list[list[int]]):
        import torch

        self.windows = [torch.tensor([w], dtype=torch.long, device=reference.device) for w in windows]
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
            tensors[name].dequantize_into(w)
        try:
            scores.append((name, measure(model)))
        finally:
            with torch.no_grad():
                w.copy_(original)
    return sorted(scores, key=lambda s: -s[1])


@dataclass(frozen=True)
class FrontierPoint:
    """One measured point of the bits-vs-KL trade-off: the `linears_at_8bit` most sensitive linears at 8 bits."""

    linears_at_8bit: int
    avg_code_bits: float
    kl: float


@dataclass
class MixedPrecision:
    """What the search chose: the promoted linears, the KL measured with them, whether `max_kl` was met (else
    the whole bits budget is spent: best effort), the sensitivity ranking and every point measured."""

    promoted: list[str]
    kl: float
    reached: bool
    ranking: list[tuple[str, float]]
    frontier: list[FrontierPoint]
    model: Any  # the model holding the chosen codes' dequantized values (the search's `work` model)


FRONTIER_STEPS = 4  # bits budget levels measured besides the bisection's points: 1/4, 1/2, 3/4 and all of it


def promote_until(model: Any, tensors: dict[str, QuantTensor], plans: list[Any], q: QuantizeConfig,
                  measure: KlProbe, console: Any, kl_plain: float, work: Any = None) -> MixedPrecision:
    """Raise the most sensitive linears to 8 bits (in place in `tensors`) until the KL is <= `q.max_kl`, within
    `q.max_avg_bits`; when the budget cannot reach it, spend the whole budget and say so (best effort).

    Every trial is measured on one `work` model whose quantized weights are set in place (only those that change
    between trials), never on a fresh copy: one fp32-sized copy fewer at the search's peak. `work` may be `model`
    itself when the caller owns it (overwritten once the ranking and the 8-bit codes no longer need its float
    weights); None makes a copy. It is returned as MixedPrecision.model, holding the chosen codes."""
    import copy

    from compress.stages.quant_plan import Plan, linear_weights, load_codes, quantize_one

    ranking = rank(model, tensors, measure, console)
    weights = linear_weights(model)
    body = [n for n in tensors if n != "lm_head"]
    total = sum(weights[n].numel() for n in body)
    code_bits = sum(weights[n].numel() * tensors[n].bits for n in body)
    bits_at = [code_bits / total]  # average code bits with the k most sensitive at 8 bits
    for name, _ in ranking:
        code_bits += weights[name].numel() * (8 - tensors[name].bits)
        if code_bits / total > q.max_avg_bits:
            break
        bits_at.append(code_bits / total)
    allowed = len(bits_at) - 1
    by_name = {p.name: p for p in plans}
    # 8-bit round to nearest (symmetric) for the promoted linears: at 8 bits the algorithm hardly matters, and
    # a symmetric grid is the one every backend's kernels take (its scales fp16, as rtn writes them).
    rtn8 = dataclasses.replace(q, algorithm=QuantAlgorithm.RTN, symmetric=True, scale_bits=16,
                               zero_point=ZeroPoint.FLOAT)
    eight = {name: quantize_one(weights[name], Plan(name, 8, by_name[name].group), rtn8)
             for name, _ in ranking[:allowed]}
    measured = {0: kl_plain}
    work = load_codes(copy.deepcopy(model) if work is None else work, tensors)
    work_weights, at_eight = linear_weights(work), [False] * allowed

    def hold(k: int) -> None:  # the k most sensitive at 8 bits in `work`, the rest at their own codes
        import torch

        with torch.no_grad():
            for i, (name, _) in enumerate(ranking[:allowed]):
                if at_eight[i] != (i < k):
                    (eight[name] if i < k else tensors[name]).dequantize_into(work_weights[name])
                    at_eight[i] = i < k

    def kl_with(k: int) -> float:
        if k not in measured:
            hold(k)
            measured[k] = measure(work)
        return measured[k]

    levels = [bits_at[0] + (bits_at[-1] - bits_at[0]) * i / FRONTIER_STEPS for i in range(1, FRONTIER_STEPS + 1)]
    with console.step(f"Measuring bits vs KL (up to {allowed} linears at 8 bits)") as step:
        for level in levels:
            kl_with(max(k for k, b in enumerate(bits_at) if b <= level + 1e-9))
        reached = kl_with(allowed) <= q.max_kl
        if reached:  # bisect between the last measured point above max_kl and the first at or under it
            lo = max(k for k, v in measured.items() if v > q.max_kl)
            hi = min(k for k, v in measured.items() if v <= q.max_kl and k > lo)
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if kl_with(mid) <= q.max_kl else (mid, hi)
        else:
            hi = allowed
        step["detail"] = f"{hi} linears at 8 bits ({bits_at[hi]:.3f} code bits), KL {measured[hi]:.4g}"
    if not reached:
        console.print(f"  [yellow]quantize.max_kl {q.max_kl} not reached within max_avg_bits {q.max_avg_bits}: "
                      f"KL {measured[hi]:.4g} with the {allowed} most sensitive linears at 8 bits (the whole "
                      f"budget, best effort)[/yellow]")
    promoted = [n for n, _ in ranking[:hi]]
    tensors.update({n: eight[n] for n in promoted})
    hold(hi)
    frontier = [FrontierPoint(k, round(bits_at[k], 4), v) for k, v in sorted(measured.items())]
    return MixedPrecision(promoted, measured[hi], reached, [(n, round(s, 6)) for n, s in ranking], frontier, work)
