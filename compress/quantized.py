"""Quantized weights as the quantize stage hands them to every exporter: unsigned codes on a per-group grid.

    w[n, k] = scale[n, k // group] * codes[n, k] + offset[n, k // group]      codes in 0 .. 2**bits - 1

Every affine scheme is one of these: symmetric (offset = -2**(bits-1) * scale), asymmetric with an integer zero
point z (offset = -z * scale), and GGUF's Q4_1 or HQQ's float zero points (offset any float). Exporters lower the
codes as they are, without re-rounding; `integer_zero_points` and `residual_offset` give them the two forms their
kernels take (a zero point, or signed codes plus a per-group correction).

The quantize stage's scales are fp16 values held in fp32, and so are its float offsets' residuals
(`fp16_grid`; a GGUF's own grid keeps Q4_1's fp16 d and m instead): the codes are chosen on that grid, so a format
that stores scales, or the signed codes' per-group correction, in fp16 (ONNX's MatMulNBits and its correction,
Core ML's scales) stores them exactly. `fp16_scales` and `fp16_residuals` say whether a tensor's are.

With `scale_bits: 8` the grid goes one step further (double quantization, as QLoRA and llama.cpp's k-quants store
their block scales): each row's scales are 8-bit unsigned codes times one power of two, and its residuals 8-bit
signed codes times another (`grid_8bit`). Those values are still fp16 (and bf16) values, so every exporter lowers
them as before, and a format that can store 8-bit codes plus a per-row factor (ONNX: uint8/int8 initializers,
Cast, Mul, folded when the session is created) stores them exactly in half the bytes: 0.5 instead of 1 stored bit
per weight at group 32. `scale_codes` and `residual_codes` give those codes where a tensor's values are on it.

On disk (beside a stage's HF checkpoint): one safetensors file, `<name>.codes|scale|offset` per tensor, with
bits/group per tensor and the stage's scheme in its metadata.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compress.config import check_fields, setting
from compress.errors import Problem

if TYPE_CHECKING:
    import torch

class Activations(enum.StrEnum):
    NONE = "none"
    INT8_DYNAMIC = "int8_dynamic"


class Precision(enum.StrEnum):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"
    INT4 = "int4"


BITS_OF = {Precision.FP32: None, Precision.FP16: None, Precision.INT8: 8, Precision.INT4: 4}  # None: not quantized


class QuantAlgorithm(enum.StrEnum):
    RTN = "rtn"
    HQQ = "hqq"  # no calibration data
    GPTQ = "gptq"  # calibrated: fits on `fit_windows` of calibration text
    AWQ = "awq"
    SCALE_ESTIMATION = "scale_estimation"
    KEEP_GGUF = "keep_gguf"  # keep the source GGUF's codes where the format represents them exactly


class ZeroPoint(enum.StrEnum):
    """How the hqq and gptq grids place each group's zero."""

    FLOAT = "float"  # any float offset per group (HQQ's; what a GGUF's Q4_1 grid holds)
    INTEGER = "integer"  # w = scale * (codes - z), z an integer code: ONNX's MatMulNBits takes it natively
    MIDDLE = "middle"  # z = 2**(bits-1) in every group (symmetric): XNNPACK's int4 kernels take it natively


class Rotation(enum.StrEnum):
    NONE = "none"
    HADAMARD = "hadamard"  # residual stream and value heads rotated by randomized Hadamard matrices (QuaRot)


