from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from compress import models
from compress.errors import InputError
from compress.models.tiny import tiny_llama
from compress.progress import Console

QUIET = Console(quiet=True)


def test_tiny_llama_is_deterministic_and_grouped_query():
    a, b, c = tiny_llama(seed=1), tiny_llama(seed=1), tiny_llama(seed=2)
    for (name, pa), (_, pb), (_, pc) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters()):
        assert torch.equal(pa, pb), name
        if pa.numel() > 1 and not name.endswith("norm.weight"):
            assert not torch.equal(pa, pc), name
    attn = a.model.layers[0].self_attn
    assert attn.k_proj.out_features * 2 == attn.q_proj.out_features  # 4 query heads share 2 KV heads
    wide = tiny_llama(seed=0, num_hidden_layers=3, hidden_size=96, num_attention_heads=6, num_key_value_heads=3)
    assert len(wide.model.layers) == 3 and wide.config.hidden_size == 96


def test_hf_directory_loads_to_the_same_model(tiny_dir: Path):
    source = models.resolve(str(tiny_dir), QUIET)
    assert source.kind is models.SourceKind.HF_DIR and len(source.sha256) == 64
    assert source.reopen == str(tiny_dir.resolve())
    loaded = models.load(source)
    ids = torch.tensor([[1, 2, 3, 50, 60]])
    with torch.no_grad():
        np.testing.assert_array_equal(loaded.model(ids).logits.numpy(), tiny_llama(seed=0)(ids).logits.numpy())
    assert loaded.tokenizer.decode(loaded.tokenizer("a b")["input_ids"]) == "a b"
    assert models.resolve(str(tiny_dir), QUIET).sha256 == source.sha256  # content hash is stable


def _copy_with_config(tiny_dir: Path, dest: Path, **changes) -> Path:
    shutil.copytree(tiny_dir, dest)
    config = json.loads((dest / "config.json").read_text())
    config.update(changes)
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def test_non_llama_architecture_is_refused_naming_both(tiny_dir: Path, tmp_path: Path):
    other = _copy_with_config(tiny_dir, tmp_path / "gpt2", model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(InputError, match=r"architecture 'gpt2' \(GPT2LMHeadModel\) is not supported; "
                                         r"supported: llama \(LlamaForCausalLM\)"):
        models.resolve(str(other), QUIET)
    head = _copy_with_config(tiny_dir, tmp_path / "cls", architectures=["LlamaForSequenceClassification"])
    with pytest.raises(InputError, match="LlamaForSequenceClassification is not a causal LM head"):
        models.resolve(str(head), QUIET)


def test_pickle_checkpoints_are_never_loaded(tiny_dir: Path, tmp_path: Path):
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_dir, pickled)
    (pickled / "model.safetensors").unlink()
    (pickled / "pytorch_model.bin").write_bytes(b"not even opened")
    with pytest.raises(InputError, match="only pytorch_model.bin; compress reads safetensors only and never "
                                         "unpickles"):
        models.resolve(str(pickled), QUIET)


def test_missing_paths_and_unreachable_hub_ids_say_what_to_do(tmp_path: Path, monkeypatch):
    with pytest.raises(InputError, match="is not a catalog name .* an existing directory or .gguf file"):
        models.resolve(str(tmp_path / "nothing-here"), QUIET)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match="could not be fetched from the hub .* pass the local directory"):
        models.resolve("HuggingFaceTB/SmolLM2-135M-Instruct-not-cached", QUIET)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(InputError, match="a model file must be a .gguf"):
        models.resolve(str(tmp_path / "weights.bin"), QUIET)


def test_gguf_files_are_inspected_before_any_slow_load(tmp_path: Path):
    import gguf

    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 this is a zip")
    with pytest.raises(InputError, match="not a GGUF file"):
        models.resolve(str(fake), QUIET)
    gpt2 = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(gpt2), "gpt2")
    writer.add_name("a gpt2")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(InputError, match="architecture 'gpt2' .* supported: llama"):
        models.resolve(str(gpt2), QUIET)


def test_unknown_catalog_model_lists_the_catalog(cli):
    result = cli("models", "fetch", "smollm3")
    assert result.code == 2
    assert result.stderr.strip() == "error: unknown model 'smollm3'; catalog: smollm2-135m, smollm2-135m-offgrid"
    listed = cli("models", "list")
    assert listed.code == 0 and "smollm2-135m (default)" in listed.stdout


def test_a_tokenizer_with_ids_beyond_the_embedding_is_refused(tiny_dir: Path, tmp_path: Path):
    import json
    import shutil

    from compress.errors import InputError
    from compress.models.hf import check_hf_dir

    model = tmp_path / "mismatch"
    shutil.copytree(tiny_dir, model)
    config = json.loads((model / "config.json").read_text())
    config["vocab_size"] = 200  # the byte tokenizer has 259 ids
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="the tokenizer produces ids up to 258 but the model's vocab_size is 200"):
        check_hf_dir(model)
