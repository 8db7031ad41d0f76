"""How a stage's output is stored in the cache: an ordinary HF safetensors checkpoint, plus the quantize stage's
codes (compress.quantized) when it produced them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compress.quantized import QuantizedWeights


def save_stage(model: Any, quantized: QuantizedWeights | None, path: Path) -> None:
    model.save_pretrained(path, safe_serialization=True)
    if quantized is not None:
        quantized.save(path)


def load_stage(path: Path) -> tuple[Any, QuantizedWeights | None]:
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True).eval()
    return model, QuantizedWeights.load(path)
