"""Hugging Face checkpoints: a local directory (safetensors + config.json + tokenizer) or a hub id.

Only Llama-family causal LMs are accepted, only safetensors are read (a pickle is never loaded) and
remote code is never trusted.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from compress.errors import InputError

SUPPORTED_MODEL_TYPES = {"llama": "LlamaForCausalLM"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.model", "*.txt"]


def supported_text() -> str:
    return ", ".join(f"{t} ({a})" for t, a in SUPPORTED_MODEL_TYPES.items())


def check_architecture(model_type: str | None, architectures: list[str] | None, where: str) -> None:
    """Refuse anything that is not a Llama causal LM, naming what was found and what is supported."""
    arch = ", ".join(architectures or []) or "no architectures listed"
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise InputError(f"{where}: architecture {model_type!r} ({arch}) is not supported; "
                         f"supported: {supported_text()}")
    expected = SUPPORTED_MODEL_TYPES[model_type]
    if architectures and expected not in architectures:
        raise InputError(f"{where}: {arch} is not a causal LM head compress supports; expected {expected}")


def read_config(path: Path) -> dict[str, Any]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise InputError(f"{path}: not a model directory (no config.json)")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{config_file}: not valid JSON ({err.msg} at line {err.lineno})") from None
    check_architecture(config.get("model_type"), config.get("architectures"), str(path))
    return config


def check_hf_dir(path: Path) -> dict[str, Any]:
    """Validate a local checkpoint directory before any slow load; returns its config."""
    config = read_config(path)
    if not list(path.glob("*.safetensors")):
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".ckpt"})
        found = f"only {', '.join(pickles)}" if pickles else "no weights"
        raise InputError(f"{path}: {found}; compress reads safetensors only and never unpickles a "
                         f"checkpoint (convert with `save_pretrained(..., safe_serialization=True)`)")
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer.model").is_file():
        raise InputError(f"{path}: no tokenizer (tokenizer.json or tokenizer.model) beside the weights")
    check_vocabulary(path, config)
    return config


def check_vocabulary(path: Path, config: dict[str, Any]) -> None:
    """Every id the tokenizer produces from text must have a row in the embedding (a larger model vocabulary is
    padding)."""
    tokenizer = path / "tokenizer.json"
    if not tokenizer.is_file() or not isinstance(config.get("vocab_size"), int):
        return
    try:
        spec = json.loads(tokenizer.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(f"{tokenizer}: not valid JSON") from None
    vocab = (spec.get("model") or {}).get("vocab")
    ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab or [])))
    # Special added tokens are left out: converters append some (transformers' GGUF reader adds <|endoftext|>) that
    # text never produces.
    ids += [t.get("id", -1) for t in spec.get("added_tokens") or [] if not t.get("special")]
    top = max((i for i in ids if isinstance(i, int)), default=-1)
    if top >= config["vocab_size"]:
        raise InputError(f"{path}: the tokenizer produces ids up to {top} but the model's vocab_size is "
                         f"{config['vocab_size']}: a tokenizer from another model?")


def load_hf_dir(path: Path) -> tuple[Any, Any]:
    """(model in fp32 eval mode, tokenizer) from a validated local directory."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    check_hf_dir(path)
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True,
                                             trust_remote_code=False).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    return model, tokenizer


def looks_like_hub_id(spec: str) -> bool:
    return bool(_HUB_ID.match(spec)) and not Path(spec).exists()


def download_hub_model(repo_id: str) -> Path:
    """Snapshot a hub repo's safetensors/config/tokenizer files; offline, say to pass a local path."""
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES))
    except Exception as err:  # offline, unknown repo, gated: all end in the same advice
        reason = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
        raise InputError(f"model {repo_id!r} is not a local path and could not be fetched from the hub "
                         f"({type(err).__name__}: {reason}); download it elsewhere and pass the local "
                         f"directory or .gguf file") from None
    return path
