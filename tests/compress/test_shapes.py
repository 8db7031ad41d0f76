"""Shape-true models: the published parameter counts, and a made directory that loads like a user's checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from compress.memory import parameter_count
from compress.models import SourceKind, resolve, shapes
from compress.models.hf import load_hf_dir
from compress.progress import Console


@pytest.mark.parametrize("name,params", [
    ("smollm2-360m-shape", 361_821_120),  # SmolLM2-360M's safetensors
    ("llama-3.2-1b-shape", 1_235_814_400),  # Llama 3.2 1B's model card: 1.23B
    ("llama-3.2-1b-untied-shape", 1_235_814_400 + 128256 * 2048),
    ("llama-3.2-3b-shape", 3_212_749_824),  # Llama 3.2 3B: 3.21B
])
def test_shapes_have_the_published_parameter_counts(name: str, params: int):
    from transformers import LlamaConfig

    assert parameter_count(LlamaConfig(**shapes.SHAPES[name].config)) == params


def test_a_shape_model_is_made_once_and_loads_like_a_checkpoint(tiny_dir: Path, isolated_home: Path,
                                                               monkeypatch: pytest.MonkeyPatch):
    small = shapes.ShapeModel("llama-3.2-tiny-shape", "test", {
        **shapes.SHAPES["llama-3.2-1b-shape"].config, "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128, "head_dim": 16,
        "vocab_size": 300, "bos_token_id": 256, "eos_token_id": 257})
    monkeypatch.setitem(shapes.SHAPES, small.name, small)
    monkeypatch.setattr("compress.models.default.fetch", lambda name, console: tiny_dir)
    source = resolve(small.name, Console(quiet=True))
    assert source.kind is SourceKind.CATALOG and source.checkpoint == small.checkpoint_dir()
    model, tokenizer = load_hf_dir(source.checkpoint)
    assert model.config.rope_parameters["rope_type"] == "llama3" and model.config.vocab_size == 300
    assert tokenizer("hi").input_ids and len(tokenizer) <= 300
    stamp = (source.checkpoint / "model.safetensors").stat().st_mtime_ns
    again = resolve(small.name, Console(quiet=True))  # made once: the same files, the same hash
    assert again.sha256 == source.sha256 and (source.checkpoint / "model.safetensors").stat().st_mtime_ns == stamp
