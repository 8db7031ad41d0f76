"""RoPE scaling: which kinds can be lowered, and the rotary frequencies of each.

Every format bakes rotary tables (or their parameters) for a fixed context, so only scaling whose frequencies do
not depend on the sequence length can be lowered: `default`, `linear` and `llama3` (Llama 3.1 / 3.2 / 3.3).
`dynamic` and `longrope` switch frequencies with the sequence length and `yarn` also rescales attention; they are
refused before any work. The scaled frequencies come from transformers' own `ROPE_INIT_FUNCTIONS`, the code the
fp32 reference runs, so an exporter's tables match its reference by construction.
"""

from __future__ import annotations

import enum
from typing import Any

from compress.errors import Problem


class RopeType(enum.StrEnum):
    DEFAULT = "default"
    LINEAR = "linear"
    LLAMA3 = "llama3"


# The kinds with static frequencies and no attention rescaling: what the export module (ExecuTorch, Core ML),
# onnxruntime-genai's builder (its LlamaModel) and llama.cpp (`rope_freqs`, `rope.scaling.*`) all lower.
STATIC_ROPE = (RopeType.DEFAULT, RopeType.LINEAR, RopeType.LLAMA3)


def rope_parameters(config: Any) -> dict[str, Any]:
    """The config's RoPE parameters (transformers 5 `rope_parameters`; a raw config.json dict also works)."""
    if isinstance(config, dict):
        params = config.get("rope_parameters") or config.get("rope_scaling") or {}
        theta = config.get("rope_theta")
    else:
        params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
        theta = getattr(config, "rope_theta", None)
    params = dict(params)
    params.setdefault("rope_type", params.pop("type", "default"))
    if "rope_theta" not in params:
        params["rope_theta"] = float(theta if theta is not None else 10000.0)
    return params


def rope_theta(config: Any) -> float:
    return float(rope_parameters(config)["rope_theta"])


def rope_problems(config: Any, supported: tuple[RopeType, ...], who: str) -> list[Problem]:
    kind = rope_parameters(config)["rope_type"]
    if kind not in {t.value for t in supported}:
        return [Problem("model", f"RoPE scaling {kind!r} is not supported by {who}; supported: "
                                 f"{', '.join(t.value for t in supported)}")]
    return []


def default_inv_freq(theta: float, head_dim: int) -> Any:
    """theta^(-2i/d) for i < d/2, in float64: (d/2,)."""
    import torch

    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))


def inv_freq(config: Any, head_dim: int) -> Any:
    """The rotary frequencies (d/2,) float64 for `config` (an HF config object), scaling applied."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = rope_parameters(config)
    kind = RopeType(params["rope_type"])  # callers checked rope_problems first
    if kind is RopeType.DEFAULT:
        return default_inv_freq(params["rope_theta"], head_dim)
    freqs, attention_factor = ROPE_INIT_FUNCTIONS[kind.value](config, "cpu")
    if abs(float(attention_factor) - 1.0) > 1e-12:
        raise ValueError(f"RoPE scaling {kind.value!r} with attention factor {attention_factor}: not a pure "
                         f"frequency rescaling")
    if freqs.numel() != head_dim // 2:
        raise ValueError(f"RoPE scaling {kind.value!r} gave {freqs.numel()} frequencies for head_dim {head_dim}")
    return freqs.double()


def freq_factors(config: Any, head_dim: int) -> Any:
    """Per-frequency divisors of the default frequencies (llama.cpp's `rope_freqs` tensor): (d/2,) float32."""
    return (default_inv_freq(rope_theta(config), head_dim) / inv_freq(config, head_dim)).float()
