"""Our GGUF files run in llama.cpp (llama-cpp-python): logits for every position against eager PyTorch.

Skipped where llama-cpp-python is not installed (it is an optional extra: pip compiles llama.cpp).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from compress.exporters.gguf import GgufExporter, GgufOptions, GgufType
from compress.runtimes.base import ContextOverflow, prompt_logits
from compress.runtimes.llamacpp import LlamaCppRuntime

from compress import llamacpp_lib as llamacpp
from compress.errors import RuntimeUnavailable
from compress.models.tiny import GPT2_MERGES, byte_tokenizer, tiny_llama
from compress.progress import Console

QUIET = Console(quiet=True)
VOCAB = 259 + len(GPT2_MERGES)
needs_llamacpp = pytest.mark.skipif(not llamacpp.installed(), reason="llama-cpp-python is not installed "
                                    "(optional extra: pip install 'compress[llamacpp]')")


def kl(ref: np.ndarray, cand: np.ndarray) -> np.ndarray:
    lp, lq = torch.log_softmax(torch.tensor(ref), -1), torch.log_softmax(torch.tensor(cand), -1)
    return (lp.exp() * (lp - lq)).sum(-1).numpy()  # (positions,)


def llama_cpp_tokenize(path: Path, text: str) -> list[int]:
    lib = llamacpp.llama_cpp_quiet()
    params = lib.llama_model_default_params()
    params.vocab_only = True
    model = lib.llama_model_load_from_file(str(path).encode(), params)
    try:
        data = text.encode()
        buf = (lib.llama_token * (len(data) + 8))()
        n = lib.llama_tokenize(lib.llama_model_get_vocab(model), data, len(data), buf, len(buf), False, True)
        return list(buf[:n])
    finally:
        lib.llama_model_free(model)


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(0, vocab_size=VOCAB)


@pytest.fixture(scope="module")
def ggufs(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    types = ("f32", "q8_0", "q4_0", "q4_k_m") if llamacpp.installed() else ("f32",)
    return {t: GgufExporter().export(tiny, byte_tokenizer(GPT2_MERGES),
                                     GgufOptions(file_type=GgufType(t), max_context=640), root / f"{t}.gguf", QUIET)
            for t in types}


def eager(model, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()  # (seq, vocab)


TOKENS = [int(t) for t in torch.randint(0, 256, (600,), generator=torch.Generator().manual_seed(3))]


@needs_llamacpp
def test_f32_gguf_matches_eager_for_prefill_decode_reset_and_long_prefills(tiny, ggufs):
    # exact: f32 KV cache and no flash attention, so any layout or RoPE mistake shows far above float noise.
    session = LlamaCppRuntime(exact=True).load(ggufs["f32"], threads=2)
    assert (session.vocab_size, session.max_context) == (VOCAB, 640)
    expected = eager(tiny, TOKENS[:40])
    got = np.concatenate([session.prefill(TOKENS[:25])] + [session.decode(t)[None] for t in TOKENS[25:40]])
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
    session.reset()  # a new sequence sees nothing of the last one
    np.testing.assert_allclose(session.prefill(TOKENS[:5]), expected[:5], atol=1e-4, rtol=1e-4)
    session.reset()  # 600 tokens: two llama_decode calls (512 + 88), positions carried across them
    np.testing.assert_allclose(session.prefill(TOKENS), eager(tiny, TOKENS), atol=2e-4, rtol=1e-4)
    with pytest.raises(ContextOverflow, match="position 641 exceeds max_context 640"):
        session.prefill(TOKENS[:41])


@needs_llamacpp
def test_a_prompt_s_last_logits_alone_are_the_last_row_and_the_cache_is_the_same(tiny, ggufs):
    """prefill_last asks llama.cpp for one output row (what its own tools do for a prompt), across batches too."""
    session = LlamaCppRuntime(exact=True).load(ggufs["f32"], threads=2)
    expected = eager(tiny, TOKENS)  # (600, vocab)
    np.testing.assert_allclose(prompt_logits(session, TOKENS), expected[-1], atol=2e-4, rtol=1e-4)  # 512 + 88
    session.reset()
    np.testing.assert_allclose(prompt_logits(session, TOKENS[:30]), expected[29], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(session.decode(TOKENS[30]), expected[30], atol=1e-4, rtol=1e-4)  # the cache is whole


@needs_llamacpp
def test_default_runtime_f16_cache_is_within_float_noise(tiny, ggufs):
    session = LlamaCppRuntime().load(ggufs["f32"], threads=1)
    got, expected = session.prefill(TOKENS[:200]), eager(tiny, TOKENS[:200])
    assert kl(expected, got).mean() < 1e-5
    assert (got.argmax(-1) == expected.argmax(-1)).all()


@needs_llamacpp
def test_quantized_types_stay_close_and_record_what_llama_cpp_chose(tiny, ggufs):
    expected = eager(tiny, TOKENS[:200])
    mean_kl = {}
    for t in ("q8_0", "q4_0", "q4_k_m"):
        mean_kl[t] = float(kl(expected, LlamaCppRuntime().load(ggufs[t], threads=2).prefill(TOKENS[:200])).mean())
    assert mean_kl["q8_0"] < 0.005 and mean_kl["q4_k_m"] < 0.1 and mean_kl["q4_0"] < 0.3
    assert mean_kl["q8_0"] < mean_kl["q4_k_m"] < mean_kl["q4_0"]
    q4_0, q4_k_m = ggufs["q4_0"].record, ggufs["q4_k_m"].record
    assert q4_0["quantizer"] == "llama.cpp" and q4_0["tensor_types"]["attn_q.weight"] == {"Q4_0": 2}
    # K-quants need rows that are whole 256-blocks; 64-wide rows fall back, and the record says so.
    assert "Q4_K" not in q4_k_m["tensor_type_counts"] and q4_k_m["tensor_types"]["attn_q.weight"] == {"Q5_0": 2}
    assert len(q4_k_m["fallbacks"]) == 14 and "not divisible by 256" in q4_k_m["fallbacks"][0]
    assert ggufs["q4_0"].size_bytes() < ggufs["q8_0"].size_bytes() < ggufs["f32"].size_bytes() / 3


@needs_llamacpp
def test_llama_cpp_tokenizes_text_and_chat_markup_like_the_source_tokenizer(ggufs):
    tok = byte_tokenizer(GPT2_MERGES)
    text = tok.apply_chat_template([{"role": "user", "content": "the thin interpreter, in 1234 lines!"}],
                                   tokenize=False, add_generation_prompt=True)
    assert llama_cpp_tokenize(ggufs["f32"].path, text) == tok(text)["input_ids"]


@needs_llamacpp
def test_cli_build_verifies_a_gguf_on_llama_cpp(tmp_path: Path, cli):
    import json

    import yaml

    from compress.models.tiny import save_tiny_llama

    model_dir = save_tiny_llama(tmp_path / "tiny", merges=GPT2_MERGES)
    targets = tmp_path / "t.yaml"
    targets.write_text(yaml.safe_dump({"version": 1, "targets": {"g": {
        "export": {"format": "gguf", "file_type": "f16", "max_context": 256}, "runtime": "llamacpp",
        "eval": {"windows": 2, "window_len": 64, "prefill_len": 32, "decode_tokens": 8, "greedy_tokens": 8,
                 "repeats": 2},
        "budgets": {"max_mean_kl": 1e-4, "min_top1_agreement": 0.99}}}}))
    out = tmp_path / "out"
    result = cli("build", "--target", "g", "--model", str(model_dir), "--out", str(out), "--targets", str(targets))
    assert result.code == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["runtime"] == "llamacpp" and report["metrics"]["decode_tok_s"] > 0
    assert report["metrics"]["mean_kl"] < 1e-4


def test_a_missing_llama_cpp_stops_the_build_before_any_work(monkeypatch: pytest.MonkeyPatch):
    from compress.build import check_available
    from compress.targets import load_targets

    monkeypatch.setattr(llamacpp, "installed", lambda: False)
    target = load_targets().get("desktop-gguf")
    with pytest.raises(RuntimeUnavailable, match=r"^runtime 'llamacpp' is unavailable: llama-cpp-python is not "
                                                 r"installed; pip install 'compress\[llamacpp\]'"):
        check_available(target, verify=True)
    check_available(target, verify=False)  # q8_0 is written without llama.cpp


@pytest.mark.slow
@needs_llamacpp
def test_real_model_f32_gguf_on_llama_cpp_matches_the_reference(real_home: Path, tmp_path: Path):
    from compress.runtimes.harness import measure_accuracy, run_reference
    from compress.runtimes.torch_eager import TorchEagerRuntime

    from compress import models
    from compress.data.corpus import build_eval_set, encode_prompt
    from compress.targets import EvalSpec

    loaded = models.load_spec("smollm2-135m", QUIET)
    art = GgufExporter().export(loaded.model, loaded.tokenizer, GgufOptions(file_type=GgufType.F32), tmp_path / "m.gguf",
                                QUIET)
    spec = EvalSpec(windows=4)
    eval_set = build_eval_set(loaded.tokenizer, spec)
    stops = {loaded.tokenizer.eos_token_id}
    torch.set_num_threads(2)
    ref = run_reference(TorchEagerRuntime.session_for(loaded.model), eval_set, spec.greedy_tokens, stops, QUIET)
    metrics, _ = measure_accuracy(LlamaCppRuntime().load(art, 2), ref, eval_set, spec.greedy_tokens, stops,
                                  loaded.tokenizer.decode, QUIET)
    assert metrics["mean_kl"] < 1e-5 and metrics["top1_agreement"] > 0.998  # measured: 5e-7 and 0.9995 (8 windows)
    assert metrics["greedy_match_mean"] == spec.greedy_tokens
    for prompt in spec.prompts:  # the chat template's special tokens and the text, tokenized by llama.cpp
        text = loaded.tokenizer.decode(encode_prompt(loaded.tokenizer, prompt))
        assert llama_cpp_tokenize(art.path, text) == encode_prompt(loaded.tokenizer, prompt)
    digits = "In 2024, 1,234,567 items cost $89.10 each."
    assert llama_cpp_tokenize(art.path, digits) == loaded.tokenizer(digits)["input_ids"]


def test_a_probe_that_dies_turns_off_only_the_extra_buffer_types_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    """The decision behind llama.cpp's settings, without llama.cpp: a child killed by a signal (the AMX repacking
    crash) turns the extra buffer types off with the signal named; a clean child leaves the defaults alone."""
    import subprocess

    from compress.runtimes import llamacpp as module

    seen: list[list[str]] = []

    def fake_run(code: int):
        def run(cmd: list[str], **_: object) -> subprocess.CompletedProcess:
            seen.append(cmd)
            return subprocess.CompletedProcess(cmd, code, "", "")
        return run

    module.default_buffer_types_work.cache_clear()
    monkeypatch.setattr(module.subprocess, "run", fake_run(-11))
    ok, why = module.default_buffer_types_work("/x/crashes.gguf", 2)
    assert not ok and "SIGSEGV" in why and "extra buffer types off" in why
    assert seen[-1][1:] == ["-m", "compress.runtimes.llamacpp", "/x/crashes.gguf", "2"]
    monkeypatch.setattr(module.subprocess, "run", fake_run(0))
    assert module.default_buffer_types_work("/x/works.gguf", 2) == (True, "")
    assert module.default_buffer_types_work("/x/crashes.gguf", 2)[0] is False  # once per file and process
    assert len(seen) == 2
    module.default_buffer_types_work.cache_clear()


@needs_llamacpp
def test_the_probe_child_runs_llama_cpp_with_its_defaults(ggufs) -> None:
    """The real child process on a real Q4_0 GGUF (a type llama.cpp repacks): on a machine where the defaults
    work, nothing is turned off."""
    from compress.runtimes import llamacpp as module

    art = ggufs["q4_0"]
    module.default_buffer_types_work.cache_clear()
    ok, why = module.default_buffer_types_work(str(art.path), 2)
    assert ok, why
    assert LlamaCppRuntime().load(art, 2).settings == {}


SCALINGS = {"llama3": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 64},
            "linear": {"rope_type": "linear", "factor": 4.0}}


@needs_llamacpp
@pytest.mark.parametrize("kind", sorted(SCALINGS))
def test_scaled_rope_runs_in_llama_cpp_like_eager(kind: str, tmp_path: Path):
    # llama3 travels as the rope_freqs tensor, linear as rope.scaling.*: either mistake moves logits far past 1e-4.
    model = tiny_llama(1, vocab_size=VOCAB, hidden_size=128, num_attention_heads=4, rope_scaling=SCALINGS[kind])
    art = GgufExporter().export(model, byte_tokenizer(GPT2_MERGES), GgufOptions(file_type=GgufType.F32,
                                                                                max_context=256),
                                tmp_path / "m.gguf", QUIET)
    session = LlamaCppRuntime(exact=True).load(art, threads=2)
    np.testing.assert_allclose(session.prefill(TOKENS[:200]), eager(model, TOKENS[:200]), atol=2e-4, rtol=1e-4)
