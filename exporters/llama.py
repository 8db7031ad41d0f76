"""One small, export-friendly Llama that every exporter lowers, loaded from HF weights.

Why our own module (see DESIGN.md): HF's class carries machinery no phone needs, exported slowly and
partially to ExecuTorch and did not trace for Core ML. This one has:
  - a static KV cache held as buffers, shape (1, max_context, n_kv_heads, head_dim), updated in place;
  - RoPE tables precomputed for max_context (HF's non-interleaved "rotate half" convention, so HF's
    q/k weights load unpermuted);
  - attention that an exporter can swap for its backend's fused op: `Attention.backend` is "custom"
    (ExecuTorch's `llama::update_cache` + `llama::custom_sdpa`, which handle grouped-query attention
    and the causal offset themselves) or "eager" (index_copy + SDPA with an explicit mask).
forward(tokens (1, seq) int64, input_pos (1,) int64) -> logits (1, seq, vocab), all positions.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


class AttentionBackend(enum.Enum):
    CUSTOM = "custom"  # ExecuTorch custom ops (import executorch.extension.llm.custom_ops first)
    EAGER = "eager"  # plain PyTorch ops only


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

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf(cls, config: Any) -> LlamaDims:
        rope = getattr(config, "rope_parameters", None) or {}
        rope_type = rope.get("rope_type", "default")
        if rope_type != "default":
            raise ValueError(f"RoPE scaling {rope_type!r} is not supported by the export module; supported: default")
        theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        eos = config.eos_token_id[0] if isinstance(config.eos_token_id, list) else config.eos_token_id
        return cls(config.vocab_size, config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
                   config.num_key_value_heads, config.intermediate_size, float(config.rms_norm_eps), float(theta),
                   bool(config.tie_word_embeddings), config.bos_token_id, eos)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rope_tables(dims: LlamaDims, max_context: int) -> tuple[torch.Tensor, torch.Tensor]:
    d = dims.head_dim
    inv_freq = 1.0 / (dims.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))  # (d/2,)
    freqs = torch.outer(torch.arange(max_context, dtype=torch.float64), inv_freq)  # (ctx, d/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (ctx, d)
    return emb.cos().float(), emb.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x (1, seq, heads, d); cos/sin (seq, d) -> broadcast over heads
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[None, :, None, :] + rotated * sin[None, :, None, :]


class Attention(nn.Module):
    def __init__(self, dims: LlamaDims, max_context: int, backend: AttentionBackend):
        super().__init__()
        self.dims, self.backend = dims, backend
        h, kv, d = dims.num_heads, dims.num_kv_heads, dims.head_dim
        self.q_proj = nn.Linear(dims.hidden_size, h * d, bias=False)
        self.k_proj = nn.Linear(dims.hidden_size, kv * d, bias=False)
        self.v_proj = nn.Linear(dims.hidden_size, kv * d, bias=False)
        self.o_proj = nn.Linear(h * d, dims.hidden_size, bias=False)
        self.register_buffer("k_cache", torch.zeros(1, max_context, kv, d), persistent=False)
        self.register_buffer("v_cache", torch.zeros(1, max_context, kv, d), persistent=False)

    def forward(self, x: torch.Tensor, start: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        _, seq, _ = x.shape  # (1, seq, hidden)
        dims = self.dims
        q = apply_rope(self.q_proj(x).view(1, seq, dims.num_heads, dims.head_dim), cos, sin)
        k = apply_rope(self.k_proj(x).view(1, seq, dims.num_kv_heads, dims.head_dim), cos, sin)
        v = self.v_proj(x).view(1, seq, dims.num_kv_heads, dims.head_dim)
        if self.backend is AttentionBackend.CUSTOM:
            torch.ops.llama.update_cache(k, self.k_cache, start)
            torch.ops.llama.update_cache(v, self.v_cache, start)
            out = torch.ops.llama.custom_sdpa(q, self.k_cache, self.v_cache, start, None, 0, True)  # (1,seq,h,d)
        else:
            out = self._eager(q, k, v, start, seq)
        return self.o_proj(out.reshape(1, seq, dims.num_heads * dims.head_dim))

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
    def __init__(self, dims: LlamaDims, max_context: int, backend: AttentionBackend):
        super().__init__()
        self.input_layernorm = RMSNorm(dims.hidden_size, dims.rms_norm_eps)
        self.self_attn = Attention(dims, max_context, backend)
        self.post_attention_layernorm = RMSNorm(dims.hidden_size, dims.rms_norm_eps)
        self.mlp = MLP(dims)

    def forward(self, x: torch.Tensor, start: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), start, cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class ExportLlama(nn.Module):
    def __init__(self, dims: LlamaDims, max_context: int, backend: AttentionBackend = AttentionBackend.EAGER):
        super().__init__()
        self.dims, self.max_context = dims, max_context
        self.embed_tokens = nn.Embedding(dims.vocab_size, dims.hidden_size)
        self.layers = nn.ModuleList(Block(dims, max_context, backend) for _ in range(dims.num_layers))
        self.norm = RMSNorm(dims.hidden_size, dims.rms_norm_eps)
        # Always its own Linear, even when the source ties it to the embedding: the gather (embedding) and
        # the matmul (lm_head) are quantized into different formats, deliberately, never one copy twice.
        self.lm_head = nn.Linear(dims.hidden_size, dims.vocab_size, bias=False)
        cos, sin = rope_tables(dims, max_context)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        seq = tokens.shape[1]  # tokens (1, seq), input_pos (1,)
        start = input_pos[0].item()
        torch._check_is_size(start)
        torch._check(start + seq <= self.max_context)
        cos = self.rope_cos.narrow(0, start, seq)  # (seq, head_dim)
        sin = self.rope_sin.narrow(0, start, seq)
        x = self.embed_tokens(tokens)  # (1, seq, hidden)
        for layer in self.layers:
            x = layer(x, start, cos, sin)
        return self.lm_head(self.norm(x))  # (1, seq, vocab)

    def reset_cache(self) -> None:
        for layer in self.layers:
            layer.self_attn.k_cache.zero_()
            layer.self_attn.v_cache.zero_()

    @classmethod
    def from_hf(cls, hf_model: Any, max_context: int,
                backend: AttentionBackend = AttentionBackend.EAGER) -> ExportLlama:
        """Copy an HF LlamaForCausalLM's weights (fp32) into a fresh export module."""
        dims = LlamaDims.from_hf(hf_model.config)
        module = cls(dims, max_context, backend)
        state = {k.removeprefix("model."): v for k, v in hf_model.state_dict().items()}
        if "lm_head.weight" not in state:  # tied: HF omits it
            state["lm_head.weight"] = state["embed_tokens.weight"]
        state = {k: v.detach().clone().float() for k, v in state.items()}
        missing, unexpected = module.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"weights do not fit the export module: missing {missing[:4]}, unexpected {unexpected[:4]}")
        return module.eval()
