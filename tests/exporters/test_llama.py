from __future__ import annotations

import pytest
import torch
from compress.exporters.llama import AttentionBackend, ExportLlama

from compress.models.tiny import tiny_llama


@pytest.mark.parametrize("backend, fuse_qkv", [(b, False) for b in AttentionBackend]
                         + [(AttentionBackend.CUSTOM, True), (AttentionBackend.EAGER, True)])
def test_export_module_matches_hf_in_one_pass_and_incrementally(backend, fuse_qkv):
    if backend in (AttentionBackend.XNNPACK, AttentionBackend.CUSTOM):
        pytest.importorskip("executorch")
        import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401
    # Core ML's and Core AI's caches are fp16 (states): keys and values are rounded once, nothing else changes.
    fp16_cache = backend in (AttentionBackend.COREML, AttentionBackend.COREAI, AttentionBackend.COREML_STACKED)
    tol = 1e-2 if fp16_cache else 1e-4
    hf = tiny_llama(seed=4, num_attention_heads=6, num_key_value_heads=2, hidden_size=96)
    tokens = torch.randint(0, 256, (1, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens).logits  # (1, 48, vocab)
        module = ExportLlama.from_hf(hf, max_context=64, backend=backend,
                                     fp16_safe_norm=fp16_cache, fuse_qkv=fuse_qkv)
        assert hasattr(module.layers[0].self_attn, "qkv_proj") is fuse_qkv

        def position(start: int, seq: int) -> torch.Tensor:  # coreml_stacked: the mask says where the call starts
            if backend is AttentionBackend.COREML_STACKED:
                return torch.zeros(1, 1, seq, start + seq)
            return torch.tensor([start])

        torch.testing.assert_close(module(tokens, position(0, 48)), expected, atol=tol, rtol=tol)
        module.reset_cache()
        parts = [module(tokens[:, :20], position(0, 20))]
        parts += [module(tokens[:, i:i + 1], position(i, 1)) for i in range(20, 48)]
        torch.testing.assert_close(torch.cat(parts, dim=1), expected, atol=tol, rtol=tol)


def test_the_fp16_safe_norm_equals_the_plain_one_and_survives_fp16_magnitudes():
    from compress.exporters.llama import RMSNorm

    plain, safe = RMSNorm(64, 1e-5), RMSNorm(64, 1e-5, fp16_safe=True)
    scales = torch.tensor([1e-3, 1.0, 30.0, 300.0, 2.5e4]).view(1, 5, 1)  # one row per magnitude
    x = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(0)) * scales
    torch.testing.assert_close(safe(x), plain(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(safe(torch.zeros(1, 1, 64)), torch.zeros(1, 1, 64))
    # What fp16 hardware sees: the plain norm squares 2.5e4 (inf in fp16); the safe one stays finite.
    big = x[:, 4:].half()
    assert not torch.isfinite((big * big).sum()) and torch.isfinite(safe(big.float()).half()).all()


def test_tied_embeddings_become_two_deliberate_copies():
    hf = tiny_llama(seed=0)
    module = ExportLlama.from_hf(hf, max_context=32)
    assert module.lm_head.weight.data_ptr() != module.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(module.lm_head.weight, hf.model.embed_tokens.weight)


# Llama 3.2's scaling with a short original context, so that most of a tiny head's frequencies are rescaled.
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


@pytest.mark.parametrize("scaling", [LLAMA3_ROPE, {"rope_type": "linear", "factor": 4.0}], ids=["llama3", "linear"])
def test_rope_scaling_matches_hf(scaling):
    hf = tiny_llama(seed=2, rope_scaling=scaling, hidden_size=128, num_attention_heads=4)  # head_dim 32
    plain = tiny_llama(seed=2, hidden_size=128, num_attention_heads=4)
    tokens = torch.randint(0, 256, (1, 96), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = hf(tokens).logits
        ours = ExportLlama.from_hf(hf, max_context=128)(tokens, torch.tensor([0]))
        unscaled = ExportLlama.from_hf(plain, max_context=128)(tokens, torch.tensor([0]))
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)
    assert (unscaled - expected).abs().max() > 1e-2  # the scaling changes the outputs: the test can fail


def test_unsupported_rope_scaling_is_refused():
    hf = tiny_llama(seed=0, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ValueError, match="RoPE scaling 'dynamic' is not supported by the export module; "
                                         "supported: default, linear, llama3"):
        ExportLlama.from_hf(hf, max_context=32)


def test_reduced_precision_kv_caches_stay_close_to_hf_in_one_pass_and_incrementally():
    """fp16 and int8 caches (ExecuTorch's custom ops: exporters/kv_cache.py) cost a little KL against the fp32 cache,
    int8 more than fp16, and a prompt fed in parts meets the cache the whole prompt would have written."""
    pytest.importorskip("executorch")
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401
    from compress.exporters.kv_cache import KvCachePrecision

    from compress.metrics import position_kl

    hf = tiny_llama(seed=4, num_attention_heads=6, num_key_value_heads=2, hidden_size=96)
    tokens = torch.randint(0, 256, (1, 48), generator=torch.Generator().manual_seed(1))
    kl = {}
    with torch.no_grad():
        expected = hf(tokens).logits[0].numpy()
        for p in (KvCachePrecision.FP16, KvCachePrecision.INT8):
            module = ExportLlama.from_hf(hf, max_context=64, backend=AttentionBackend.CUSTOM, kv_precision=p)
            assert module.layers[0].self_attn.k_cache.dtype == {"fp16": torch.float16, "int8": torch.int8}[p.value]
            whole = module(tokens, torch.tensor([0]))[0].numpy()
            module.reset_cache()
            parts = [module(tokens[:, :20], torch.tensor([0]))[0]]
            parts += [module(tokens[:, i:i + 1], torch.tensor([i]))[0] for i in range(20, 48)]
            kl[p] = position_kl(expected, whole).mean()
            # fp16 kernels sum in another order per call pattern (max |diff| ~2e-3 here), so compare in KL
            assert position_kl(whole, torch.cat(parts).numpy()).mean() < 0.2 * kl[p]
    assert 0 < kl[KvCachePrecision.FP16] < 1e-5 < kl[KvCachePrecision.INT8] < 1e-3, kl
    with pytest.raises(ValueError, match="needs the custom attention backend"):  # the others keep fp32 caches
        ExportLlama.from_hf(hf, 64, AttentionBackend.XNNPACK, kv_precision=KvCachePrecision.INT8)
