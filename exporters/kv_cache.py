"""The KV cache of ExecuTorch's custom-op attention, in the precision a target asks for (`export.kv_cache`).

ExecuTorch's own ops do the work (registered by `executorch.extension.llm.custom_ops`): `llama::update_cache`
writes a call's keys and values in place at its start position, and attention reads positions [0, start + seq):
  - fp32: `llama::custom_sdpa` over fp32 caches (1, ctx, kv heads, d). At 2048 positions SmolLM2-135M's cache is
    94 MB, as large as its 4-bit weights, and each decode step reads all of it that is written.
  - fp16: the same kernel over fp16 caches; it needs q, k and v of one dtype, so q is rounded to fp16 too and the
    output comes back to fp32. Half the bytes; on CPUs without fp16 arithmetic the kernel converts as it goes.
  - int8: what ExecuTorch's own LLM export does with `--quantize_kv_cache` (its custom_kv_cache.py and sdpa.py):
    keys and values stored as int8 with an fp32 scale and an int8 zero point per position and head (asymmetric,
    over head_dim, torch's `quantized_decomposed` per-token ops), and `llama::custom_quantized_sdpa`, which also
    takes q quantized per token and head the same way. A quarter of the bytes, plus 5 bytes per position and head.
The program keeps every cache as a mutable buffer (memory-planned, not stored in the file).
torch loads inside the functions: exporters' option classes (which name `KvCachePrecision`) import no torch.
"""

from __future__ import annotations

import enum
from typing import Any


class KvCachePrecision(enum.StrEnum):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"


_INT8_MIN, _INT8_MAX = -128, 127


def cache_bytes_per_position(precision: KvCachePrecision, num_layers: int, num_kv_heads: int, head_dim: int) -> int:
    """Bytes the keys and values of one position take across all layers (scales and zero points included)."""
    per_head = {KvCachePrecision.FP32: 4 * head_dim, KvCachePrecision.FP16: 2 * head_dim,
                KvCachePrecision.INT8: head_dim + 4 + 1}[precision]
    return 2 * num_layers * num_kv_heads * per_head


def register_caches(module: Any, max_context: int, num_kv_heads: int, head_dim: int,
                    precision: KvCachePrecision) -> None:
    """The cache buffers of one attention layer (an nn.Module): k_cache / v_cache (1, ctx, kv, d), and for int8
    their per-position scales (fp32) and zero points (int8), (1, ctx, kv, 1)."""
    import torch

    shape = (1, max_context, num_kv_heads, head_dim)
    dtype = {KvCachePrecision.FP32: torch.float32, KvCachePrecision.FP16: torch.float16,
             KvCachePrecision.INT8: torch.int8}[precision]
    module.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
    module.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)
    if precision is KvCachePrecision.INT8:
        qshape = (1, max_context, num_kv_heads, 1)
        for kind in ("k", "v"):
            module.register_buffer(f"{kind}_scales", torch.ones(qshape, dtype=torch.float32), persistent=False)
            module.register_buffer(f"{kind}_zeros", torch.zeros(qshape, dtype=torch.int8), persistent=False)


def _per_token_int8(x: Any) -> tuple[Any, Any, Any]:
    """x (1, seq, heads, d) as int8 codes with an fp32 scale and an int8 zero point per (position, head)."""
    import torch

    scales, zeros = torch.ops.quantized_decomposed.choose_qparams_per_token_asymmetric.default(x, torch.int8)
    codes = torch.ops.quantized_decomposed.quantize_per_token(x, scales, zeros, _INT8_MIN, _INT8_MAX, torch.int8)
    return codes, scales.to(torch.float32), zeros.to(torch.int8)


def attend_with_cache(module: Any, q: Any, k: Any, v: Any, start: int) -> Any:
    """Write k, v (1, seq, kv, d) at `start` into the module's caches (register_caches), then causal attention of
    q (1, seq, h, d) over positions [0, start + seq). Returns (1, seq, h, d) fp32."""
    import torch

    if module.k_cache.dtype == torch.int8:
        from torch.ao.quantization.fx._decomposed import quantized_decomposed_lib  # noqa: F401  registers the ops

        k_codes, k_scales, k_zeros = _per_token_int8(k)
        v_codes, v_scales, v_zeros = _per_token_int8(v)
        for value, cache in ((k_codes, module.k_cache), (k_scales, module.k_scales), (k_zeros, module.k_zeros),
                             (v_codes, module.v_cache), (v_scales, module.v_scales), (v_zeros, module.v_zeros)):
            torch.ops.llama.update_cache(value, cache, start)
        q_codes, q_scales, q_zeros = _per_token_int8(q)
        return torch.ops.llama.custom_quantized_sdpa(
            q_codes, module.k_cache, module.v_cache, start, None, 0, True, None,
            q_zeros, q_scales, module.k_zeros, module.k_scales, module.v_zeros, module.v_scales)
    dtype = module.k_cache.dtype
    torch.ops.llama.update_cache(k.to(dtype), module.k_cache, start)
    torch.ops.llama.update_cache(v.to(dtype), module.v_cache, start)
    out = torch.ops.llama.custom_sdpa(q.to(dtype), module.k_cache, module.v_cache, start, None, 0, True)
    return out.to(torch.float32)


def reset_caches(module: Any) -> None:
    """Empty caches, as a fresh program starts."""
    import torch

    module.k_cache.zero_()
    module.v_cache.zero_()
    if module.k_cache.dtype == torch.int8:
        for name in ("k_scales", "v_scales"):
            getattr(module, name).fill_(1.0)
        for name in ("k_zeros", "v_zeros"):
            getattr(module, name).zero_()
