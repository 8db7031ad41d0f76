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
      "eager": index_copy + SDPA with an explicit mask, plain PyTorch (for exporters without custom ops).
      "coreml": fp16 caches (1, n_kv, ctx, d) updated by slice assignment at a traced (tensor) start
        position, which coremltools turns into Core ML states (read_state/slice_update/update_state); then
        matmul/softmax over the whole static cache with a finite additive mask. Core ML states must be fp16.
  - an RMSNorm that is safe in fp16 on request (`fp16_safe_norm`): SmolLM2's residual stream reaches
    |x| ~ 2.5e4, so squaring x overflows fp16 (max 65504); the norm divides each row by its max |x| first,
    which is exact in real arithmetic (eps is rescaled with it).
forward(tokens (1, seq) int64, input_pos (1,) int64) -> logits (1, seq, vocab), all positions.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from compress.rope import STATIC_ROPE, RopeType, default_inv_freq, inv_freq, rope_parameters, rope_problems, rope_theta


class AttentionBackend(enum.StrEnum):
    XNNPACK = "xnnpack"  # update_cache custom op + bmm/softmax attention (import the custom ops first)
    CUSTOM = "custom"  # update_cache + custom_sdpa custom ops
    EAGER = "eager"  # plain PyTorch ops only
    COREML = "coreml"  # fp16 caches updated by slice assignment (Core ML states), plain ops only
    # fp16 caches laid out (positions, kv heads, head dim), written with index_copy_ along positions: what
    # torch.export and coreai-torch lower (its index_put takes a dynamic count on dim 0 only); plain ops only
    COREAI = "coreai"


