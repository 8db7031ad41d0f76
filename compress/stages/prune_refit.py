"""Least-squares reconstruction after structured pruning: each pruned layer's down_proj (and o_proj, when query
heads were removed) is refit so that the kept units reproduce, on calibration text, what all the original units
wrote into the residual stream.

For a layer whose full-width inputs A (tokens x units) feed W (hidden x units), keeping units K, the refit weights
minimise ||A W^T - A_K X^T||^2: X = W H[:, K] H[K, K]^-1 with H = A^T A (the optimal-brain-surgeon update that
ZipLM and SlimGPT apply to structured removal), with a 1% ridge on H[K, K]'s diagonal. Layers are refit in order and
each sees the inputs the refit layers before it produce, as GPTQ does. A removed unit whose activation is a linear
combination of kept ones is recovered up to that ridge (a test checks it within 2%).

Why our own: torch-pruning and LLM-Pruner remove structure but recover only by training; NNCF's structured
pruning targets convolutional filters; none refits a Llama's projections from calibration statistics.
"""

from __future__ import annotations

from typing import Any

import torch

from compress.stages.layerwise import first_layer_inputs, input_grams, layer_output

DAMP = 0.01  # added to H[K, K]'s diagonal as a fraction of each entry (scale-free: massive units keep theirs)
ROUNDS = 64  # structured OBS removes units in at most this many rounds per layer, the cheapest first in each


def _damped(gram: torch.Tensor) -> torch.Tensor:
    h = gram.double()
    diag = h.diagonal()
    return h + torch.diag(DAMP * diag + 1e-8 * diag.mean().clamp_min(1e-30))


def obs_choose(w: torch.Tensor, gram: torch.Tensor, keep: int, protected: torch.Tensor) -> tuple[torch.Tensor,
                                                                                                  torch.Tensor]:
    """(kept unit indices, their refit (hidden, keep) weights): units removed in rounds by structured optimal brain
    surgeon, each costing ||W[:, k]||^2 / [H^-1]_kk, the output error its removal leaves once the others are
    refit; after each round the survivors absorb the removed units' share. `protected` units are never removed."""
    hinv = torch.linalg.inv(_damped(gram))
    cur = w.double().clone()  # (hidden, units)
    alive = torch.ones(w.shape[1], dtype=torch.bool)
    remaining = w.shape[1] - keep
    for rounds_left in range(min(ROUNDS, remaining), 0, -1):
        n = -(-remaining // rounds_left)
        cost = cur.square().sum(0) / hinv.diagonal().clamp_min(1e-30)
        cost = torch.where(alive & ~protected, cost, torch.full_like(cost, torch.inf))
        gone = cost.topk(n, largest=False).indices
        block = torch.linalg.inv(hinv[gone][:, gone])  # (n, n)
        cur -= cur[:, gone] @ block @ hinv[gone]
        hinv -= hinv[:, gone] @ block @ hinv[gone]
        alive[gone] = False
        remaining -= n
    kept = alive.nonzero().flatten()
    return kept, refit_weight(w, gram, kept)  # the survivors refit in one solve, as without selection


def refit_weight(w: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(hidden, |keep|): the columns `keep` of a new (hidden, units) matrix that best stands in for all of `w`,
    given the inputs' (units, units) X^T X."""
    h_kk = _damped(gram[keep][:, keep])
    rhs = gram.double()[keep] @ w.double().T  # (|keep|, hidden): A_K^T A W^T
    return torch.linalg.solve(h_kk, rhs).T.to(w.dtype)


def _head_columns(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


def _mlp_gram(original_mlp: Any, pruned_layer: Any, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """X^T X of the original MLP's full-width down_proj input, computed on the MLP input the pruned layer sees."""
    seen: list[torch.Tensor] = []
    handle = pruned_layer.mlp.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            pruned_layer(hidden, **kwargs)
    finally:
        handle.remove()
    x = seen[0].reshape(-1, seen[0].shape[-1])  # (tokens, hidden)
    gram = None
    with torch.no_grad():
        for chunk in x.split(4096):
            a = (original_mlp.act_fn(original_mlp.gate_proj(chunk)) * original_mlp.up_proj(chunk)).float()
            part = a.T @ a
            gram = part if gram is None else gram + part
    return gram


def refit_pruned(original: Any, pruned: Any, keep_layers: list[int], units: list[torch.Tensor],
                 q_heads: list[torch.Tensor], windows: list[list[int]], console: Any,
                 protected: list[torch.Tensor] | None = None) -> dict[str, Any]:
    """Refit `pruned`'s down_proj and o_proj weights in place, layer by layer; returns the relative output error
    of the pruned MLPs on the calibration text before and after (mean over layers). With `protected` (per kept
    layer, a mask of units never to remove), each layer's MLP units are chosen again by `obs_choose` on the
    inputs the pruned path produces, replacing `units[j]` and the layer's gate/up rows."""
    head_dim = original.config.head_dim
    n_heads = original.config.num_attention_heads
    hidden, kwargs = first_layer_inputs(pruned, windows)
    before, after = [], []
    for j in console.track(range(len(keep_layers)), f"Refitting pruned layers ({len(windows)} calibration windows)"):
        i, layer = keep_layers[j], pruned.model.layers[j]
        source = original.model.layers[i]
        if len(q_heads[j]) < n_heads:
            # the original layer on the pruned path's input: its o_proj input holds every head, the kept ones
            # exactly as the pruned layer computes them
            gram = input_grams(source, {"o": source.self_attn.o_proj}, hidden, kwargs)["o"]
            cols = _head_columns(q_heads[j], head_dim)
            with torch.no_grad():
                layer.self_attn.o_proj.weight.copy_(refit_weight(source.self_attn.o_proj.weight, gram, cols))
        gram = _mlp_gram(source.mlp, layer, hidden, kwargs)
        w = source.mlp.down_proj.weight.detach()
        before.append(_relative_error(w, w[:, units[j]], gram, units[j]))
        if protected is None:
            new = refit_weight(w, gram, units[j])
        else:
            units[j], new = obs_choose(w, gram, len(units[j]), protected[j])
            _take_units(layer.mlp, source.mlp, units[j])
        after.append(_relative_error(w, new, gram, units[j]))
        with torch.no_grad():
            layer.mlp.down_proj.weight.copy_(new)
            hidden = layer_output(layer(hidden, **kwargs))
    return {"mlp_output_error_before_refit": round(sum(before) / len(before), 4),
            "mlp_output_error_after_refit": round(sum(after) / len(after), 4)}


def _take_units(mlp: Any, source: Any, units: torch.Tensor) -> None:
    """The pruned MLP's gate and up projections become the source's rows `units` (down_proj is written after)."""
    with torch.no_grad():
        for name in ("gate_proj", "up_proj"):
            getattr(mlp, name).weight.copy_(getattr(source, name).weight[units])
            if getattr(source, name).bias is not None:
                getattr(mlp, name).bias.copy_(getattr(source, name).bias[units])


def _relative_error(w: torch.Tensor, kept: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor) -> float:
    """||A W^T - A_K kept^T|| / ||A W^T|| from the Gram matrix alone: the MLP's output error on the calibration text."""
    h = gram.double()
    full = torch.zeros_like(w, dtype=torch.float64)
    full[:, keep] = kept.double()
    d = w.double() - full  # (hidden, units)
    err = torch.einsum("hu,uv,hv->", d, h, d)
    ref = torch.einsum("hu,uv,hv->", w.double(), h, w.double())
    return float((err.clamp_min(0) / ref.clamp_min(1e-30)).sqrt())