@dataclass(frozen=True)
class LayerOverride:
    """Per-layer precision by glob pattern on the module name; the first matching override wins."""

    pattern: str
    weight_bits: int = setting(8, choices=(4, 8, 16))
    group_size: int | None = setting(None, ge=8)

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class QuantizeConfig:
    weight_bits: int = setting(4, choices=(4, 8))
    group_size: int | None = setting(32, ge=8, le=4096, doc="None: one scale per output channel")
    symmetric: bool = True
    activations: Activations = Activations.NONE
    embedding: Precision = Precision.FP32
    lm_head: Precision = Precision.FP32
    algorithm: QuantAlgorithm = QuantAlgorithm.RTN
    overrides: tuple[LayerOverride, ...] = ()
    # Sensitivity-driven mixed precision keeps
    # the linears whose quantization costs the most KL at 8 bits until the stage's measured KL is <= max_kl,
    # within max_avg_bits average code bits per linear weight (lm_head and embedding excluded).
    max_kl: float | None = setting(None, gt=0, doc="mixed precision: KL the stage must reach on calibration text")
    max_avg_bits: float = setting(4.5, ge=2, le=8, doc="mixed precision: average code bits per linear weight")
    calibration_windows: int = setting(4, ge=1, le=4096, doc="calibration windows the stage measures KL on")
    calibration_len: int = setting(256, ge=16, le=32768)
    fit_windows: int = setting(32, ge=1, le=4096, doc="further calibration windows a calibrated algorithm (gptq) "
                                                      "fits the codes on, disjoint from those KL is measured on")
    rotation: Rotation = setting(Rotation.NONE, doc="rotate the model before quantizing (function-preserving; "
                                                     "unties the embedding from the lm_head)")
    smoothing: float | None = setting(None, ge=0, le=1, doc="SmoothQuant's alpha: move per-channel range from the "
                                                            "normed activations into the linears reading them "
                                                            "before quantizing (function-preserving)")
    scale_bits: int = setting(16, choices=(8, 16), doc="16: each group's scale and float offset are fp16 values; "
                                                       "8: 8-bit codes times a power of two per row (double "
                                                       "quantization; hqq and gptq grids)")
    zero_point: ZeroPoint = setting(ZeroPoint.FLOAT, doc="hqq and gptq grids: 'float' offsets per group; "
                                                         "'integer' zero points, which ONNX's MatMulNBits runs "
                                                         "without the per-group correction float offsets need; "
                                                         "'middle' (symmetric), which ExecuTorch's XNNPACK kernels "
                                                         "run without one (faster, at more KL: "
                                                         "docs/quantization.md)")

    def code_bits(self) -> set[int]:
        """Every code width the stage writes for this config (body, overrides, lm_head and embedding)."""
        bits = {self.weight_bits} | {o.weight_bits for o in self.overrides if o.weight_bits != 16}
        return bits | {b for b in (BITS_OF[self.lm_head], BITS_OF[self.embedding]) if b is not None}

    def __post_init__(self) -> None:
        extra = []
        if self.group_size is not None and self.group_size & (self.group_size - 1):
            extra.append(Problem("group_size", f"{self.group_size} is not a power of two (e.g. 32, 64, 128)"))
        if self.rotation is not Rotation.NONE and self.embedding is not Precision.FP32:
            extra.append(Problem("embedding", f"{self.embedding.value!r} with rotation {self.rotation.value!r}: the "
                                              f"rotation unties the embedding from the lm_head, and an untied "
                                              f"embedding is not quantized by the stage; set embedding: fp32 (the "
                                              f"rotated model carries a float vocab x hidden matrix)"))
        if self.scale_bits == 8 and self.algorithm not in (QuantAlgorithm.HQQ, QuantAlgorithm.GPTQ):
            extra.append(Problem("scale_bits", f"8 with algorithm {self.algorithm.value!r}: 8-bit scales and "
                                               f"offsets are chosen by the float-offset grids of 'hqq' and 'gptq'; "
                                               f"use one of those or scale_bits: 16"))
        if self.zero_point is not ZeroPoint.FLOAT and self.algorithm not in (QuantAlgorithm.HQQ, QuantAlgorithm.GPTQ):
            extra.append(Problem("zero_point", f"{self.zero_point.value!r} with algorithm {self.algorithm.value!r}: "
                                               f"it places the zero points of the 'hqq' and 'gptq' grids (rtn's "
                                               f"follow `symmetric`; keep_gguf keeps the source's); use one of "
                                               f"those or zero_point: float"))
        if self.smoothing is not None and self.rotation is not Rotation.NONE:
            extra.append(Problem("smoothing", f"with rotation {self.rotation.value!r}: the rotation spreads the "
                                              f"channels the smoothing would scale; choose one"))
        check_fields(self, extra)


FILE = "compress-quantized.safetensors"


ROW_BLOCK_ELEMENTS = 1 << 24  # rtn and dequantize work on row blocks of at most this many weights (64 MB of fp32)


