"""Shape-true models: random weights in the exact configs of the Llamas people ship, made locally.

No checkpoint of these sizes can be downloaded here, yet whether a build fits a machine, how long each stage takes
and whether Llama 3's specifics (a 128k vocabulary, `llama3` RoPE scaling, an untied output layer) survive every
exporter depend on the shapes alone. Each entry is written once into `$COMPRESS_HOME/models/NAME/hf` as an
ordinary HF directory (safetensors, config.json, a tokenizer), so it loads like a user's checkpoint.

The weights are transformers' own initialisation (normal, std `initializer_range`) from a fixed seed, and the
tokenizer is SmolLM2's (49152 tokens; a larger model vocabulary leaves the extra ids unused, as padded
vocabularies do). Accuracy figures on these models say how closely an artifact follows its own fp32 reference,
nothing about language quality.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compress.home import compress_home
from compress.models.gguf import SOURCE_INFO

_LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
_LLAMA32 = {"vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
            "rope_parameters": _LLAMA3_ROPE, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": True}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


@dataclass(frozen=True)
class ShapeModel:
    name: str
    description: str
    config: dict[str, Any] = field(default_factory=dict)  # LlamaConfig keyword arguments
    seed: int = 0

    def checkpoint_dir(self) -> Path:
        return compress_home() / "models" / self.name / "hf"

    def is_made(self) -> bool:
        return (self.checkpoint_dir() / "config.json").is_file()


SHAPES: dict[str, ShapeModel] = {m.name: m for m in (
    ShapeModel("smollm2-360m-shape", "random weights, SmolLM2-360M's config (hidden 960, 32 layers, GQA 15/5, "
                                     "MLP 2560, vocab 49152, tied)",
               {"hidden_size": 960, "num_hidden_layers": 32, "num_attention_heads": 15, "num_key_value_heads": 5,
                "intermediate_size": 2560, "vocab_size": 49152, "max_position_embeddings": 8192,
                "rms_norm_eps": 1e-5, "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0},
                "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": True}),
    ShapeModel("llama-3.2-1b-shape", "random weights, Llama 3.2 1B's config (hidden 2048, 16 layers, GQA 32/8, "
                                     "MLP 8192, vocab 128256, tied, llama3 RoPE scaling)",
               {**_LLAMA32, "hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32,
                "num_key_value_heads": 8, "intermediate_size": 8192, "head_dim": 64}),
    ShapeModel("llama-3.2-1b-untied-shape", "llama-3.2-1b-shape with an untied output layer",
               {**_LLAMA32, "hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32,
                "num_key_value_heads": 8, "intermediate_size": 8192, "head_dim": 64, "tie_word_embeddings": False}),
    ShapeModel("llama-3.2-3b-shape", "random weights, Llama 3.2 3B's config (hidden 3072, 28 layers, GQA 24/8, "
                                     "MLP 8192, vocab 128256, tied, llama3 RoPE scaling)",
               {**_LLAMA32, "hidden_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 24,
                "num_key_value_heads": 8, "intermediate_size": 8192, "head_dim": 128}),
)}


def make(entry: ShapeModel, tokenizer_dir: Path, console: Any) -> Path:
    """Write `entry`'s checkpoint (once; later calls return the directory) with the tokenizer of `tokenizer_dir`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    final = entry.checkpoint_dir()
    if entry.is_made():
        return final
    tmp = final.with_name(f".hf.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    with console.step(f"Making {entry.name} (random weights, once, cached)") as step:
        config = LlamaConfig(**entry.config, architectures=["LlamaForCausalLM"])
        torch.manual_seed(entry.seed)
        model = LlamaForCausalLM(config).to(torch.float32).eval()
        model.save_pretrained(tmp, safe_serialization=True)
        params = sum(p.numel() for p in model.parameters())
        del model
        for name in _TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copy2(tokenizer_dir / name, tmp / name)
        # The record checkpoint_hash memoises the tree hash in, as for a converted GGUF.
        (tmp / SOURCE_INFO).write_text(json.dumps({"shape": entry.name, "seed": entry.seed,
                                                   "tokenizer": tokenizer_dir.parent.name}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        step["detail"] = f"{params / 1e9:.2f}B parameters"
    return final
