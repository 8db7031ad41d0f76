"""Quantized weights as the quantize stage hands them to every exporter: unsigned codes on a per-group grid.

    w[n, k] = scale[n, k // group] * codes[n, k] + offset[n, k // group]      codes in 0 .. 2**bits - 1

Every affine scheme is one of these: symmetric (offset = -2**(bits-1) * scale), asymmetric with an integer zero
point z (offset = -z * scale), and GGUF's Q4_1 or HQQ's float zero points (offset any float). Exporters lower the
codes as they are, without re-rounding; `integer_zero_points` and `residual_offset` give them the two forms their
kernels take (a zero point, or signed codes plus a per-group correction).

On disk (beside a stage's HF checkpoint): one safetensors file, `<name>.codes|scale|offset` per tensor, with
bits/group per tensor and the stage's scheme in its metadata.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

FILE = "compress-quantized.safetensors"


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
    """What the quantize stage produced: a QuantTensor per quantized linear (HF module names) and the scheme."""

    tensors: dict[str, QuantTensor]
    scheme: dict[str, Any] = field(default_factory=dict)  # activations, embedding, lm_head, algorithm, ...

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        flat, layout = {}, {}
        for name, t in self.tensors.items():
            flat[f"{name}.codes"] = t.codes.contiguous()
            flat[f"{name}.scale"] = t.scale.contiguous()
            flat[f"{name}.offset"] = t.offset.contiguous()
            layout[name] = {"bits": t.bits, "group": t.group}
        save_file(flat, str(directory / FILE), metadata={"layout": json.dumps(layout),
                                                        "scheme": json.dumps(self.scheme)})

    @classmethod
    def load(cls, directory: Path) -> QuantizedWeights | None:
        path = directory / FILE
        if not path.is_file():
            return None
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            layout = json.loads(meta["layout"])
            tensors = {name: QuantTensor(f.get_tensor(f"{name}.codes"), f.get_tensor(f"{name}.scale"),
                                         f.get_tensor(f"{name}.offset"), spec["bits"], spec["group"])
                       for name, spec in layout.items()}
        return cls(tensors, json.loads(meta["scheme"]))

    def export_config(self) -> Any:
        """The scheme as an exporter-level QuantizeConfig: what a format's graph layout (bits, block, activations,
        embedding and lm_head precision) follows before the codes are lowered into it."""
        from compress.stages.configs import Activations, Precision, QuantizeConfig

        s = self.scheme
        return QuantizeConfig(weight_bits=s["weight_bits"], group_size=s["group_size"], symmetric=True,
                              activations=Activations(s["activations"]), embedding=Precision(s["embedding"]),
                              lm_head=Precision(s["lm_head"]))

    def bits_summary(self) -> dict[str, Any]:
        """Average code bits and stored bits (codes + fp32 scale and offset) per weight, lm_head apart."""
        body = {n: t for n, t in self.tensors.items() if n != "lm_head"}
        weights = sum(t.codes.numel() for t in body.values())
        if not weights:
            return {"linear_weights": 0}
        code_bits = sum(t.codes.numel() * t.bits for t in body.values())
        meta_bits = sum(t.scale.numel() * 32 * 2 for t in body.values())
        return {"linear_weights": weights, "avg_code_bits": round(code_bits / weights, 3),
                "avg_stored_bits": round((code_bits + meta_bits) / weights, 3),
                "bits_histogram": {str(b): sum(1 for t in body.values() if t.bits == b)
                                   for b in sorted({t.bits for t in body.values()})}}


ATTRIBUTE = "compress_quantized"  # where a model carries its QuantizedWeights between stages and exporters


def quantized_weights(model: Any) -> QuantizedWeights | None:
    return getattr(model, ATTRIBUTE, None)
