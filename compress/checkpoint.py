"""How a stage's output is stored in the cache: an ordinary HF safetensors checkpoint, plus the quantize stage's
codes (compress.quantized) when it produced them; and how an owned model gets the float weights of such a checkpoint
(or of the source model's) back in place."""

from __future__ import annotations

import functools
from collections.abc import Callable
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


def float_restorer(model: Any, directory: Path) -> Callable[[Any], None] | None:
    """A function that writes the float weights saved in `directory` (an HF safetensors checkpoint of `model`,
    which is what `model` was loaded from) back into a model of the same shape, in place, one tensor at a time:
    so a stage that owns `model` may overwrite its weights and have them back without a second fp32 copy. None when
    the files do not name every parameter of `model` (a checkpoint whose keys transformers renames on loading):
    the stage then keeps a copy instead. Reading only the files' headers, this costs nothing up front."""
    from safetensors import safe_open

    names = {name for name, _ in model.named_parameters()}  # a tied lm_head is listed once, as the embedding
    files = sorted(directory.glob("*.safetensors"))
    found: set[str] = set()
    for file in files:
        with safe_open(file, framework="pt") as f:
            found.update(k for k in f.keys() if k in names)  # noqa: SIM118 (safe_open is not a mapping)
    if not files or found != names:
        return None
    return functools.partial(_restore, files=tuple(files), names=frozenset(names))


def _restore(model: Any, files: tuple[Path, ...], names: frozenset[str]) -> None:
    import torch
    from safetensors import safe_open

    params = dict(model.named_parameters())
    with torch.no_grad():
        for file in files:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():  # noqa: SIM118
                    if key in names:  # a bf16 checkpoint widens to fp32 exactly as loading it did
                        params[key].copy_(f.get_tensor(key))
