"""How a model between stages is stored in the cache: an ordinary HF safetensors checkpoint, plus the quantize
stage's codes (compress.stages.qtensor) when the model carries them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compress.stages.qtensor import ATTRIBUTE, QuantizedWeights, quantized_weights


def save_model(model: Any, path: Path) -> None:
    model.save_pretrained(path, safe_serialization=True)
    if (qw := quantized_weights(model)) is not None:
        qw.save(path)


def load_model(path: Path) -> Any:
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True).eval()
    if (qw := QuantizedWeights.load(path)) is not None:
        setattr(model, ATTRIBUTE, qw)
    return model
