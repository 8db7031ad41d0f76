"""One small, export-friendly Llama that every exporter lowers, loaded from HF weights.

Why our own module (see DESIGN.md): HF's class carries machinery no phone needs, exported slowly and
partially to ExecuTorch and did not trace for Core ML. This one has:
  - a static KV cache held as buffers, shape (1, max_context, n_kv_heads, head_dim), updated in place;
  - RoPE tables precomputed for max_context (HF's non-interleaved "rotate half" convention, so HF's
    q/k weights load unpermuted), with the checkpoint's RoPE scaling (default, linear, llama3) applied;
  - attention that an exporter can swap for its backend's fused op (`AttentionBackend`):
      "xnnpack": ExecuTorch's in-place `llama::update_cache` into (n_kv, ctx, 1, d) caches, then attention
        as bmm/softmax over the written prefix only (start + seq positions, sliced out of the cache) with an
        additive causal mask, all XNNPACK-delegable (the ExecuTorch exporter lets XNNPACK take these run-time
        sized tensors). Measured (6 layers, 2 threads, positions 128..192): 4.14 ms per token over the whole
        512-slot cache (which XNNPACK also copied on every read), 3.28 ms over the prefix.
      "custom": `llama::update_cache` + `llama::custom_sdpa` on (1, ctx, n_kv, d) caches (what ExecuTorch's own
        LLM export does): one XNNPACK partition per layer, and the faster decode (SmolLM2, positions 128..192: 45 us
        per layer, against ~80 us for "xnnpack" with its cache-prefix copies); its prefill is slower (1 ms per layer
        at 128 tokens against ~0.4). On Linux x86 the pip runtime's kernel calls MKL, which must run single-threaded
        inside ExecuTorch's thread pool (runtimes/executorch.py); multi-threaded it costs 230-250 us per call.
      "coreml_stacked": Apple's Llama convention (its Llama 3.1 Core ML article, swift-transformers): inputs
        (input_ids (1, q), causal_mask (1, 1, q or 1, end)), every layer's fp16 cache stacked into one
        (layers, 1, n_kv, ctx, d) tensor per kind; the call's first position is end - q, its keys and values are
        written at [end - q, end) by slice assignment and attention reads slots [0, end) only, with the caller's
        additive mask plus a causal one of its own (so an all-zero mask, as swift-transformers sends, is causal too).
      "eager": index_copy + SDPA with an explicit mask, plain PyTorch (for exporters without custom ops).
      "coreml": fp16 caches (1, n_kv, ctx, d) updated by slice assignment at a traced (tensor) start
        position, which coremltools turns into Core ML states (read_state/slice_update/update_state); then
        matmul/softmax over the whole static cache with a finite additive mask. Core ML states must be fp16.
  - an RMSNorm that is safe in fp16 on request (`fp16_safe_norm`): SmolLM2's residual stream reaches
    |x| ~ 2.5e4, so squaring x overflows fp16 (max 65504); the norm divides each row by its max |x| first,
    which is exact in real arithmetic (eps is rescaled with it).
forward(tokens (1, seq) int64, input_pos (1,) int64) -> logits (1, seq, vocab), all positions, or (1, 1, vocab) with
`last_logits` (coreml_stacked: the causal mask (1, 1, seq or 1, end) in place of input_pos).
"""

from __future__ import annotations

import enum
import math
from typing import Any

import torch
from compress.exporters.kv_cache import KvCachePrecision, attend_with_cache, register_caches, reset_caches
from compress.exporters.llama_parts import (
    LlamaDims,
    RMSNorm,
    apply_rope,
    fused_qkv_names,
    rope_tables,
    rotate_half_matrix,
)
from torch import nn
from torch.nn import functional as F


class AttentionBackend(enum.StrEnum):
    XNNPACK = "xnnpack"  # update_cache custom op + bmm/softmax attention (import the custom ops first)
    CUSTOM = "custom"  # update_cache + custom_sdpa custom ops
    EAGER = "eager"  # plain PyTorch ops only
    COREML = "coreml"  # fp16 caches updated by slice assignment (Core ML states), plain ops only
    # Apple's Llama convention: every layer's fp16 cache in one stacked (layers, 1, kv, ctx, d) tensor per kind, the
    # position taken from the caller's causal mask (its length minus the query's), attention over the written prefix
    COREML_STACKED = "coreml_stacked"
    # fp16 caches laid out (positions, kv heads, head dim), written with index_copy_ along positions: what
    # torch.export and coreai-torch lower (its index_put takes a dynamic count on dim 0 only); plain ops only
    COREAI = "coreai"


