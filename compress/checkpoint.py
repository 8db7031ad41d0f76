"""How a model between stages is stored in the cache: an ordinary HF safetensors checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def save_model(model: Any, path: Path) -> None:
    model.save_pretrained(path, safe_serialization=True)


def load_model(path: Path) -> Any:
    import torch
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True).eval()