@dataclass(frozen=True)
class LlamaDims:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    head_dim_override: int | None = None  # config.head_dim when it is not hidden_size // num_heads (head-pruned)
    scaled_inv_freq: tuple[float, ...] | None = None  # RoPE scaling's frequencies (compress/rope.py); None: default

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.hidden_size // self.num_heads

    @classmethod
    def from_hf(cls, config: Any) -> LlamaDims:
        problems = rope_problems(config, STATIC_ROPE, "the export module")
        if problems:
            raise ValueError(str(problems[0]))
        eos = config.eos_token_id[0] if isinstance(config.eos_token_id, list) else config.eos_token_id
        head_dim = getattr(config, "head_dim", None)
        scaled = None
        if rope_parameters(config)["rope_type"] != RopeType.DEFAULT:
            scaled = tuple(inv_freq(config, head_dim or config.hidden_size // config.num_attention_heads).tolist())
        return cls(config.vocab_size, config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
                   config.num_key_value_heads, config.intermediate_size, float(config.rms_norm_eps),
                   rope_theta(config), bool(config.tie_word_embeddings), config.bos_token_id, eos, head_dim, scaled)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, fp16_safe: bool = False):
        super().__init__()
        self.eps, self.fp16_safe = eps, fp16_safe
        self.weight = nn.Parameter(torch.ones(dim))
        # The mean over the last dim as a matmul with a (1, dim) row of 1/dim: XNNPACK has no last-dim mean
        # for 3-D tensors, so `x.pow(2).mean(-1)` would cut every block into several partitions.
        self.register_buffer("mean_row", torch.full((1, dim), 1.0 / dim), persistent=False)
        self.register_buffer("eps_bias", torch.full((1,), eps), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Casts only where they do something: a no-op .float() still costs graph nodes that every export pass retraces.
        x32 = x if x.dtype == torch.float32 else x.float()  # (1, seq, dim)
        if self.fp16_safe:
            # rms(x / s) * s == rms(x): with s = max |x| per row the squares stay <= 1 in fp16. The floor keeps an
            # all-zero row finite; eps / s^2 is formed as (sqrt(eps) / s)^2 so s^2 never underflows fp16.
            scale = x32.abs().amax(dim=-1, keepdim=True).clamp(min=1e-2)  # (1, seq, 1)
            x32 = x32 / scale
            mean_sq = F.linear(x32 * x32, self.mean_row) + (math.sqrt(self.eps) / scale) ** 2  # (1, seq, 1)
        else:
            mean_sq = F.linear(x32 * x32, self.mean_row, self.eps_bias)  # eps as the matmul's bias: one op fewer
        out = x32 * torch.rsqrt(mean_sq)
        return (out if out.dtype == x.dtype else out.to(x.dtype)) * self.weight


def fused_qkv_names(num_layers: int) -> dict[str, tuple[str, str, str]]:
    """The fused projection of each layer and the q/k/v projections it stacks, in order."""
    return {f"layers.{i}.self_attn.qkv_proj": tuple(f"layers.{i}.self_attn.{n}_proj" for n in "qkv")
            for i in range(num_layers)}


def rope_tables(dims: LlamaDims, max_context: int) -> tuple[torch.Tensor, torch.Tensor]:
    if dims.scaled_inv_freq is not None:
        freq = torch.tensor(dims.scaled_inv_freq, dtype=torch.float64)  # (d/2,)
    else:
        freq = default_inv_freq(dims.rope_theta, dims.head_dim)
    freqs = torch.outer(torch.arange(max_context, dtype=torch.float64), freq)  # (ctx, d/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (ctx, d)
    return emb.cos().float(), emb.sin().float()


def rotate_half_matrix(d: int) -> torch.Tensor:
    """R with F.linear(x, R) == cat(-x[d/2:], x[:d/2]): HF's rotate_half as a matmul XNNPACK can run
    (slices on the last dim would leave the block split around them)."""
    half = d // 2
    r = torch.zeros(d, d)
    r[torch.arange(half), torch.arange(half) + half] = -1.0
    r[torch.arange(half) + half, torch.arange(half)] = 1.0
    return r


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotate: torch.Tensor) -> torch.Tensor:
    # x (1, seq, heads, d); cos/sin (seq, 1 or heads, d) broadcast against it
    return x * cos + F.linear(x, rotate) * sin


class Attention(nn.Module):
    def __init__(self, dims: LlamaDims, max_context: int, backend: AttentionBackend, fuse_qkv: bool = False):
        super().__init__()
        self.dims, self.backend, self.fuse_qkv = dims, backend, fuse_qkv
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
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)

    def forward(self, x: torch.Tensor, start: int, cos: torch.Tensor, sin: torch.Tensor,
                rotate: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
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
            torch.ops.llama.update_cache(k, self.k_cache, start)
            torch.ops.llama.update_cache(v, self.v_cache, start)
            out = torch.ops.llama.custom_sdpa(q, self.k_cache, self.v_cache, start, None, 0, True)  # (1,seq,h,d)
        elif self.backend is AttentionBackend.COREML:
            out = self._coreml(q, k, v, start, seq, mask)
        elif self.backend is AttentionBackend.COREAI:
            out = self._coreai(q, k, v, start, seq, mask)
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
                 fuse_qkv: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(dims.hidden_size, dims.rms_norm_eps, fp16_safe_norm)
        self.self_attn = Attention(dims, max_context, backend, fuse_qkv)
        self.post_attention_layernorm = RMSNorm(dims.hidden_size, dims.rms_norm_eps, fp16_safe_norm)
        self.mlp = MLP(dims)

    def forward(self, x: torch.Tensor, start: int, cos: torch.Tensor, sin: torch.Tensor,
                rotate: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), start, cos, sin, rotate, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class ExportLlama(nn.Module):
    def __init__(self, dims: LlamaDims, max_context: int, backend: AttentionBackend = AttentionBackend.EAGER,
                 fp16_safe_norm: bool = False, fuse_qkv: bool = False):
        super().__init__()
        self.dims, self.max_context, self.backend, self.fuse_qkv = dims, max_context, backend, fuse_qkv
        self.embed_tokens = nn.Embedding(dims.vocab_size, dims.hidden_size)
        self.layers = nn.ModuleList(Block(dims, max_context, backend, fp16_safe_norm, fuse_qkv)
                                    for _ in range(dims.num_layers))
        self.norm = RMSNorm(dims.hidden_size, dims.rms_norm_eps, fp16_safe_norm)
        # Always its own Linear, even when the source ties it to the embedding: the gather (embedding) and
        # the matmul (lm_head) are quantized into different formats, deliberately, never one copy twice.
        self.lm_head = nn.Linear(dims.hidden_size, dims.vocab_size, bias=False)
        cos, sin = rope_tables(dims, max_context)  # (ctx, d), kept as (ctx, 1, d): a slice broadcasts over heads
        self.register_buffer("rope_cos", cos.unsqueeze(1), persistent=False)
        self.register_buffer("rope_sin", sin.unsqueeze(1), persistent=False)
        self.register_buffer("rope_rotate", rotate_half_matrix(dims.head_dim), persistent=False)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
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
        for layer in self.layers:
            layer.self_attn.k_cache.zero_()
            layer.self_attn.v_cache.zero_()

    @classmethod
    def from_hf(cls, hf_model: Any, max_context: int, backend: AttentionBackend = AttentionBackend.EAGER,
                fp16_safe_norm: bool = False, fuse_qkv: bool = False) -> ExportLlama:
        """Copy an HF LlamaForCausalLM's weights (fp32) into a fresh export module."""
        dims = LlamaDims.from_hf(hf_model.config)
        module = cls(dims, max_context, backend, fp16_safe_norm, fuse_qkv)
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
