"""Structured pruning (Minitron-style): a smaller, ordinary LlamaForCausalLM that every exporter accepts.

Importance comes from activations on calibration text, never from weight magnitude alone:

- MLP unit i of a layer: its mean contribution to the residual stream, mean_t |a_t,i| * ||W_down[:, i]||,
  where a is the input of down_proj. Units whose *peak* contribution is `protect_ratio` times their
  layer's median peak are always kept: SmolLM2's residual stream reaches |x| ~ 2.5e4 at a few positions
  through a handful of such units, and removing them (magnitude pruning does) destroys the model.
- Query head h: mean_t ||W_o[:, h] @ o_t,h||, its contribution through o_proj; a KV group scores the sum
  of its query heads, so whole groups are kept or removed and grouped-query structure survives.
- Block (depth): the KL divergence of the model's output when that one block is skipped (layer 1 of
  SmolLM2 costs KL 4.4, most cost 1.3-2), measured on a few calibration windows.

Then (`reconstruct`, on by default) each kept layer's down_proj and o_proj are refit by least squares so the kept
units stand in for the removed ones, and under `importance: obs` the MLP units are chosen by the error their removal
leaves after that refit (compress/stages/prune_refit.py).

Widths are uniform across layers (LlamaConfig holds one intermediate_size and one head count).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compress.errors import InputError
from compress.metrics import mean_kl, param_count
from compress.progress import Console
from compress.stages import StageContext, StageResult
from compress.stages.configs import Importance, PruneConfig
from compress.stages.prune_refit import refit_pruned

QUIET = Console(quiet=True)


@dataclass(frozen=True)
class PrunePlan:
    """What survives, in counts; checked against the model before any calibration work."""

    layers: int
    mlp_units: int
    kv_groups: int
    q_per_group: int
    drop_layers: int


def _whole(fraction: float, total: int, what: str, field: str) -> int:
    """`fraction * total` as a whole count, or an InputError naming the fractions that work."""
    kept = round(fraction * total)
    if abs(fraction * total - kept) > 0.02 or kept < 1:
        valid = ", ".join(f"{k / total:.4g}" for k in range(1, total + 1))
        raise InputError(f"prune.{field}: {fraction!r} keeps {fraction * total:.3g} of {total} {what}; grouped-query "
                         f"attention needs a whole number of {what}: use one of {valid}")
    return kept


def plan_prune(config: Any, cfg: PruneConfig) -> PrunePlan:
    """Counts for a model config; raises InputError when the ratios remove everything or nothing."""
    n_layers, width = config.num_hidden_layers, config.intermediate_size
    kv = config.num_key_value_heads
    q_per_group = config.num_attention_heads // kv
    if cfg.drop_layers >= n_layers:
        raise InputError(f"prune.drop_layers: {cfg.drop_layers} removes every layer of a {n_layers}-layer model; "
                         f"allowed: 0..{n_layers - 1}")
    units = min(width, round(cfg.mlp_keep * width / cfg.multiple_of) * cfg.multiple_of)
    if cfg.mlp_keep < 1 and units < 1:
        raise InputError(f"prune.mlp_keep: {cfg.mlp_keep!r} of {width} MLP units rounds to 0 (multiple_of "
                         f"{cfg.multiple_of}); allowed: >= {cfg.multiple_of / width:.4g}")
    units = width if cfg.mlp_keep == 1 else units
    groups = _whole(cfg.heads_keep, kv, "KV groups", "heads_keep")
    per_group = _whole(cfg.query_heads_keep, q_per_group, "query heads per KV group", "query_heads_keep")
    plan = PrunePlan(n_layers - cfg.drop_layers, units, groups, per_group, cfg.drop_layers)
    if (plan.layers, units, groups, per_group) == (n_layers, width, kv, q_per_group):
        raise InputError(f"prune: mlp_keep {cfg.mlp_keep}, heads_keep {cfg.heads_keep}, query_heads_keep "
                         f"{cfg.query_heads_keep}, drop_layers {cfg.drop_layers} remove nothing from this model "
                         f"(intermediate_size {width}, multiple_of {cfg.multiple_of}, {kv} KV groups)")
    return plan


@dataclass
class Scores:
    mlp: list[torch.Tensor]  # per layer: (intermediate,) mean contribution
    mlp_peak: list[torch.Tensor]  # per layer: (intermediate,) largest contribution at any position
    heads: list[torch.Tensor]  # per layer: (num_heads,) mean contribution through o_proj
    blocks: torch.Tensor | None  # (layers,) KL when the block is skipped


def _hidden_in(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _skip_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> torch.Tensor:
    return _hidden_in(args, kwargs)  # the block becomes the identity on the residual stream


@torch.inference_mode()
def block_importance(model: Any, windows: list[list[int]]) -> torch.Tensor:
    """(layers,) mean KL of the model's output when each block alone is skipped."""
    ids = torch.tensor(windows)  # (batch, seq)
    base = model(input_ids=ids, use_cache=False).logits  # (batch, seq, vocab)
    scores = []
    for layer in model.model.layers:
        handle = layer.register_forward_hook(_skip_hook, with_kwargs=True)
        try:
            scores.append(mean_kl(base, model(input_ids=ids, use_cache=False).logits))
        finally:
            handle.remove()
    return torch.tensor(scores)


