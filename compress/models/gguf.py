"""GGUF files: inspect the metadata cheaply, convert once to an ordinary fp32 HF checkpoint.

transformers dequantizes a GGUF to fp32 (~20 s for the 135M default) and then refuses
`save_pretrained` ("quantized with gguf"), so the weights are moved into a plain `LlamaForCausalLM`
built from the same config without its quantization_config, and that is saved as safetensors.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from compress.errors import InputError
from compress.hashing import sha256_file, sha256_tree
from compress.models.hf import check_architecture

GGUF_MAGIC = b"GGUF"
SOURCE_INFO = "compress-source.json"  # written beside a converted checkpoint
# The source GGUF's identity, kept in SOURCE_INFO under "general" so a GGUF written from the checkpoint names it.
GENERAL_KEYS = ("name", "basename", "size_label", "license", "organization", "finetune")


def source_general(checkpoint: Path) -> dict[str, str]:
    """The `general.*` metadata recorded from a converted checkpoint's source GGUF ({} for other checkpoints)."""
    info = checkpoint / SOURCE_INFO
    return dict(json.loads(info.read_text()).get("general", {})) if info.is_file() else {}


def gguf_metadata(path: Path) -> dict[str, Any]:
    """A few metadata fields (architecture, name, file type) read without loading tensors."""
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise InputError(f"{path}: not a GGUF file (bad magic bytes)")
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as err:
        raise InputError(f"{path}: unreadable GGUF ({type(err).__name__}: {err})") from None

    def text(key: str) -> str | None:
        field = reader.fields.get(key)
        return bytes(field.parts[field.data[0]]).decode() if field is not None else None

    general = {k: text(f"general.{k}") for k in GENERAL_KEYS}
    return {"architecture": text("general.architecture"), "name": text("general.name"),
            "tensors": len(reader.tensors), "general": {k: v for k, v in general.items() if v}}


def check_gguf(path: Path) -> dict[str, Any]:
    meta = gguf_metadata(path)
    arch = meta["architecture"]
    check_architecture(arch, ["LlamaForCausalLM"] if arch == "llama" else [arch or "unknown"], str(path))
    return meta


def convert_gguf(path: Path, out_dir: Path, console: Any, extra_info: dict[str, Any] | None = None) -> Path:
    """Write `out_dir` (safetensors + config + tokenizer) from a GGUF; atomic: all or nothing."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    general = check_gguf(path)["general"]
    with console.step(f"Converting {path.name} to an fp32 checkpoint (once; cached)") as step:
        gguf_sha = sha256_file(path)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        config = loaded.config.to_dict()
        config.pop("quantization_config", None)
        config.pop("_name_or_path", None)
        plain = LlamaForCausalLM(LlamaConfig.from_dict(config)).to(torch.float32)
        missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
        # A tied lm_head has no tensor of its own; anything else missing means a broken conversion.
        missing = [k for k in missing if not (k == "lm_head.weight" and plain.config.tie_word_embeddings)]
        if missing or unexpected:
            raise InputError(f"{path}: GGUF conversion mismatch (missing {missing[:3]}, unexpected "
                             f"{unexpected[:3]})")
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        plain.eval().save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _drop_volatile_keys(tmp / "tokenizer_config.json")
        info = {"gguf": path.name, "gguf_sha256": gguf_sha, "general": general, **(extra_info or {})}
        (tmp / SOURCE_INFO).write_text(json.dumps(info, indent=2))
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.rename(out_dir)
        step["detail"] = f"{sum(p.numel() for p in plain.parameters()) / 1e6:.1f}M parameters"
    return out_dir


_VOLATILE_TOKENIZER_KEYS = ("local_files_only",)  # records HF_HUB_OFFLINE of the saving process


def _drop_volatile_keys(path: Path) -> None:
    """Keep a conversion byte-identical whatever the environment it ran in."""
    if path.is_file():
        config = json.loads(path.read_text())
        for key in _VOLATILE_TOKENIZER_KEYS:
            config.pop(key, None)
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def checkpoint_hash(path: Path, fresh: bool = False) -> str:
    """Tree hash of a checkpoint dir, memoised in its source-info file for converted checkpoints; `fresh` hashes
    the files again (what `verify` does: a cached checkpoint changed since the build must be seen)."""
    info_file = path / SOURCE_INFO
    info = json.loads(info_file.read_text()) if info_file.is_file() else None
    if info is not None and "checkpoint_sha256" in info and not fresh:
        return info["checkpoint_sha256"]
    digest = sha256_tree(path, exclude=(SOURCE_INFO,))
    if fresh:
        return digest  # the memo keeps the hash of the checkpoint as converted
    if info is not None:
        info["checkpoint_sha256"] = digest
        tmp = info_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(info, indent=2))
        tmp.replace(info_file)
    return digest
