"""Function-preserving transforms of a Llama's weights: the same outputs (to float rounding), other weights.

`fold_norm_gains` multiplies each decoder RMSNorm's gain into the linears that read the normalized stream
(`W <- W diag(g)`, `g <- 1`). Outputs are unchanged, but a checkpoint whose weights sat on a quantization grid
(a GGUF's Q4_1 blocks) no longer does: what a bf16 checkpoint looks like to a quantizer. It is also the first
step of a rotation (compress/stages/rotation.py), which needs every norm gain out of the way.
"""

from __future__ import annotations

from typing import Any


def fold_norm_gains(model: Any, final: bool = False) -> Any:
    """Fold every decoder layer's RMSNorm gains into q/k/v and gate/up, in place; with `final`, the last norm's
    gain into the lm_head too (which unties a tied lm_head from the embedding). Returns the model."""
    import torch

    with torch.no_grad():
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            _fold(layer.input_layernorm, (attn.q_proj, attn.k_proj, attn.v_proj))
            _fold(layer.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj))
        if final:
            untie_lm_head(model)
            _fold(model.model.norm, (model.lm_head,))
    return model


def untie_lm_head(model: Any) -> None:
    """Give the lm_head a weight of its own (a copy of the embedding) and record the model as untied."""
    import torch

    if model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr():
        model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach().clone())
    model.config.tie_word_embeddings = False
    if hasattr(model, "_tied_weights_keys"):
        model._tied_weights_keys = {} if isinstance(model._tied_weights_keys, dict) else []


def _fold(norm: Any, linears: tuple[Any, ...]) -> None:
    gain = norm.weight.detach().clone()  # (hidden,)
    for linear in linears:
        linear.weight.mul_(gain)  # (out, hidden) * (hidden,): column k scaled by g[k]
    norm.weight.fill_(1.0)