class Attention(nn.Module):
    def __init__(self, dims: LlamaDims, max_context: int, backend: AttentionBackend, fuse_qkv: bool = False,
                 index: int = 0, kv_precision: KvCachePrecision = KvCachePrecision.FP32):
        super().__init__()
        self.dims, self.backend, self.fuse_qkv, self.index = dims, backend, fuse_qkv, index
        h, kv, d = dims.num_heads, dims.num_kv_heads, dims.head_dim
        if fuse_qkv:  # one matmul for q, k and v (rows stacked q, k, v): see ExportLlama
            self.qkv_proj = nn.Linear(dims.hidden_size, (h + 2 * kv) * d, bias=False)
        else:
            self.q_proj = nn.Linear(dims.hidden_size, h * d, bias=False)
            self.k_proj = nn.Linear(dims.hidden_size, kv * d, bias=False)
            self.v_proj = nn.Linear(dims.hidden_size, kv * d, bias=False)
        self.o_proj = nn.Linear(h * d, dims.hidden_size, bias=False)
        # ExecuTorch keeps the caches as mutable buffers updated in place. update_cache writes along dim 1,
        # so the xnnpack backend uses n_kv as the op's batch dim: (n_kv, ctx, 1, d) is (n_kv, ctx, d) in memory.
        shape = (kv, max_context, 1, d) if backend is AttentionBackend.XNNPACK else (1, max_context, kv, d)
        dtype = torch.float32
        if backend is AttentionBackend.COREML:  # Core ML states: fp16 only, heads before positions
            shape, dtype = (1, kv, max_context, d), torch.float16
        elif backend is AttentionBackend.COREAI:
            shape, dtype = (max_context, kv, d), torch.float16
        if backend is AttentionBackend.CUSTOM:  # fp32, fp16 or int8 (exporters/kv_cache.py)
            register_caches(self, max_context, kv, d, kv_precision)
        elif backend is not AttentionBackend.COREML_STACKED:  # stacked: the model holds every layer's caches
            self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
            self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)

    def forward(self, x: torch.Tensor, start: int, cos: torch.Tensor, sin: torch.Tensor,
                rotate: torch.Tensor, mask: torch.Tensor | None = None,
                stacked: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        _, seq, _ = x.shape  # (1, seq, hidden)
        dims = self.dims
        h, kv, d = dims.num_heads, dims.num_kv_heads, dims.head_dim
        if self.fuse_qkv:  # cos/sin are (seq, h + 2kv, d) with 1 and 0 on v's heads: v passes unrotated, exactly
            qkv = apply_rope(self.qkv_proj(x).view(1, -1, h + 2 * kv, d), cos, sin, rotate)  # (1, seq, h+2kv, d)
            q, k, v = qkv.split([h, kv, kv], dim=2)
        else:
            q = apply_rope(self.q_proj(x).view(1, -1, h, d), cos, sin, rotate)  # (1, seq, h, d)
            k = apply_rope(self.k_proj(x).view(1, -1, kv, d), cos, sin, rotate)
            v = self.v_proj(x).view(1, -1, kv, d)
        if self.backend is AttentionBackend.XNNPACK:
            out = self._xnnpack(q, k, v, start, seq, mask)
        elif self.backend is AttentionBackend.CUSTOM:
            out = attend_with_cache(self, q, k, v, start)  # (1, seq, h, d)
        elif self.backend is AttentionBackend.COREML:
            out = self._coreml(q, k, v, start, seq, mask)
        elif self.backend is AttentionBackend.COREAI:
            out = self._coreai(q, k, v, start, seq, mask)
        elif self.backend is AttentionBackend.COREML_STACKED:
            out = self._coreml_stacked(q, k, v, start, seq, mask, stacked)
        else:
            out = self._eager(q, k, v, start, seq)
        return self.o_proj(out.reshape(1, -1, dims.num_heads * dims.head_dim))  # (1, seq, hidden)

    def _xnnpack(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, seq: int,
                 mask: torch.Tensor) -> torch.Tensor:
        kv, d = self.dims.num_kv_heads, self.dims.head_dim
        groups = self.dims.num_heads // kv
        torch.ops.llama.update_cache(k.permute(2, 1, 0, 3), self.k_cache, start)  # (kv, seq, 1, d) -> cache
        torch.ops.llama.update_cache(v.permute(2, 1, 0, 3), self.v_cache, start)
        ctx = self.k_cache.shape[1]
        # Only the written prefix, start + seq positions, is read: a copy of that slice, not the whole cache.
        keys = self.k_cache.view(kv, ctx, d).narrow(1, 0, start + seq)  # (kv, L, d)
        values = self.v_cache.view(kv, ctx, d).narrow(1, 0, start + seq)
        # Query heads grouped under their KV head, so grouped-query attention needs no repeated cache.
        q_grouped = q.view(-1, kv, groups, d).permute(1, 3, 0, 2).reshape(kv, d, -1)  # (kv, d, seq*g)
        scores = torch.bmm(keys, q_grouped).transpose(1, 2) * (1.0 / math.sqrt(d)) + mask  # (kv, seq*g, L)
        out = torch.bmm(torch.softmax(scores, dim=-1), values)  # (kv, seq*g, d)
        return out.view(kv, -1, groups, d).permute(1, 0, 2, 3)  # (seq, h, d) as (1, seq, h, d) below

    def _coreml(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor, seq: int,
                mask: torch.Tensor) -> torch.Tensor:
        kv, d = self.dims.num_kv_heads, self.dims.head_dim
        groups = self.dims.num_heads // kv
        # `start` is a 0-d tensor: the trace records the slice bounds as graph values (a dynamic slice_update).
        self.k_cache[:, :, start:start + seq] = k.transpose(1, 2).to(self.k_cache.dtype)  # (1, kv, seq, d)
        self.v_cache[:, :, start:start + seq] = v.transpose(1, 2).to(self.v_cache.dtype)
        keys = self.k_cache.to(q.dtype)  # (1, kv, ctx, d)
        values = self.v_cache.to(q.dtype)
        q_grouped = q.view(1, seq, kv, groups, d).transpose(1, 2).reshape(1, kv, seq * groups, d)  # (1,kv,seq*g,d)
        scores = torch.matmul(q_grouped, keys.transpose(2, 3)) * (1.0 / math.sqrt(d)) + mask  # (1, kv, seq*g, ctx)
        out = torch.matmul(torch.softmax(scores, dim=-1), values)  # (1, kv, seq*g, d)
        return out.view(1, kv, seq, groups, d).transpose(1, 2)  # (1, seq, kv, g, d) = (1, seq, h, d)

    def _coreml_stacked(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: Any, seq: Any,
                        mask: torch.Tensor, stacked: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        kv, d = self.dims.num_kv_heads, self.dims.head_dim
        groups = self.dims.num_heads // kv
        key_cache, value_cache = stacked  # (layers, 1, kv, ctx, d) each
        end = start + seq  # traced from the inputs' shapes: the slice bounds stay graph values
        key_cache[self.index, :, :, start:end] = k.transpose(1, 2).to(key_cache.dtype)  # (1, kv, seq, d)
        value_cache[self.index, :, :, start:end] = v.transpose(1, 2).to(value_cache.dtype)
        keys = key_cache[self.index, :, :, :end].to(q.dtype)  # (1, kv, end, d): the written prefix only
        values = value_cache[self.index, :, :, :end].to(q.dtype)
        q_grouped = q.view(1, seq, kv, groups, d).transpose(1, 2).reshape(1, kv, seq * groups, d)  # (1,kv,seq*g,d)
        scores = torch.matmul(q_grouped, keys.transpose(2, 3)) * (1.0 / math.sqrt(d)) + mask  # (1, kv, seq*g, end)
        out = torch.matmul(torch.softmax(scores, dim=-1), values)  # (1, kv, seq*g, d)
        return out.view(1, kv, seq, groups, d).transpose(1, 2)  # (1, seq, kv, g, d) = (1, seq, h, d)

    def _coreai(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor, seq: int,
                mask: torch.Tensor) -> torch.Tensor:
        kv, d = self.dims.num_kv_heads, self.dims.head_dim
        groups = self.dims.num_heads // kv
        positions = torch.arange(seq) + start  # `start` a 0-d tensor: the program keeps it an input
        self.k_cache.index_copy_(0, positions, k[0].to(self.k_cache.dtype))  # (seq, kv, d) into (ctx, kv, d)
        self.v_cache.index_copy_(0, positions, v[0].to(self.v_cache.dtype))
        keys = self.k_cache.to(q.dtype).permute(1, 0, 2).unsqueeze(0)  # (1, kv, ctx, d)
        values = self.v_cache.to(q.dtype).permute(1, 0, 2).unsqueeze(0)
        q_grouped = q.view(1, seq, kv, groups, d).transpose(1, 2).reshape(1, kv, seq * groups, d)  # (1,kv,seq*g,d)
        scores = torch.matmul(q_grouped, keys.transpose(2, 3)) * (1.0 / math.sqrt(d)) + mask  # (1, kv, seq*g, ctx)
        out = torch.matmul(torch.softmax(scores, dim=-1), values)  # (1, kv, seq*g, d)
        return out.view(1, kv, seq, groups, d).transpose(1, 2)  # (1, seq, kv, g, d) = (1, seq, h, d)

    def _eager(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, seq: int) -> torch.Tensor:
        positions = torch.arange(seq) + start
        self.k_cache.index_copy_(1, positions, k)
        self.v_cache.index_copy_(1, positions, v)
        ctx = self.k_cache.shape[1]
        groups = self.dims.num_heads // self.dims.num_kv_heads
        keys = self.k_cache.repeat_interleave(groups, dim=2).transpose(1, 2)  # (1, h, ctx, d)
        values = self.v_cache.repeat_interleave(groups, dim=2).transpose(1, 2)  # (1, h, ctx, d)
        mask = torch.arange(ctx)[None, :] <= positions[:, None]  # (seq, ctx): causal, hides unwritten slots
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask)  # (1, h, seq, d)
        return out.transpose(1, 2)  # (1, seq, h, d)


class MLP(nn.Module):
    def __init__(self, dims: LlamaDims):
        super().__init__()
        self.gate_proj = nn.Linear(dims.hidden_size, dims.intermediate_size, bias=False)
        self.up_proj = nn.Linear(dims.hidden_size, dims.intermediate_size, bias=False)
        self.down_proj = nn.Linear(dims.intermediate_size, dims.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, dims: LlamaDims, max_context: int, backend: AttentionBackend, fp16_safe_norm: bool,
                 fuse_qkv: bool, index: int = 0, kv_precision: KvCachePrecision = KvCachePrecision.FP32):
        super().__init__()
        self.input_layernorm = RMSNorm(dims.hidden_size, dims.rms_norm_eps, fp16_safe_norm)
        self.self_attn = Attention(dims, max_context, backend, fuse_qkv, index, kv_precision)
        self.post_attention_layernorm = RMSNorm(dims.hidden_size, dims.rms_norm_eps, fp16_safe_norm)
        self.mlp = MLP(dims)

    def forward(self, x: torch.Tensor, start: int, cos: torch.Tensor, sin: torch.Tensor,
                rotate: torch.Tensor, mask: torch.Tensor | None,
                stacked: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), start, cos, sin, rotate, mask, stacked)
        return x + self.mlp(self.post_attention_layernorm(x))