@torch.inference_mode()
def width_importance(model: Any, windows: list[list[int]], batch: int = 4) -> Scores:
    """MLP-unit and head contributions accumulated over `windows` with forward pre-hooks."""
    cfg = model.config
    n_heads, head_dim = cfg.num_attention_heads, cfg.head_dim
    layers = model.model.layers
    mlp = [torch.zeros(cfg.intermediate_size, dtype=torch.float64) for _ in layers]
    peak = [torch.zeros(cfg.intermediate_size) for _ in layers]
    heads = [torch.zeros(n_heads, dtype=torch.float64) for _ in layers]
    tokens = 0

    def on_down(i: int):
        col_norm = layers[i].mlp.down_proj.weight.norm(dim=0)  # (intermediate,)

        def hook(module: nn.Module, args: tuple) -> None:
            contrib = args[0].abs().flatten(0, 1) * col_norm  # (tokens, intermediate)
            mlp[i] += contrib.sum(0).double()
            peak[i] = torch.maximum(peak[i], contrib.amax(0))
        return hook

    def on_o(i: int):
        w_o = layers[i].self_attn.o_proj.weight.view(cfg.hidden_size, n_heads, head_dim)  # (hidden, heads, hd)

        def hook(module: nn.Module, args: tuple) -> None:
            o = args[0].flatten(0, 1).view(-1, n_heads, head_dim)  # (tokens, heads, head_dim)
            per_head = torch.einsum("thd,ehd->the", o, w_o).norm(dim=-1)  # (tokens, heads)
            heads[i] += per_head.sum(0).double()
        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(on_down(i)))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(on_o(i)))
    try:
        for start in range(0, len(windows), batch):
            ids = torch.tensor(windows[start:start + batch])  # (batch, seq)
            model(input_ids=ids, use_cache=False)
            tokens += ids.numel()
    finally:
        for h in handles:
            h.remove()
    return Scores([(m / tokens).float() for m in mlp], peak, [(h / tokens).float() for h in heads], None)


def massive_units(peak: torch.Tensor, protect_ratio: float) -> torch.Tensor:
    """(units,) bool: the units whose peak contribution is `protect_ratio` times their layer's median peak."""
    return peak > protect_ratio * peak.median().clamp_min(1e-12)


def choose_units(score: torch.Tensor, peak: torch.Tensor, keep: int, protect_ratio: float) -> tuple[torch.Tensor, int]:
    """Indices (sorted) of the `keep` units to keep: every protected unit first, then by mean score."""
    protected = massive_units(peak, protect_ratio)
    if int(protected.sum()) > keep:
        raise InputError(f"prune.mlp_keep keeps {keep} units per layer but {int(protected.sum())} carry massive "
                         f"activations (peak > {protect_ratio}x the median); keep more units or raise protect_ratio")
    ranked = torch.where(protected, torch.full_like(score, math.inf), score)
    return ranked.topk(keep).indices.sort().values, int(protected.sum())


