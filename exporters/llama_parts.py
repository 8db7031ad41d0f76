"""The pieces of the export module (exporters/llama.py) that hold no attention: the model's dimensions, an RMSNorm
that is safe in fp16 on request, the fused q/k/v names, and RoPE as tables and a matmul."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from compress.rope import (
    STATIC_ROPE,
    RopeType,
    default_inv_freq,
    inv_freq,
    rope_parameters,
    rope_problems,
    rope_theta,
)


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
