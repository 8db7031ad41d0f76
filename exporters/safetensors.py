"""The reference format: a plain HF checkpoint (safetensors) in a chosen dtype, run by eager PyTorch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compress.exporters.base import atomic_dir, model_problems

from compress.artifact import Artifact, Availability, Dtype
from compress.config import check_fields, setting
from compress.errors import Problem
from compress.hashing import files_under
from compress.quantized import QuantizeConfig, QuantizedWeights
from compress.rope import RopeType


@dataclass(frozen=True)
class SafetensorsOptions:
    dtype: Dtype = Dtype.FLOAT32
    max_context: int = setting(2048, ge=16, le=131072)

    def __post_init__(self) -> None:
        check_fields(self)

    def codes_problems(self, q: QuantizeConfig) -> list[Problem]:
        return []  # the checkpoint holds the codes' exact dequantized values

    def model_problems(self, config: Any, q: QuantizeConfig | None) -> list[Problem]:
        """transformers runs the checkpoint, so any RoPE it reads is fine; only the context is checked."""
        return model_problems(config, self.max_context, tuple(RopeType), "the safetensors exporter")


class SafetensorsExporter:
    format = "safetensors"  # targets.yaml's export.format
    options = SafetensorsOptions
    runtimes = ("torch_eager",)  # the runtimes that run this format
    artifact_name = "checkpoint"  # its name in the build directory
    version = "1"

    def availability(self) -> Availability:
        return Availability(True)

    def export(self, model: Any, tokenizer: Any, options: SafetensorsOptions, out_dir: Path,
               console: Any,
               quantized: QuantizedWeights | None = None) -> Artifact:
        import copy

        import torch

        dtype = getattr(torch, options.dtype.value)
        with atomic_dir(out_dir) as tmp:
            copy.deepcopy(model).to(dtype).save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        files = tuple(str(p) for p in files_under(out_dir))
        return Artifact(out_dir, self.format, files, max_context=options.max_context,
                        vocab_size=int(model.config.vocab_size), record={"dtype": options.dtype.value})
