"""Quantization-aware distillation on the quantize stage's own grid: the codes stay fixed, their scales and
offsets (and the norm gains) are trained.

After a quantize stage every quantized linear is `w = scale * codes + offset` per group (compress.quantized).
Here each such linear becomes a `GridLinear` whose forward pass computes exactly that from the fixed codes and
trainable per-group factors:

    scale' = scale * (1 + a)        offset' = offset + scale * b        (a = b = 0 at the start)

so the student the distill stage trains is, at every step, a model the exporters can write without rounding
anything again: the trained scales and offsets go back into `QuantizedWeights` with the same codes. A symmetric
tensor (offset = -2**(bits-1) * scale), and under `zero_point: integer` every tensor (offset = -z * scale), keeps
its offset tied to its scale through its fixed zero point, so kernels taking symmetric codes or integer zero
points keep taking it. The factors are relative to each group's scale, which is why one learning rate suits every layer.
The lm_head (and a tied embedding) stays frozen: it is the same matrix as the embedding's gather.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compress.quantized import QuantizedWeights, QuantTensor, ZeroPoint, snap_grid


class GridLinear(nn.Module):
    """A linear on fixed codes whose per-group scale and offset train (see the module docstring)."""

    def __init__(self, t: QuantTensor, bias: torch.Tensor | None, integer_zero: bool = False):
        super().__init__()
        self.group, self.bits = t.group, t.bits
        zero = t.integer_zero_points() if integer_zero or t.symmetric else None
        self.tied_offset = zero is not None
        self.register_buffer("zero", None if zero is None else zero.float())  # (out, groups) while tied
        self.register_buffer("codes", t.codes.clone())  # (out, in) uint8
        self.register_buffer("scale0", t.scale.clone().float())  # (out, groups)
        self.register_buffer("offset0", t.offset.clone().float())  # (out, groups)
        self.a = nn.Parameter(torch.zeros_like(self.scale0))
        self.b = None if self.tied_offset else nn.Parameter(torch.zeros_like(self.scale0))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The current (scale, offset), each (out, groups)."""
        scale = self.scale0 * (1 + self.a)
        if self.tied_offset:
            return scale, -self.zero * scale
        return scale, self.offset0 + self.scale0 * self.b

    def weight_now(self) -> torch.Tensor:
        scale, offset = self.grid()
        out, width = self.codes.shape
        grouped = self.codes.reshape(out, width // self.group, self.group).to(scale.dtype)  # (out, groups, group)
        return (grouped * scale.unsqueeze(-1) + offset.unsqueeze(-1)).reshape(out, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight_now().to(x.dtype), self.bias)

    def to_tensor(self, scale_bits: int = 16) -> QuantTensor:
        with torch.no_grad():
            scale, offset = self.grid()  # onto the quantize stage's grid (compress.quantized.snap_grid)
            scale, offset = snap_grid(scale.detach(), offset.detach(), self.bits, scale_bits)
            if self.tied_offset:  # the snapped scale times the same zero points
                offset = -self.zero * scale
            return QuantTensor(self.codes.clone(), scale, offset, self.bits, self.group)


def _module(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, leaf = name.rpartition(".")
    return (root.get_submodule(parent) if parent else root), leaf


def attach(student: Any, quantized: QuantizedWeights) -> list[str]:
    """Swap every quantized decoder linear of `student` (in place) for a GridLinear; freeze everything but the
    grids and the RMSNorm gains. Returns the swapped names (the export module's names)."""
    for p in student.parameters():
        p.requires_grad_(False)
    swapped = []
    for name, t in quantized.tensors.items():
        if name == "lm_head":
            continue
        parent, leaf = _module(student.model, name)
        linear = getattr(parent, leaf)
        setattr(parent, leaf, GridLinear(t, linear.bias, quantized.config.zero_point is ZeroPoint.INTEGER))
        swapped.append(name)
    for module in student.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.weight.requires_grad_(True)
    return swapped


def detach(student: Any, quantized: QuantizedWeights, swapped: list[str]) -> QuantizedWeights:
    """Put plain linears holding the trained grids' exact dequantized values back (in place); returns the
    codes with their trained scales and offsets."""
    tensors = dict(quantized.tensors)
    for name in swapped:
        parent, leaf = _module(student.model, name)
        grid = getattr(parent, leaf)
        tensors[name] = grid.to_tensor(quantized.config.scale_bits)
        out, width = grid.codes.shape
        linear = nn.Linear(width, out, bias=grid.bias is not None)
        with torch.no_grad():
            tensors[name].dequantize_into(linear.weight)
            if grid.bias is not None:
                linear.bias.copy_(grid.bias)
        setattr(parent, leaf, linear)
    for p in student.parameters():
        p.requires_grad_(True)
    return QuantizedWeights(tensors, quantized.config, quantized.promoted_to_8bit)
