"""GGUF files written from tiny Llamas, read back with gguf's GGUFReader and with transformers' GGUF loader.

None of this needs llama.cpp: f32/f16/Q8_0 are written by gguf-py. tests/runtimes/test_llamacpp.py runs the
files in llama.cpp itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from compress.exporters import gguf as gguf_exporter
from compress.exporters.gguf import GgufExporter, GgufOptions, GgufType, permute_for_rope, pre_tokenizer_name

from compress import llamacpp_lib as llamacpp
from compress.errors import ConfigError, ExportError, RuntimeUnavailable
from compress.models.gguf import convert_gguf
from compress.models.hf import load_hf_dir
from compress.models.tiny import GPT2_MERGES, byte_tokenizer, tiny_llama
from compress.progress import Console
from compress.targets import parse_targets

QUIET = Console(quiet=True)
VOCAB = 259 + len(GPT2_MERGES)
TEXT = "the thin interpreter, in 1234 lines: the end"


def export(tmp: Path, file_type: str, seed: int = 0, **dims) -> tuple[torch.nn.Module, object]:
    model = tiny_llama(seed, vocab_size=VOCAB, **dims)
    art = GgufExporter().export(model, byte_tokenizer(GPT2_MERGES), GgufOptions(file_type=GgufType(file_type),
                                                                                max_context=128),
                                tmp / f"{file_type}.gguf", QUIET)
    return model, art


def read(path: Path):
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items()}
    return reader, fields, {t.name: t for t in reader.tensors}


@pytest.fixture(scope="module")
def f32(tmp_path_factory):
    return export(tmp_path_factory.mktemp("gguf"), "f32")


def test_f32_round_trips_through_the_gguf_importer_to_the_same_model(f32, tmp_path: Path):
    model, art = f32
    # compress/models/gguf.py imports with transformers, which undoes llama.cpp's q/k RoPE permutation itself:
    # an independent check of our layout.
    back, tokenizer = load_hf_dir(convert_gguf(art.path, tmp_path / "hf", QUIET))
    ours, theirs = model.state_dict(), back.state_dict()
    assert set(ours) == set(theirs)
    for name in ours:
        torch.testing.assert_close(theirs[name], ours[name], rtol=0, atol=0, msg=name)
    a, b = model.config, back.config
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size", "max_position_embeddings", "tie_word_embeddings"):
        assert getattr(b, key) == getattr(a, key), key
    assert b.rope_parameters["rope_theta"] == a.rope_parameters["rope_theta"]
    assert b.rms_norm_eps == pytest.approx(a.rms_norm_eps, rel=1e-6)
    source = byte_tokenizer(GPT2_MERGES)
    assert tokenizer(TEXT)["input_ids"] == source(TEXT)["input_ids"]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (source.bos_token_id, source.eos_token_id)
    assert tokenizer.chat_template == source.chat_template


def test_metadata_and_tokenizer_fields(f32):
    _, art = f32
    _, fields, tensors = read(art.path)
    tok = byte_tokenizer(GPT2_MERGES)
    expected = {"general.architecture": "llama", "llama.context_length": 2048, "llama.embedding_length": 64,
                "llama.block_count": 2, "llama.feed_forward_length": 128, "llama.attention.head_count": 4,
                "llama.attention.head_count_kv": 2, "llama.rope.dimension_count": 16,
                "llama.rope.freq_base": 10000.0, "llama.vocab_size": VOCAB, "general.file_type": 0,
                "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
                "tokenizer.ggml.bos_token_id": tok.bos_token_id, "tokenizer.ggml.eos_token_id": tok.eos_token_id,
                "tokenizer.ggml.padding_token_id": tok.pad_token_id, "tokenizer.chat_template": tok.chat_template}
    assert {k: fields.get(k) for k in expected} == expected
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    by_id = {i: t for t, i in tok.get_vocab().items()}
    assert fields["tokenizer.ggml.tokens"] == [by_id[i] for i in range(VOCAB)]
    types = fields["tokenizer.ggml.token_type"]
    assert [i for i, t in enumerate(types) if t == 3] == [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id]
    assert set(types) == {1, 3}  # NORMAL and CONTROL
    assert fields["tokenizer.ggml.merges"] == [f"{a} {b}" for a, b in GPT2_MERGES]
    # Tied embeddings: no output.weight (llama.cpp reuses token_embd); 9 tensors per block + embedding + norm.
    assert "output.weight" not in tensors and len(tensors) == 2 * 9 + 2 == art.record["tensor_count"]
    assert art.record["tensor_type_counts"] == {"F32": 20} and art.record["tensors_quantized"] == 0
    assert art.files == ("f32.gguf",) and art.max_context == 128


def test_q_and_k_are_permuted_for_llama_cpp_rope_and_nothing_else_is(f32):
    model, art = f32
    _, _, tensors = read(art.path)
    layer = model.model.layers[1]

    def stored(name: str) -> np.ndarray:
        t = tensors[name]
        return np.asarray(t.data).reshape(list(reversed(t.shape.tolist())))  # GGUF ne is (in, out)

    q, k = layer.self_attn.q_proj.weight.detach().numpy(), layer.self_attn.k_proj.weight.detach().numpy()
    np.testing.assert_array_equal(stored("blk.1.attn_q.weight"), permute_for_rope(q, 4))
    np.testing.assert_array_equal(stored("blk.1.attn_k.weight"), permute_for_rope(k, 2))
    assert not np.array_equal(stored("blk.1.attn_q.weight"), q)
    np.testing.assert_array_equal(stored("blk.1.attn_v.weight"), layer.self_attn.v_proj.weight.detach().numpy())
    # Within one head of 16 rows: (0..7 | 8..15) becomes (0, 8, 1, 9, ...), the pairs llama.cpp rotates.
    head = np.arange(16, dtype=np.float32)[:, None]
    assert permute_for_rope(head, 1)[:, 0].tolist() == [0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15]


def test_f16_and_q8_0_hold_the_weights_within_their_precision(tmp_path: Path):
    import gguf

    model, f16 = export(tmp_path, "f16")
    _, q8 = export(tmp_path, "q8_0")
    _, _, t16 = read(f16.path)
    _, fields, t8 = read(q8.path)
    assert f16.record["tensor_type_counts"] == {"F16": 15, "F32": 5}
    assert q8.record["tensor_type_counts"] == {"Q8_0": 15, "F32": 5} and q8.record["tensors_quantized"] == 15
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    w = model.model.layers[0].mlp.down_proj.weight.detach().numpy()  # (64, 128)
    np.testing.assert_array_equal(np.asarray(t16["blk.0.ffn_down.weight"].data), w.astype(np.float16))
    raw = t8["blk.0.ffn_down.weight"]
    deq = gguf.quants.dequantize(np.asarray(raw.data), gguf.GGMLQuantizationType.Q8_0).reshape(w.shape)
    # Q8_0: blocks of 32 along a row, step = absmax / 127: rounding costs half a step, and storing the step in
    # f16 (relative error 2^-11) up to 127 of those at the block's largest value.
    blocks = w.reshape(-1, 32)
    step = np.abs(blocks).max(axis=1, keepdims=True) / 127
    err = np.abs(deq.reshape(-1, 32) - blocks)
    assert (err <= step * (0.5 + 127 * 2**-11)).all()
    assert 0 < err.max() and np.abs(deq - w).mean() < 0.3 * step.mean()
    norm = model.model.layers[0].input_layernorm.weight.detach().numpy()
    np.testing.assert_array_equal(np.asarray(t8["blk.0.attn_norm.weight"].data), norm)  # norms stay f32


def test_q8_0_falls_back_to_f16_for_rows_that_are_not_whole_blocks(tmp_path: Path):
    # hidden 48: rows of 48 are not a multiple of Q8_0's 32-wide blocks; ffn_down's rows (128 wide) are.
    _, art = export(tmp_path, "q8_0", hidden_size=48, num_attention_heads=4, num_key_value_heads=2)
    assert art.record["tensor_types"]["ffn_down.weight"] == {"Q8_0": 2}
    assert art.record["tensor_types"]["attn_q.weight"] == {"F16": 2}
    assert len(art.record["fallbacks"]) == 13 and "48 columns are not whole Q8_0 blocks" in art.record["fallbacks"][0]


def test_llama_cpp_pre_tokenizer_names():
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    assert pre_tokenizer_name({"pre_tokenizer": byte_level}) == "gpt-2"
    smollm = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]}
    assert pre_tokenizer_name({"pre_tokenizer": smollm}) == "smollm"
    llama3 = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": gguf_exporter._LLAMA3_SPLIT}, "behavior": "Isolated"},
        {**byte_level, "use_regex": False}]}
    assert pre_tokenizer_name({"pre_tokenizer": llama3}) == "llama-bpe"
    with pytest.raises(ExportError, match="Metaspace.*has no known llama.cpp equivalent.*known: ByteLevel"):
        pre_tokenizer_name({"pre_tokenizer": {"type": "Metaspace"}})


def test_bad_input_fails_cleanly_and_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    with pytest.raises(ConfigError, match=r"export.file_type: 'q3' is not valid; choose one of 'f32', 'f16', "
                                          r"'q8_0', 'q4_0', 'q4_k_m', 'q5_k_m'"):
        parse_targets({"version": 1, "targets": {"t": {"export": {"format": "gguf", "file_type": "q3"},
                                                       "runtime": "llamacpp"}}})
    model = tiny_llama(0, vocab_size=VOCAB)
    out = tmp_path / "model.gguf"
    with pytest.raises(ExportError, match="max_context 4096 exceeds the model's max_position_embeddings 2048"):
        GgufExporter().export(model, byte_tokenizer(GPT2_MERGES), GgufOptions(GgufType.F32, max_context=4096), out,
                              QUIET)
    with pytest.raises(ExportError, match="no BPE merges; llama.cpp's gpt2 tokenizer needs at least one"):
        GgufExporter().export(tiny_llama(0), byte_tokenizer(), GgufOptions(file_type=GgufType.F16), out, QUIET)
    assert list(tmp_path.iterdir()) == []

    def crash(path: Path) -> None:  # the whole file is written, the rename has not happened yet
        assert path.stat().st_size > 0
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_exporter, "describe_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        GgufExporter().export(model, byte_tokenizer(GPT2_MERGES), GgufOptions(file_type=GgufType.F32), out, QUIET)
    assert list(tmp_path.iterdir()) == []  # no half-written model.gguf, no temporary left over
    monkeypatch.setattr(llamacpp, "installed", lambda: False)
    with pytest.raises(RuntimeUnavailable, match=r"'q4_k_m' needs llama.cpp's quantizer.*compress\[llamacpp\]"):
        GgufExporter().export(model, byte_tokenizer(GPT2_MERGES), GgufOptions(), out, QUIET)
    assert list(tmp_path.iterdir()) == []


def test_cli_builds_an_unverified_gguf_without_llama_cpp(tmp_path: Path, cli):
    import yaml

    from compress.models.tiny import save_tiny_llama

    model_dir = save_tiny_llama(tmp_path / "tiny", merges=GPT2_MERGES)
    targets = tmp_path / "t.yaml"
    targets.write_text(yaml.safe_dump({"version": 1, "targets": {"g": {
        "export": {"format": "gguf", "file_type": "q8_0", "max_context": 256}, "runtime": "llamacpp"}}}))
    out = tmp_path / "out"
    result = cli("build", "--target", "g", "--model", str(model_dir), "--out", str(out), "--targets", str(targets),
                 "--no-verify")
    assert result.code == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["artifact"]["path"] == "model.gguf" and manifest["artifact"]["record"]["file_type"] == "q8_0"
    assert manifest["artifact"]["file_hashes"][0]["bytes"] == (out / "model.gguf").stat().st_size


def test_general_metadata_names_the_source_model(f32, tmp_path: Path):
    """general.name/basename/size_label/license come from the source GGUF a checkpoint was converted from; a plain
    HF directory gives its own name and a size label computed from the parameter count."""
    from compress.models.tiny import save_tiny_llama

    _, art = f32
    hf = convert_gguf(art.path, tmp_path / "tiny-test" / "hf", QUIET)
    info = json.loads((hf / "compress-source.json").read_text())
    assert info["general"]["size_label"]  # recorded from the source file at conversion
    info["general"].update(name="Tiny Test", basename="tiny-test", license="apache-2.0")  # as a hub GGUF has
    (hf / "compress-source.json").write_text(json.dumps(info))
    model, tokenizer = load_hf_dir(hf)
    out = GgufExporter().export(model, tokenizer, GgufOptions(file_type=GgufType.F32), tmp_path / "a.gguf", QUIET)
    _, fields, _ = read(out.path)
    assert (fields["general.name"], fields["general.basename"], fields["general.license"]) == \
        ("Tiny Test", "tiny-test", "apache-2.0")

    plain, tokenizer = load_hf_dir(save_tiny_llama(tmp_path / "my-llama", seed=0, merges=GPT2_MERGES))
    out = GgufExporter().export(plain, tokenizer, GgufOptions(file_type=GgufType.F32), tmp_path / "b.gguf", QUIET)
    _, fields, _ = read(out.path)
    params = sum(p.numel() for p in plain.parameters())
    assert fields["general.name"] == "my-llama" and fields["general.size_label"] == f"{params / 1e3:.0f}K"
    assert "general.license" not in fields


def test_llama3_rope_is_written_as_llama_cpp_frequency_factors(tmp_path: Path):
    from compress.rope import default_inv_freq

    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    model, art = export(tmp_path, "f32", hidden_size=128, num_attention_heads=4, rope_scaling=scaling)
    _, fields, tensors = read(art.path)
    factors = np.asarray(tensors["rope_freqs.weight"].data)  # (head_dim / 2,)
    hf_freq = model.model.rotary_emb.inv_freq.double().numpy()
    np.testing.assert_allclose(default_inv_freq(10000.0, 32).numpy() / factors, hf_freq, rtol=1e-6)
    assert factors[0] == 1.0 and factors[-1] == 32.0  # high frequencies kept, the lowest divided by the factor
    assert "llama.rope.scaling.type" not in fields


def test_an_unsupported_rope_scaling_is_an_export_error(tmp_path: Path):
    with pytest.raises(ExportError, match="RoPE scaling 'dynamic' is not supported by the GGUF exporter"):
        export(tmp_path, "f32", rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    assert not (tmp_path / "f32.gguf").exists()
