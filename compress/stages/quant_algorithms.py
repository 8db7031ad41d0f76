"""Weight quantizers of the quantize stage: one fp32 matrix in, one QuantTensor out.

- rtn: round to nearest with torchao's affine primitives (symmetric or asymmetric with an integer zero point).
- hqq: torchao's HQQ solver (half-quadratic optimisation of scale and a float zero point; no calibration data),
  or under `zero_point: integer` the best integer zero next to HQQ's with a refitted scale (`integer_grid`), or
  under `zero_point: middle` the middle code with a refitted scale.
- keep_gguf: recover the source's own grid. A GGUF's Q4_1 tensor, once dequantized, lies exactly on
  w = d * q + m per group of 32 (q in 0..15, m the group's minimum, d and m fp16); its Q8_0 embedding on
  w = d * q (q in -127..127). Re-quantizing those values onto another grid adds error the source never had
  (measured: RTN asymmetric int4 onto the Q4_1 weights of SmolLM2-135M costs mean KL 0.26), so this reads the
  codes back and checks the reconstruction element by element. A matrix that is not on such a grid is an error.
GPTQ/AWQ-style calibrated rounding would go here too; see docs/quantization.md for what was measured.
"""

from __future__ import annotations

import torch

from compress.quantized import QuantTensor, ZeroPoint, snap_fp16, snap_grid


def hqq(w: torch.Tensor, bits: int, group: int, scale_bits: int = 16,
        zero_point: ZeroPoint = ZeroPoint.FLOAT) -> QuantTensor:
    # torchao keeps the HQQ solver private (its public configs only use it inside tensor subclasses); it is the
    # maintained implementation, so call it rather than re-deriving the half-quadratic updates.
    from torchao.quantization.quant_primitives import _choose_qparams_and_quantize_affine_hqq

    q, scale, zero, _ = _choose_qparams_and_quantize_affine_hqq(
        w.float(), nbits=bits, group_size=group, axis=1, compute_dtype=torch.float32, device=str(w.device), raw_output=True)
    del q  # HQQ's codes on its fp32 grid; chosen again below on the stage's (compress.quantized.snap_grid)
    scale = scale.reshape(w.shape[0], -1).float()  # w = (q - zero) * scale, zero a float
    scale, offset = snap_grid(scale, -zero.reshape(w.shape[0], -1).float() * scale, bits, scale_bits)
    if zero_point is not ZeroPoint.FLOAT:
        scale, offset = integer_grid(w, scale, offset, bits, group, scale_bits, zero_point is ZeroPoint.MIDDLE)
    return QuantTensor(_codes_on(w, scale, offset, bits, group), scale, offset, bits, group)


