"""GPTQ (Frantar et al., 2022): each linear's weights rounded column by column onto the grid, each rounding
error spread over the columns not yet rounded, weighted by the inverse Hessian of the layer's inputs on
calibration text. Layer by layer: a decoder layer's inputs come from the layers before it already quantized.

Why our own: torchao 0.18's GPTQ (torchao.prototype.gptq) gathers Hessians on CPU but its convert step asserts
CUDA and writes only its own int4 layouts; NNCF 3.4's GPTQ runs on OpenVINO models only; auto-round has none.
This writes our grid directly: each group's scale and float offset are HQQ's, fixed from its original columns, so
the codes are on exactly the grid every exporter lowers (as under `hqq`), in the natural group layout although
columns are rounded in act-order. As under `hqq`, the lm_head is rounded to nearest (`symmetric` applies to it).
"""

from __future__ import annotations

from typing import Any

import torch

from compress.quantized import QuantTensor, ZeroPoint
from compress.stages.layerwise import first_layer_inputs, input_grams, layer_output

BLOCK = 128  # columns per lazy-batch update (the paper's B); a multiple of the group size is used
DAMP = 0.01  # Hessian dampening, as a fraction of its mean diagonal


def gptq_linears(model: Any, windows: list[list[int]], plans: dict[str, tuple[int, int]],
                 console: Any, scale_bits: int = 16, zero_point: ZeroPoint = ZeroPoint.FLOAT) -> dict[str, QuantTensor]:
    """GPTQ codes for the planned decoder linears (export-module name -> (bits, group)), e.g.
    {"layers.0.mlp.up_proj": (4, 32)}. Works on a copy of each layer's weights: `model` is left unchanged."""
    import copy

    layers = model.model.layers
    hidden, kwargs = first_layer_inputs(model, windows)  # (windows, seq, hidden)
    out: dict[str, QuantTensor] = {}
    for index in console.track(range(len(layers)), f"GPTQ, layer by layer ({len(windows)} calibration windows)"):
        layer = copy.deepcopy(layers[index])
        linears = {f"layers.{index}.{name}": m for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)
                   and f"layers.{index}.{name}" in plans}
        hessians = input_grams(layer, linears, hidden, kwargs)
        for name, linear in linears.items():
            bits, group = plans[name]
            t = gptq(linear.weight.detach().float(), hessians[name], bits, group, scale_bits, zero_point)
            out[name] = t
            with torch.no_grad():
                t.dequantize_into(linear.weight)
        with torch.no_grad():
            hidden = layer_output(layer(hidden, **kwargs))  # what the next layer reads: this layer quantized
    return out


def gptq(w: torch.Tensor, h: torch.Tensor, bits: int, group: int, scale_bits: int = 16,
         zero_point: ZeroPoint = ZeroPoint.FLOAT) -> QuantTensor:
    """One (out, in) matrix, its inputs' (in, in) Hessian X^T X: codes, scales and offsets per group.

    Each group's grid is fixed from its original columns before any is rounded ("static groups"): HQQ's scale
    and float offset at `scale_bits` (compress.quantized.snap_grid), or the integer or middle zero point
    `zero_point` asks for (quant_algorithms.integer_grid), so a matrix that already sits on a float grid (a GGUF's
    Q4_1 blocks) keeps exactly that grid and its codes (at 16 bits, zero_point float). Columns are then rounded in order of
    decreasing Hessian diagonal (act-order: the inputs that carry the most energy first, while the most columns
    are left to absorb their error); the codes keep the natural group layout every exporter lowers.
    """
    from compress.stages.quant_algorithms import hqq

    rows, cols = w.shape
    w = w.clone()
    h = h.clone()
    dead = torch.diag(h) == 0  # inputs that never fire: their weights cannot matter
    h[dead, dead] = 1.0
    grid = hqq(w, bits, group, scale_bits, zero_point)
    scale, offset = grid.scale, grid.offset  # (rows, groups)
    w[:, dead] = 0.0
    order = torch.argsort(torch.diag(h), descending=True)
    w, h = w[:, order], h[order][:, order]
    h += DAMP * torch.mean(torch.diag(h)) * torch.eye(cols, device=h.device)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)  # (in, in)
    codes = torch.zeros(rows, cols, dtype=torch.uint8, device=w.device)
    top = 2 ** bits - 1
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    for start in range(0, cols, BLOCK):
        end = min(start + BLOCK, cols)
        w1 = w[:, start:end].clone()  # (rows, block): corrected in place as columns are rounded
        err = torch.zeros_like(w1)
        hinv1 = hinv[start:end, start:end]
        for i in range(end - start):
            col = int(order[start + i])
            g = col // group
            q = ((w1[:, i] - offset[:, g]) / safe[:, g]).round().clamp(0, top)  # (rows,)
            codes[:, col] = q.to(torch.uint8)
            e = (w1[:, i] - (q * scale[:, g] + offset[:, g])) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err[:, i] = e
        w[:, end:] -= err @ hinv[start:end, end:]
    return QuantTensor(codes, scale.clone(), offset.clone(), bits, group)