class ExportLlama(nn.Module):
    def __init__(self, dims: LlamaDims, max_context: int, backend: AttentionBackend = AttentionBackend.EAGER,
                 fp16_safe_norm: bool = False, fuse_qkv: bool = False,
                 kv_precision: KvCachePrecision = KvCachePrecision.FP32, last_logits: bool = False):
        super().__init__()
        self.last_logits = last_logits  # logits of each call's last position only (1, 1, vocab)
        if kv_precision is not KvCachePrecision.FP32 and backend is not AttentionBackend.CUSTOM:
            raise ValueError(f"a {kv_precision.value} KV cache needs the custom attention backend, not {backend.value}")
        self.dims, self.max_context, self.backend, self.fuse_qkv = dims, max_context, backend, fuse_qkv
        self.embed_tokens = nn.Embedding(dims.vocab_size, dims.hidden_size)
        self.layers = nn.ModuleList(Block(dims, max_context, backend, fp16_safe_norm, fuse_qkv, i, kv_precision)
                                    for i in range(dims.num_layers))
        if backend is AttentionBackend.COREML_STACKED:  # Core ML states named as Apple's Llama example names them
            shape = (dims.num_layers, 1, dims.num_kv_heads, max_context, dims.head_dim)
            self.register_buffer("keyCache", torch.zeros(shape, dtype=torch.float16), persistent=False)
            self.register_buffer("valueCache", torch.zeros(shape, dtype=torch.float16), persistent=False)
        self.norm = RMSNorm(dims.hidden_size, dims.rms_norm_eps, fp16_safe_norm)
        # Always its own Linear, even when the source ties it to the embedding: the gather (embedding) and
        # the matmul (lm_head) are quantized into different formats, deliberately, never one copy twice.
        self.lm_head = nn.Linear(dims.hidden_size, dims.vocab_size, bias=False)
        cos, sin = rope_tables(dims, max_context)  # (ctx, d), kept as (ctx, 1, d): a slice broadcasts over heads
        self.register_buffer("rope_cos", cos.unsqueeze(1), persistent=False)
        self.register_buffer("rope_sin", sin.unsqueeze(1), persistent=False)
        self.register_buffer("rope_rotate", rotate_half_matrix(dims.head_dim), persistent=False)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """tokens (1, seq); input_pos (1,), or for `coreml_stacked` the causal mask (1, 1, seq or 1, end)."""
        if self.backend is AttentionBackend.COREML_STACKED:
            return self._forward_stacked(tokens, input_pos)
        seq = tokens.shape[1]  # tokens (1, seq), input_pos (1,)
        if self.backend is AttentionBackend.COREML:
            start = input_pos[0]  # stays a tensor, so a trace keeps the position dynamic
            cos = self.rope_cos[start:start + seq].view(1, seq, 1, -1)  # (1, seq, 1, head_dim)
            sin = self.rope_sin[start:start + seq].view(1, seq, 1, -1)
            mask = self._grouped_mask(start, seq, finite=True)
        elif self.backend is AttentionBackend.COREAI:
            start = input_pos[0]  # a tensor: torch.export keeps it a program input
            positions = torch.arange(seq) + start
            dtype = self.rope_cos.dtype  # fp16 when the module was converted to fp16
            cos = self.rope_cos.index_select(0, positions).view(1, seq, 1, -1)  # (1, seq, 1, head_dim)
            sin = self.rope_sin.index_select(0, positions).view(1, seq, 1, -1)
            mask = self._grouped_mask(start, seq, finite=True).to(dtype)
        else:
            start = input_pos[0].item()
            torch._check_is_size(start)
            torch._check(start + seq <= self.max_context)
            # (seq, 1, head_dim), broadcast over (1, seq, heads, head_dim): no view in the graph, which XNNPACK would
            # otherwise take into a partition of its own
            cos = self.rope_cos.narrow(0, start, seq)
            sin = self.rope_sin.narrow(0, start, seq)
            mask = self._grouped_mask(start, seq, keys=start + seq) if self.backend is AttentionBackend.XNNPACK \
                else None
        if self.fuse_qkv:
            # One RoPE over the fused q/k/v heads instead of one for q and one for k (fewer ops per layer): v's
            # heads get cos 1 and sin 0. Built once per call and shared by every layer.
            h, kv, d = self.dims.num_heads, self.dims.num_kv_heads, self.dims.head_dim
            cos = torch.cat([cos.expand(-1, h + kv, d), torch.ones(seq, kv, d)], dim=1)  # (seq, h + 2kv, d)
            sin = torch.cat([sin.expand(-1, h + kv, d), torch.zeros(seq, kv, d)], dim=1)
        x = self.embed_tokens(tokens)  # (1, seq, hidden)
        for layer in self.layers:
            x = layer(x, start, cos, sin, self.rope_rotate, mask)
        if self.last_logits:  # an app's prompt needs one row: the lm_head skips the others
            x = x.narrow(1, seq - 1, 1)  # (1, 1, hidden)
        return self.lm_head(self.norm(x))  # (1, seq or 1, vocab)

    def _forward_stacked(self, tokens: torch.Tensor, causal_mask: torch.Tensor) -> torch.Tensor:
        seq, end = tokens.shape[1], causal_mask.shape[-1]  # a trace keeps both as the inputs' (flexible) sizes
        start = end - seq
        cos = self.rope_cos[start:end].view(1, seq, 1, -1)  # (1, seq, 1, head_dim)
        sin = self.rope_sin[start:end].view(1, seq, 1, -1)
        groups = self.dims.num_heads // self.dims.num_kv_heads
        visible = torch.arange(end).view(1, -1) <= (torch.arange(seq) + start).view(-1, 1)  # (seq, end)
        # Our causal mask plus the caller's (finite -3e4: see _grouped_mask); a query axis of 1 broadcasts
        mask = (visible.to(torch.float32) - 1.0) * 3.0e4 + causal_mask[0, 0].to(torch.float32)  # (seq, end)
        mask = mask.view(seq, 1, end).expand(seq, groups, end).reshape(seq * groups, end)
        stacked = (self.keyCache, self.valueCache)
        x = self.embed_tokens(tokens)  # (1, seq, hidden)
        for layer in self.layers:
            x = layer(x, start, cos, sin, self.rope_rotate, mask, stacked)
        return self.lm_head(self.norm(x))  # (1, seq, vocab)

    def _grouped_mask(self, start: int | torch.Tensor, seq: int, finite: bool = False,
                      keys: int | None = None) -> torch.Tensor:
        """Additive causal mask over `keys` cache slots (default: the whole cache), one row per (position, query
        head in a KV group): (seq * groups, keys). It also hides slots not written yet, so stale entries are never
        read; XNNPACK attention passes keys = start + seq, the prefix it reads.
        `finite`: -3e4 instead of -inf, built arithmetically (fp16 programs; Core ML's select with scalar
        branches mis-infers its output shape)."""
        groups = self.dims.num_heads // self.dims.num_kv_heads
        positions = torch.arange(seq) + start  # (seq,)
        keys = self.max_context if keys is None else keys
        visible = torch.arange(keys).view(1, -1) <= positions.view(-1, 1)  # (seq, keys)
        if finite:
            mask = (visible.to(torch.float32) - 1.0) * 3.0e4  # (seq, ctx): 0 or -3e4
        else:
            mask = torch.where(visible, 0.0, float("-inf"))  # (seq, ctx)
        return mask.view(seq, 1, -1).expand(seq, groups, keys).reshape(seq * groups, keys)

    def reset_cache(self) -> None:
        if self.backend is AttentionBackend.COREML_STACKED:
            self.keyCache.zero_()
            self.valueCache.zero_()
            return
        for layer in self.layers:
            if self.backend is AttentionBackend.CUSTOM:
                reset_caches(layer.self_attn)
                continue
            layer.self_attn.k_cache.zero_()
            layer.self_attn.v_cache.zero_()

    @classmethod
    def from_hf(cls, hf_model: Any, max_context: int, backend: AttentionBackend = AttentionBackend.EAGER,
                fp16_safe_norm: bool = False, fuse_qkv: bool = False,
                kv_precision: KvCachePrecision = KvCachePrecision.FP32, last_logits: bool = False) -> ExportLlama:
        """Copy an HF LlamaForCausalLM's weights (fp32) into a fresh export module."""
        dims = LlamaDims.from_hf(hf_model.config)
        module = cls(dims, max_context, backend, fp16_safe_norm, fuse_qkv, kv_precision, last_logits)
        state = {k.removeprefix("model."): v for k, v in hf_model.state_dict().items()}
        if "lm_head.weight" not in state:  # tied: HF omits it
            state["lm_head.weight"] = state["embed_tokens.weight"]
        if fuse_qkv:
            for name, parts in fused_qkv_names(dims.num_layers).items():
                state[name + ".weight"] = torch.cat([state.pop(p + ".weight") for p in parts])
        state = {k: v.detach().float() for k, v in state.items()}  # load_state_dict copies: no clone
        missing, unexpected = module.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"weights do not fit the export module: missing {missing[:4]}, unexpected {unexpected[:4]}")
        return module.eval()
