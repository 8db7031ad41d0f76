"""Straight-through fake quantization of linear weights, for quantization-aware distillation.

The forward pass sees weights rounded to `weight_bits` codes with one scale (and, asymmetric, one zero
point) per `group_size` consecutive inputs of a row, as the int4 exporters store them; the backward pass
treats the rounding as the identity (straight-through estimator), so the fp32 latent weights learn to
sit where rounding costs least. The stage returns the latent weights. The grid trained here is round to
nearest's; the quantize stage that follows picks its own (HQQ's or GPTQ's scales and offsets), so the shipped
weights are near, not equal to, the ones trained. A distill after quantize (grid_tuning.py) trains the shipped
grid itself.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from compress.stages.configs import FakeQuant


def fake_quantize(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> torch.Tensor:
    """Round `weight` (out, in) to the grid it will be stored on; returns the dequantized values."""
    out_f, in_f = weight.shape
    w = weight.reshape(out_f, in_f // group_size, group_size)  # (out, groups, group_size)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = w.abs().amax(-1, keepdim=True).clamp_min(1e-8) / qmax  # (out, groups, 1)
        q = (w / scale).round().clamp(-qmax - 1, qmax) * scale
    else:
        qmax = 2 ** bits - 1
        lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        scale = (hi - lo).clamp_min(1e-8) / qmax
        zero = (-lo / scale).round()
        q = ((w / scale).round() + zero).clamp(0, qmax).sub(zero) * scale
    return q.reshape(out_f, in_f)


class _StraightThrough(nn.Module):
    def __init__(self, spec: FakeQuant):
        super().__init__()
        self.spec = spec

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        q = fake_quantize(weight, self.spec.weight_bits, self.spec.group_size, self.spec.symmetric)
        return weight + (q - weight).detach()  # value of q, gradient of the identity


def quantizable_linears(model: Any, group_size: int) -> list[nn.Linear]:
    """The decoder's linear layers whose input width is a whole number of groups (embeddings excluded)."""
    return [m for name, m in model.model.layers.named_modules()
            if isinstance(m, nn.Linear) and m.in_features % group_size == 0]


def attach(model: Any, spec: FakeQuant) -> int:
    """Fake-quantize the decoder's linears in place (a parametrization); returns how many."""
    linears = quantizable_linears(model, spec.group_size)
    for m in linears:
        parametrize.register_parametrization(m, "weight", _StraightThrough(spec))
    return len(linears)


def detach(model: Any) -> None:
    """Remove the parametrizations, keeping the trained latent (unrounded) weights."""
    for m in model.modules():
        if parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
