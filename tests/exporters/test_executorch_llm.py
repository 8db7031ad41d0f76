"""ExecuTorch's own LLM export as a bench peer: the checkpoint conversion is function-preserving in ExecuTorch's
own transformer, and export_llm's `.pte` (8da4w, custom SDPA, XNNPACK) runs in the ExecuTorch runtime close to
the fp32 model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("executorch")
pytest.importorskip("omegaconf")
torch = pytest.importorskip("torch")


def _hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def _kl(ref: np.ndarray, test: np.ndarray) -> np.ndarray:
    p = torch.log_softmax(torch.from_numpy(ref).double(), -1)
    q = torch.log_softmax(torch.from_numpy(test).double(), -1)
    return (p.exp() * (p - q)).sum(-1).numpy()


@pytest.mark.parametrize("rope", [None, {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}])
def test_the_meta_checkpoint_gives_the_hf_logits_in_executorchs_own_transformer(rope):
    from compress.exporters.executorch_llm import meta_checkpoint
    from executorch.examples.models.llama.llama_transformer import construct_transformer
    from executorch.examples.models.llama.model_args import ModelArgs

    from compress.models.tiny import tiny_llama

    # head_dim 64 (Llama 3's), so some frequencies' wavelengths fall in llama3's scaled and smoothed bands
    model = tiny_llama(seed=3, rope_scaling=rope, max_position_embeddings=512, hidden_size=256,
                       intermediate_size=256)
    sd, params = meta_checkpoint(model)
    assert params["use_scaled_rope"] is (rope is not None)
    et = construct_transformer(ModelArgs(**params, max_seq_len=512, max_context_len=512,
                                         generate_full_logits=True)).eval()
    missing, unexpected = et.load_state_dict(sd, strict=False)
    assert not unexpected and all("rope" in k or "freqs" in k for k in missing), (missing, unexpected)
    ids = list(range(3, 3 + 200))
    if rope:  # the scaling changes the model: a converter that dropped it would fail here
        plain = construct_transformer(ModelArgs(**{**params, "use_scaled_rope": False}, max_seq_len=512,
                                                max_context_len=512, generate_full_logits=True)).eval()
        plain.load_state_dict(sd, strict=False)
        with torch.no_grad():
            assert not np.allclose(plain(torch.tensor([ids]))[0].numpy(), _hf_logits(model, ids), atol=1e-2)
    with torch.no_grad():
        got = et(torch.tensor([ids]))
    got = (got[0] if isinstance(got, tuple) else got)[0].numpy()  # full logits without a KV cache
    want = _hf_logits(model, ids)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)


def test_a_q_or_k_row_order_mistake_would_be_caught():
    """The row permutation is not the identity (or the test above could not fail on it)."""
    from compress.exporters.executorch_llm import _unpermute

    w = torch.arange(8 * 3, dtype=torch.float32).view(8, 3)
    out = _unpermute(w, heads=2)
    assert not torch.equal(out, w)
    assert sorted(out[:, 0].tolist()) == sorted(w[:, 0].tolist())  # the same rows, reordered within each head
    assert set(out[:4, 0].tolist()) == set(w[:4, 0].tolist())


def test_export_llm_peer_runs_in_the_executorch_runtime_close_to_fp32(tmp_path: Path):
    from compress.exporters.executorch_llm import export_llm_peer
    from compress.runtimes.executorch import ExecuTorchRuntime

    from compress.models.tiny import byte_tokenizer, tiny_llama

    model = tiny_llama(seed=1, hidden_size=128, intermediate_size=256, max_position_embeddings=512)
    art = export_llm_peer(model, byte_tokenizer(), tmp_path / "peer", 300, tmp_path / "logs" / "export_llm.log")
    assert art.last_logits_only and art.max_context == 300 and (tmp_path / "peer" / "model.pte").is_file()
    assert art.record["settings"]["qmode"] == "8da4w" and art.record["settings"]["group_size"] == 32
    assert set(art.record["deviations"]) == {"group_size", "max_context_length", "metadata"}
    assert not any(p.name.endswith("-work") for p in tmp_path.iterdir())
    session = ExecuTorchRuntime().load(art, threads=1)
    assert session.vocab_size == model.config.vocab_size and session.max_seq_len == 127  # its token input's bound
    ids = [int(i) for i in torch.randint(0, 256, (150,), generator=torch.Generator().manual_seed(0))]
    want = _hf_logits(model, ids)
    rows = session.prefill(ids)  # one token per call: every position's logits
    assert rows.shape == want.shape
    kl = _kl(want, rows)
    assert 1e-6 < kl.mean() < 0.01, kl.mean()  # measured 0.0024; the same route unquantized (qmode None): 4e-14
    session.reset()
    last = session.prefill_last(ids)  # in chunks: 127 + 23
    np.testing.assert_allclose(last, rows[-1], atol=1e-4)  # measured: identical
    step = session.decode(7)  # the cache holds the chunked prompt: the next position matches fp32's
    assert _kl(_hf_logits(model, ids + [7])[-1:], step[None])[0] < 0.01  # measured 6e-7