def row_blocks(rows: int, width: int, elements: int = ROW_BLOCK_ELEMENTS) -> list[tuple[int, int]]:
    """(start, stop) row ranges of at most `elements` weights each (at least one row)."""
    step = max(1, elements // max(width, 1))
    return [(r, min(r + step, rows)) for r in range(0, rows, step)]


@dataclass
class QuantTensor:
    codes: torch.Tensor  # (out, in) uint8
    scale: torch.Tensor  # (out, in // group) fp32
    offset: torch.Tensor  # (out, in // group) fp32
    bits: int
    group: int

    def __post_init__(self) -> None:
        out, width = self.codes.shape
        if width % self.group or self.scale.shape != (out, width // self.group) or self.offset.shape != self.scale.shape:
            raise ValueError(f"inconsistent quantized tensor: codes {tuple(self.codes.shape)}, group {self.group}, "
                             f"scale {tuple(self.scale.shape)}, offset {tuple(self.offset.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def rows(self, start: int, stop: int) -> QuantTensor:
        """Rows start..stop of the matrix (views, no copy)."""
        return QuantTensor(self.codes[start:stop], self.scale[start:stop], self.offset[start:stop], self.bits,
                           self.group)

    def dequantize_into(self, out: torch.Tensor, block_elements: int = ROW_BLOCK_ELEMENTS) -> None:
        """Write the dequantized matrix into `out` (same shape) row block by row block: no full-size temporary."""
        import torch

        with torch.no_grad():
            for a, b in row_blocks(*self.codes.shape, block_elements):
                out[a:b].copy_(self.rows(a, b).dequantize())

    def dequantize(self) -> torch.Tensor:
        import torch

        out, width = self.codes.shape
        grouped = self.codes.reshape(out, width // self.group, self.group).to(torch.float32)  # (out, groups, group)
        w = grouped * self.scale.unsqueeze(-1) + self.offset.unsqueeze(-1)
        return w.reshape(out, width)

    @property
    def midpoint(self) -> int:
        return 2 ** (self.bits - 1)

    def signed_codes(self) -> torch.Tensor:
        """Codes centred on zero (int8, -2**(bits-1) .. 2**(bits-1) - 1): what symmetric kernels take."""
        import torch

        return (self.codes.to(torch.int16) - self.midpoint).to(torch.int8)

    def residual_offset(self) -> torch.Tensor:
        """Per-group offset left over once the codes are read as signed codes times the scale (out, groups).

        w = scale * signed + residual; zero for a symmetric tensor. A kernel without zero points computes
        x @ (scale * signed).T and adds (x summed over each group) @ residual.T, which is exact.
        """
        return self.offset + self.midpoint * self.scale

    @property
    def symmetric(self) -> bool:
        import torch

        return bool(torch.all(self.residual_offset().abs() <= 1e-6 * self.scale.abs()))

    def fp16_scales(self) -> bool:
        """Every scale is exactly an fp16 value (what the quantize stage writes), so fp16 storage is lossless."""
        import torch

        return bool(torch.equal(self.scale.half().float(), self.scale))

    def fp16_residuals(self) -> bool:
        """Every residual offset is exactly an fp16 value (float offsets as the quantize stage writes them)."""
        import torch

        r = self.residual_offset()
        return bool(torch.equal(r.half().float(), r))

    def scale_codes(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(uint8 codes (out, groups), fp32 factor per row (out, 1)) whose product is exactly every scale, when
        each row's scales are 8-bit codes times one power of two (`grid_8bit`); else None."""
        return _pow2_codes(self.scale, signed=False)

    def residual_codes(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(int8 codes (out, groups), fp32 factor per row (out, 1)) whose product is exactly every residual offset,
        when each row's residuals are 8-bit signed codes times one power of two; else None."""
        return _pow2_codes(self.residual_offset(), signed=True)

    def integer_zero_points(self) -> torch.Tensor | None:
        """Zero points z with w = scale * (codes - z), when every one is an integer in range; else None."""
        import torch

        z = -self.offset / torch.where(self.scale == 0, torch.ones_like(self.scale), self.scale)
        rounded = z.round()
        if torch.any((z - rounded).abs() > 1e-4) or rounded.min() < 0 or rounded.max() > 2 ** self.bits - 1:
            return None
        return rounded.to(torch.uint8)


@dataclass
class QuantizedWeights:
    """What the quantize stage produced: a QuantTensor per quantized linear (HF module names), the config that
    made them, and the linears mixed precision raised to 8 bits."""

    tensors: dict[str, QuantTensor]
    config: QuantizeConfig
    promoted_to_8bit: tuple[str, ...] = ()

    @property
    def scheme(self) -> dict[str, Any]:
        """The scheme as the stage's notes and the manifest record it."""
        c = self.config
        out: dict[str, Any] = {"algorithm": c.algorithm.value, "weight_bits": c.weight_bits,
                               "group_size": c.group_size, "symmetric": c.symmetric,
                               "activations": c.activations.value, "embedding": c.embedding.value,
                               "lm_head": c.lm_head.value}
        if c.scale_bits != 16:
            out["scale_bits"] = c.scale_bits
        if c.zero_point is not ZeroPoint.FLOAT:
            out["zero_point"] = c.zero_point.value
        if self.promoted_to_8bit:
            out["promoted_to_8bit"] = list(self.promoted_to_8bit)
        return out

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        from compress.config import to_data

        flat, layout = {}, {}
        for name, t in self.tensors.items():
            flat[f"{name}.codes"] = t.codes.contiguous()
            flat[f"{name}.scale"] = t.scale.contiguous()
            flat[f"{name}.offset"] = t.offset.contiguous()
            layout[name] = {"bits": t.bits, "group": t.group}
        save_file(flat, str(directory / FILE), metadata={
            "layout": json.dumps(layout), "config": json.dumps(to_data(self.config)),
            "promoted_to_8bit": json.dumps(list(self.promoted_to_8bit))})

    @classmethod
    def load(cls, directory: Path) -> QuantizedWeights | None:
        path = directory / FILE
        if not path.is_file():
            return None
        from safetensors import safe_open

        from compress.config import parse_value
        from compress.errors import ConfigError

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            layout = json.loads(meta["layout"])
            tensors = {name: QuantTensor(f.get_tensor(f"{name}.codes"), f.get_tensor(f"{name}.scale"),
                                         f.get_tensor(f"{name}.offset"), spec["bits"], spec["group"])
                       for name, spec in layout.items()}
        problems: list[Problem] = []
        config = parse_value(QuantizeConfig, json.loads(meta["config"]), str(path), problems)
        if problems:
            raise ConfigError(problems)
        return cls(tensors, config, tuple(json.loads(meta["promoted_to_8bit"])))

    def export_config(self) -> QuantizeConfig:
        """The layout a format's graph follows before the codes are lowered into it: bits, block, activations,
        embedding and lm_head precision. Symmetric, because the codes bring their own offsets."""
        c = self.config
        return QuantizeConfig(weight_bits=c.weight_bits, group_size=c.group_size, symmetric=True,
                              activations=c.activations, embedding=c.embedding, lm_head=c.lm_head)

    def bits_summary(self) -> dict[str, Any]:
        """Average code bits and stored bits (codes + scale at `scale_bits` + offset at `scale_bits`, an integer
        zero point at the codes' width, or nothing for the middle one) per weight, lm_head apart."""
        body = {n: t for n, t in self.tensors.items() if n != "lm_head"}
        weights = sum(t.codes.numel() for t in body.values())
        if not weights:
            return {"linear_weights": 0}
        code_bits = sum(t.codes.numel() * t.bits for t in body.values())
        zero_bits = {ZeroPoint.FLOAT: self.config.scale_bits, ZeroPoint.MIDDLE: 0}
        meta_bits = sum(t.scale.numel() * (self.config.scale_bits + zero_bits.get(self.config.zero_point, t.bits))
                        for t in body.values())
        return {"linear_weights": weights, "avg_code_bits": round(code_bits / weights, 3),
                "avg_stored_bits": round((code_bits + meta_bits) / weights, 3),
                "bits_histogram": {str(b): sum(1 for t in body.values() if t.bits == b)
                                   for b in sorted({t.bits for t in body.values()})}}


def rtn(w: torch.Tensor, bits: int, group: int, symmetric: bool,
        block_elements: int = ROW_BLOCK_ELEMENTS) -> QuantTensor:
    """Round to nearest on a per-group grid (torchao's affine primitives): the stage's plain algorithm, and what an
    exporter uses where its kernels need a layout the stage's grid is not on (docs/quantization.md says where).

    Every group is a slice of one row, so a large matrix is rounded row block by row block with the same result:
    torchao's temporaries for a 128k-vocabulary embedding would otherwise be several fp32 copies of it (~4 GB at
    Llama 3.2 1B's shape)."""
    import torch

    blocks = row_blocks(w.shape[0], w.shape[1], block_elements)
    if len(blocks) > 1:
        parts = [_rtn(w[a:b], bits, group, symmetric) for a, b in blocks]
        return QuantTensor(torch.cat([p.codes for p in parts]), torch.cat([p.scale for p in parts]),
                           torch.cat([p.offset for p in parts]), bits, group)
    return _rtn(w, bits, group, symmetric)


def _rtn(w: torch.Tensor, bits: int, group: int, symmetric: bool) -> QuantTensor:
    import torch
    from torchao.quantization.quant_primitives import MappingType, choose_qparams_affine, quantize_affine

    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    mapping = MappingType.SYMMETRIC if symmetric else MappingType.ASYMMETRIC
    block = (1, group)
    scale, zero = choose_qparams_affine(w, mapping, block, torch.int8, qmin, qmax, eps=1e-12,
                                        scale_dtype=torch.float32, zero_point_dtype=torch.int32)
    # The codes are chosen on the fp16 grid (see the module docstring). A symmetric scale is rounded away from
    # zero, so the largest magnitude still lands within half a step; an asymmetric one to nearest, its zero point
    # derived again from it as torchao derives it (the group's minimum then takes code 0).
    scale = snap_fp16(scale, away=symmetric)
    if not symmetric:
        low = w.reshape(w.shape[0], -1, group).amin(-1).clamp(max=0).reshape(scale.shape)
        zero = (qmin - torch.round(low / scale)).clamp(qmin, qmax).to(zero.dtype)
    q = quantize_affine(w, block, scale, zero, torch.int8, qmin, qmax)  # (out, in) int8, w = (q - zero) * scale
    scale = scale.reshape(w.shape[0], -1).float()
    zero = zero.reshape(w.shape[0], -1).float()
    codes = (q.to(torch.int16) - qmin).to(torch.uint8)
    return QuantTensor(codes, scale, (qmin - zero) * scale, bits, group)


def snap_fp16(x: torch.Tensor, away: bool = False) -> torch.Tensor:
    """The nearest fp16 value of each element (`away`: the nearest at least as far from zero), held in fp32; an
    element fp16 cannot hold (overflow, or a nonzero value that underflows to zero) keeps its fp32 value, and the
    tensor then reports `fp16_scales()` False."""
    import torch

    snapped = x.half().float()
    if away:
        short = snapped.abs() < x.abs()
        bumped = torch.nextafter(snapped.half(), torch.sign(x).half() * torch.inf).float()
        snapped = torch.where(short, bumped, snapped)
    keep = torch.isfinite(snapped) & ((snapped != 0) | (x == 0))
    return torch.where(keep, snapped, x)


def fp16_grid(scale: torch.Tensor, offset: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, offset) moved to the nearest grid whose scale and residual offset (offset + 2**(bits-1) * scale)
    are fp16 values; a symmetric offset (-2**(bits-1) * scale) stays symmetric. Choose the codes after this."""
    mid = 2 ** (bits - 1)
    residual = snap_fp16(offset + mid * scale)  # w = scale * (codes - mid) + residual, before and after
    scale = snap_fp16(scale)
    return scale, residual - mid * scale


def _pow2_factor(x: torch.Tensor, top: int) -> torch.Tensor:
    """Per row of `x`, the smallest power of two f with max |x| / f <= top (1 for an all-zero row), (rows, 1)."""
    import torch

    peak = x.abs().amax(1, keepdim=True)
    exponent = torch.ceil(torch.log2(torch.where(peak > 0, peak, torch.ones_like(peak)) / top))
    return torch.exp2(exponent.clamp(-126, 127))


def grid_8bit(scale: torch.Tensor, offset: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, offset) moved to the nearest grid whose scales are, row by row, codes 1..255 times one power of two
    and whose residual offsets (offset + 2**(bits-1) * scale) are codes -127..127 times another. A power-of-two
    factor keeps every product exact in fp32, fp16 and bf16. Choose the codes after this."""
    import torch

    mid = 2 ** (bits - 1)
    residual = offset + mid * scale
    f = _pow2_factor(scale, 255)
    scale = (scale / f).round().clamp(1, 255) * f
    g = _pow2_factor(residual, 127)
    residual = (residual / g).round().clamp(-127, 127) * g
    return scale, residual - mid * scale


def snap_grid(scale: torch.Tensor, offset: torch.Tensor, bits: int, scale_bits: int) -> tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
    """The stage's float-offset grid at `scale_bits` (16: `fp16_grid`; 8: `grid_8bit`)."""
    return grid_8bit(scale, offset, bits) if scale_bits == 8 else fp16_grid(scale, offset, bits)


def _pow2_codes(x: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    import torch

    f = _pow2_factor(x, 127 if signed else 255)
    codes = x / f
    if not torch.equal(codes.round() * f, x) or (not signed and bool((codes < 0).any())):
        return None
    return codes.round().to(torch.int8 if signed else torch.uint8), f