def choose_heads(head_score: torch.Tensor, kv: int, groups: int, per_group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept KV groups, kept query heads): the best groups by summed head score, the best heads inside each."""
    by_group = head_score.view(kv, -1)  # (kv, q_per_group)
    kept_groups = by_group.sum(-1).topk(groups).indices.sort().values
    q_per_group = by_group.shape[1]
    kept_q = [g * q_per_group + by_group[g].topk(per_group).indices.sort().values for g in kept_groups.tolist()]
    return kept_groups, torch.cat(kept_q)


def _rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Row indices of a projection's output belonging to the given heads."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


def apply_plan(model: Any, plan: PrunePlan, keep_layers: list[int], units: list[torch.Tensor],
               groups: list[torch.Tensor], q_heads: list[torch.Tensor]) -> Any:
    """A new LlamaForCausalLM holding the kept layers, units and heads (index tensors per kept layer)."""
    from transformers import LlamaForCausalLM

    old = model.config
    config = copy.deepcopy(old)
    config.num_hidden_layers = plan.layers
    config.intermediate_size = plan.mlp_units
    config.num_key_value_heads = plan.kv_groups
    config.num_attention_heads = plan.kv_groups * plan.q_per_group
    config.head_dim = old.head_dim  # explicit: hidden_size // heads no longer holds after head pruning
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [old.layer_types[i] for i in keep_layers]
    hd = old.head_dim
    new = LlamaForCausalLM(config).to(torch.float32).eval()
    src = model.state_dict()
    dst = {"model.embed_tokens.weight": src["model.embed_tokens.weight"], "model.norm.weight": src["model.norm.weight"]}
    if "lm_head.weight" in src and not config.tie_word_embeddings:
        dst["lm_head.weight"] = src["lm_head.weight"]
    for j, i in enumerate(keep_layers):
        a, b = f"model.layers.{i}.", f"model.layers.{j}."
        q_rows, kv_rows = _rows(q_heads[j], hd), _rows(groups[j], hd)
        dst[b + "input_layernorm.weight"] = src[a + "input_layernorm.weight"]
        dst[b + "post_attention_layernorm.weight"] = src[a + "post_attention_layernorm.weight"]
        dst[b + "self_attn.q_proj.weight"] = src[a + "self_attn.q_proj.weight"][q_rows]
        dst[b + "self_attn.k_proj.weight"] = src[a + "self_attn.k_proj.weight"][kv_rows]
        dst[b + "self_attn.v_proj.weight"] = src[a + "self_attn.v_proj.weight"][kv_rows]
        dst[b + "self_attn.o_proj.weight"] = src[a + "self_attn.o_proj.weight"][:, q_rows]
        for bias, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            if a + f"self_attn.{bias}.bias" in src:
                dst[b + f"self_attn.{bias}.bias"] = src[a + f"self_attn.{bias}.bias"][rows]
        if a + "self_attn.o_proj.bias" in src:
            dst[b + "self_attn.o_proj.bias"] = src[a + "self_attn.o_proj.bias"]
        u = units[j]
        dst[b + "mlp.gate_proj.weight"] = src[a + "mlp.gate_proj.weight"][u]
        dst[b + "mlp.up_proj.weight"] = src[a + "mlp.up_proj.weight"][u]
        dst[b + "mlp.down_proj.weight"] = src[a + "mlp.down_proj.weight"][:, u]
        for name in ("gate_proj", "up_proj"):
            if a + f"mlp.{name}.bias" in src:
                dst[b + f"mlp.{name}.bias"] = src[a + f"mlp.{name}.bias"][u]
        if a + "mlp.down_proj.bias" in src:
            dst[b + "mlp.down_proj.bias"] = src[a + "mlp.down_proj.bias"]
    missing, unexpected = new.load_state_dict({k: v.clone() for k, v in dst.items()}, strict=False)
    if set(missing) - {"lm_head.weight"} or unexpected or ("lm_head.weight" in missing and not config.tie_word_embeddings):
        raise ValueError(f"pruned weights do not fit the pruned config: missing {missing[:4]}, unexpected {unexpected[:4]}")
    if config.tie_word_embeddings:
        new.tie_weights()
    return new


@dataclass
class Pruned:
    model: Any
    notes: dict
    keep_layers: list[int]  # original indices of the kept blocks
    units: list[torch.Tensor]  # per kept block: original indices of the kept MLP units
    q_heads: list[torch.Tensor]  # per kept block: original indices of the kept query heads
    groups: list[torch.Tensor]  # per kept block: original indices of the kept KV groups


def prune(model: Any, cfg: PruneConfig, windows: list[list[int]], depth_windows: int = 4,
          console: Any = QUIET) -> Pruned:
    """The pruned model, what was kept and what was removed; `windows` are calibration token windows."""
    plan = plan_prune(model.config, cfg)
    old = model.config
    blocks = None
    keep_layers = list(range(old.num_hidden_layers))
    if plan.drop_layers:
        blocks = block_importance(model, windows[:depth_windows])
        dropped = blocks.topk(plan.drop_layers, largest=False).indices.sort().values.tolist()
        keep_layers = [i for i in keep_layers if i not in dropped]
    imp = width_importance(model, windows)
    units, groups, q_heads, protected = [], [], [], []
    for i in keep_layers:
        u, n_protected = choose_units(imp.mlp[i], imp.mlp_peak[i], plan.mlp_units, cfg.protect_ratio)
        g, q = choose_heads(imp.heads[i], old.num_key_value_heads, plan.kv_groups, plan.q_per_group)
        units.append(u), groups.append(g), q_heads.append(q), protected.append(n_protected)
    pruned = apply_plan(model, plan, keep_layers, units, groups, q_heads)
    refit = {}
    if cfg.reconstruct:
        # under obs the units are chosen again inside the refit walk (units[j] replaced), massive ones kept
        masks = [massive_units(imp.mlp_peak[i], cfg.protect_ratio) for i in keep_layers] \
            if cfg.importance == Importance.OBS else None
        refit = refit_pruned(model, pruned, keep_layers, units, q_heads, windows, console, masks)
    notes = {
        "dropped_layers": [i for i in range(old.num_hidden_layers) if i not in keep_layers],
        "block_kl_when_skipped": None if blocks is None else [round(float(b), 4) for b in blocks],
        "layers": f"{old.num_hidden_layers} -> {plan.layers}",
        "mlp_units_per_layer": f"{old.intermediate_size} -> {plan.mlp_units}",
        "kv_groups_per_layer": f"{old.num_key_value_heads} -> {plan.kv_groups}",
        "query_heads_per_layer": f"{old.num_attention_heads} -> {plan.kv_groups * plan.q_per_group}",
        "protected_mlp_units": {str(i): n for i, n in zip(keep_layers, protected) if n},
        "params_before": param_count(model),
        "params_after": param_count(pruned),
        **refit,
    }
    notes["params_removed_fraction"] = round(1 - notes["params_after"] / notes["params_before"], 4)
    return Pruned(pruned, notes, keep_layers, units, q_heads, groups)


class PruneStage:
    version = "2"

    def run(self, model: Any, config: PruneConfig, ctx: StageContext) -> StageResult:
        plan_prune(model.config, config)  # bad ratios fail here, before any calibration work
        n_kl = config.kl_windows
        windows = ctx.calibration(config.calibration_samples + n_kl, config.calibration_len)
        # Held-out: the first n_kl windows only measure KL; importance never sees them.
        held_out, calib = windows[:n_kl], windows[n_kl:]
        with ctx.console.step(f"Importance and refit on {len(calib)} x {config.calibration_len} calibration tokens") as step:
            result = prune(model.eval(), config, calib, console=ctx.console)
            pruned, notes = result.model, result.notes
            step["detail"] = f"{notes['params_before'] / 1e6:.1f}M -> {notes['params_after'] / 1e6:.1f}M params"
        if held_out:
            with torch.inference_mode():
                ids = torch.tensor(held_out)  # (windows, seq)
                kl = mean_kl(ctx.reference(input_ids=ids, use_cache=False).logits,
                             pruned(input_ids=ids, use_cache=False).logits)
            notes["kl_after_prune"] = round(kl, 5)
            notes["kl_measured_on"] = f"{len(held_out)} held-out calibration windows x {config.calibration_len} tokens"
            ctx.console.print(f"  pruned: KL {kl:.4f} vs the reference ({notes['kl_measured_on']})")
        return StageResult(pruned, notes)
