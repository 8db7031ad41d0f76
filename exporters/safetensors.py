"""The reference format: a plain HF checkpoint (safetensors) in a chosen dtype, run by eager PyTorch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compress.exporters.base import atomic_dir

from compress.artifact import Artifact, Availability, Format
from compress.export_options import SafetensorsOptions
from compress.hashing import files_under
from compress.quantized import QuantizedWeights


class SafetensorsExporter:
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
        return Artifact(out_dir, Format.SAFETENSORS, files, max_context=options.max_context,
                        vocab_size=int(model.config.vocab_size), record={"dtype": options.dtype.value})