def integer_grid(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int, group: int,
                 scale_bits: int, middle: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A grid w = scale * (codes - z) with an integer zero z per group, from a float-offset one: z is the code
    just below or just above the float zero (-offset / scale), each with the least-squares scale for its codes
    (three alternations), whichever reconstructs the group better; the scales are then snapped like the stage's.
    `middle`: z = 2**(bits-1) everywhere (symmetric), the scale starting from the group's range instead.

    Why not just round the zero: on the off-grid model GPTQ onto HQQ's grid with its zero rounded (or onto
    min-max round-to-nearest's grid) measured mean KL 0.0985, this 0.0895, float offsets 0.070 (eager, 4-bit,
    8-bit scales, docs/quantization.md)."""
    out, width = w.shape
    g = w.float().reshape(out, width // group, group)  # (out, groups, group)
    top = 2 ** bits - 1
    z0 = -offset / torch.where(scale == 0, torch.ones_like(scale), scale)
    mid = 2 ** (bits - 1)
    candidates = (torch.full_like(scale, mid),) if middle else (z0.floor().clamp(0, top), z0.ceil().clamp(0, top))
    if middle:  # the codes -mid .. mid - 1 cover the group
        scale = torch.maximum(-g.amin(-1) / mid, g.amax(-1) / (mid - 1))
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    best = None
    for z in candidates:
        s = scale
        for _ in range(3):
            q = _signed_on(g, s, z, top)
            fitted = (g * q).sum(-1) / (q * q).sum(-1).clamp(min=1e-30)
            s = torch.where(fitted > 0, fitted, s)  # a group of zeros (or a degenerate fit) keeps its scale
        err = (g - s.unsqueeze(-1) * _signed_on(g, s, z, top)).pow(2).sum(-1)  # (out, groups)
        if best is None:
            best = (err, s, z)
        else:
            take = err < best[0]
            best = (torch.where(take, err, best[0]), torch.where(take, s, best[1]), torch.where(take, z, best[2]))
    _, s, z = best
    s, _ = snap_grid(s, -z * s, bits, scale_bits)  # once, after choosing: 8-bit scales share a factor per row
    return s, -z * s  # exact in fp32: an fp16 or 8-bit scale times a code of at most 8 bits


def _signed_on(g: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, top: int) -> torch.Tensor:
    """Nearest codes minus the zero, for groups g (out, groups, group) on w = scale * (codes - zero)."""
    safe = torch.where(scale == 0, torch.ones_like(scale), scale).unsqueeze(-1)
    return (g / safe + zero.unsqueeze(-1)).round().clamp(0, top) - zero.unsqueeze(-1)


def _codes_on(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Round to nearest onto a given per-group grid w = scale * codes + offset."""
    out, width = w.shape
    g = w.float().reshape(out, width // group, group)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    codes = ((g - offset.unsqueeze(-1)) / safe.unsqueeze(-1)).round().clamp(0, 2 ** bits - 1)
    return codes.reshape(out, width).to(torch.uint8)


def recover_grid(w: torch.Tensor, bits: int, group: int) -> tuple[QuantTensor | None, float]:
    """The codes of a matrix that already lies on a `bits`-bit grid per group of `group`: (tensor, worst error
    as a fraction of the grid step); the tensor is None when some group is off the grid."""
    worst = float("inf")
    for candidate in (_asymmetric_grid, _symmetric_grid):
        t = candidate(w, bits, group)
        err = _grid_error(w, t)
        if err <= 1e-3:
            return t, err
        worst = min(worst, err)
    return None, worst


def _asymmetric_grid(w: torch.Tensor, bits: int, group: int) -> QuantTensor:
    """Q4_1-style: the group's minimum is code 0 and its maximum the last code."""
    out, width = w.shape
    g = w.reshape(out, width // group, group)  # (out, groups, group)
    low, high = g.amin(-1), g.amax(-1)
    step = snap_fp16((high - low) / (2 ** bits - 1))
    low = snap_fp16(low)
    safe = torch.where(step == 0, torch.ones_like(step), step)
    codes = ((g - low.unsqueeze(-1)) / safe.unsqueeze(-1)).round().clamp(0, 2 ** bits - 1)
    return QuantTensor(codes.reshape(out, width).to(torch.uint8), step, low, bits, group)


def _symmetric_grid(w: torch.Tensor, bits: int, group: int) -> QuantTensor:
    """Q8_0-style: the group's largest magnitude is code +-(2**(bits-1) - 1)."""
    out, width = w.shape
    g = w.reshape(out, width // group, group)
    top = 2 ** (bits - 1) - 1
    step = snap_fp16(g.abs().amax(-1) / top)
    safe = torch.where(step == 0, torch.ones_like(step), step)
    signed = (g / safe.unsqueeze(-1)).round().clamp(-top, top)
    codes = (signed + 2 ** (bits - 1)).reshape(out, width).to(torch.uint8)
    return QuantTensor(codes, step, -(2 ** (bits - 1)) * step, bits, group)


def _grid_error(w: torch.Tensor, t: QuantTensor) -> float:
    out, width = w.shape
    diff = (t.dequantize() - w).abs().reshape(out, width // t.group, t.group).amax(-1)  # (out, groups)
    step = t.scale.abs()
    tiny = step <= 1e-30
    rel = torch.where(tiny, diff, diff / torch.where(tiny, torch.ones_like(step), step))
    return float(rel.max())
