"""SmoothQuant-style smoothing: per-channel scales moved from the normed activations into the linears that read them.

Int8 per-token activations (XNNPACK's 8da4w) share one scale across a token's channels, so a few channels that are
always large (this model's residual stream reaches |x| ~ 2.5e4 in some) leave the others a handful of levels. Each
RMSNorm that feeds linears is followed by `diag(g)`; dividing g by s and multiplying the columns of every linear
that reads it (q, k, v after input_layernorm; gate, up after post_attention_layernorm) by s computes the same
function, with activations x / s and weights W * s. SmoothQuant's choice,

    s_j = max|x_j| ** alpha / max|W_:,j| ** (1 - alpha)

(the maxima over calibration text and over the rows of all the linears that read the norm), moves part of each
channel's range from the activation into the weight; alpha = 0 moves nothing towards the activations' side,
alpha = 1 all of it. The scales are normalised to a geometric mean of 1. The result is an ordinary Llama with
other norm gains, which every exporter takes as it is. Our own code: torchao's SmoothQuant swaps the linears for
its own modules (which the exporters here do not lower) and targets int8 weights.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Smoothing:
    """The scales measured for each smoothed norm (layer order: input_layernorm, post_attention_layernorm) and
    what they do to the activations: the largest channel maximum over the median one, before and after."""

    scales: tuple[torch.Tensor, ...]
    info: dict[str, float]

    def apply(self, model: Any, in_place: bool = False) -> Any:
        """A smoothed copy of `model` (`model` itself, changed, with `in_place`): norm gains divided by the scales,
        the columns of the linears that read them multiplied. The same scales on the same weights give bitwise the
        same result every time, so a caller may drop the smoothed weights and rebuild them."""
        if not in_place:
            model = copy.deepcopy(model)
        with torch.no_grad():
            for (norm, linears), s in zip(_sites(model), self.scales):
                norm.weight.div_(s)
                for lin in linears:
                    lin.weight.mul_(s)
        return model


def smoothing_for(model: Any, windows: list[list[int]], alpha: float) -> Smoothing:
    """SmoothQuant's scales for `model` (unchanged) from its activations over the windows."""
    sites = _sites(model)
    amax = _input_maxima(model, [linears[0] for _, linears in sites], windows)
    scales, before, after = [], [], []
    with torch.no_grad():
        for (_, linears), a in zip(sites, amax):
            a = a.clamp_min(1e-5)
            w = torch.cat([lin.weight for lin in linears]).abs().amax(0).clamp_min(1e-5)  # (hidden,)
            s = a.pow(alpha) / w.pow(1 - alpha)
            scales.append(s / s.log().mean().exp())
            before.append(float(a.max() / a.median()))
            after.append(float((a / scales[-1]).max() / (a / scales[-1]).median()))
    return Smoothing(tuple(scales), {"alpha": alpha, "sites": len(sites),
                                     "outlier_ratio_before": round(max(before), 1),
                                     "outlier_ratio_after": round(max(after), 1)})


def smooth(model: Any, windows: list[list[int]], alpha: float) -> tuple[Any, dict[str, float]]:
    """A smoothed copy of `model` (same outputs to float rounding) and what it did (Smoothing.info)."""
    smoothing = smoothing_for(model, windows, alpha)
    return smoothing.apply(model), smoothing.info


def _sites(model: Any) -> list[tuple[Any, list[Any]]]:
    """(norm, the linears that read it) for every smoothed norm."""
    sites = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        sites.append((layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj]))
        sites.append((layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj]))
    return sites


def _input_maxima(model: Any, linears: list[Any], windows: list[list[int]]) -> list[torch.Tensor]:
    """Per input channel, the largest |x| each linear reads over the windows."""
    found: list[torch.Tensor | None] = [None] * len(linears)

    def record(i: int):
        def hook(module: Any, args: tuple) -> None:
            x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0)  # (in,)
            found[i] = x if found[i] is None else torch.maximum(found[i], x)
        return hook

    handles = [lin.register_forward_pre_hook(record(i)) for i, lin in enumerate(linears)]
    try:
        with torch.inference_mode():
            for w in windows:
                model(torch.tensor([w], device=model.device))
    finally:
        for h in handles:
            h.remove()
    return [f for f in found if f is not None]
