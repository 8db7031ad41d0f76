"""The prune stage on tiny Llamas: refusals before work, a valid smaller Llama, exact surgery, protection."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from compress import checkpoint
from compress.errors import ConfigError, InputError
from compress.metrics import mean_kl, param_count
from compress.models.tiny import tiny_llama
from compress.progress import Console
from compress.stages import STAGES, StageContext
from compress.stages.configs import Importance, PruneConfig
from compress.stages.prune import plan_prune, prune

QUIET = Console(quiet=True)


def _windows(count: int, length: int, seed: int = 0, vocab: int = 256) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab) for _ in range(length)] for _ in range(count)]


def _ctx(reference, tmp_path: Path, calibration=None) -> StageContext:
    return StageContext(0, tmp_path / "work", calibration or (lambda n, length: _windows(n, length)), reference, QUIET)


def _refuse_calibration(count: int, length: int):
    raise AssertionError("calibration was requested: the stage did work before refusing")


@pytest.fixture(scope="module")
def gqa_model():
    return tiny_llama(1, hidden_size=48, num_attention_heads=6, num_key_value_heads=3, num_hidden_layers=3,
                      intermediate_size=128)


def test_a_config_that_removes_nothing_is_refused_when_parsed():
    with pytest.raises(ConfigError, match="removes nothing"):
        PruneConfig()
    with pytest.raises(ConfigError, match=r"mlp_keep: 0 is out of range; allowed: > 0 and <= 1"):
        PruneConfig(mlp_keep=0)


@pytest.mark.parametrize("config, message", [
    (PruneConfig(drop_layers=3), r"prune.drop_layers: 3 removes every layer of a 3-layer model; allowed: 0..2"),
    (PruneConfig(mlp_keep=0.1), r"prune.mlp_keep: 0.1 of 128 MLP units rounds to 0 \(multiple_of 32\)"),
    (PruneConfig(heads_keep=0.5), r"prune.heads_keep: 0.5 keeps 1.5 of 3 KV groups; .* use one of 0.3333, 0.6667, 1"),
    (PruneConfig(query_heads_keep=0.7), r"prune.query_heads_keep: 0.7 keeps 1.4 of 2 query heads per KV group"),
    (PruneConfig(mlp_keep=0.95), r"remove nothing from this model \(intermediate_size 128, multiple_of 32"),
])
def test_bad_ratios_are_refused_before_any_calibration(gqa_model, tmp_path, config, message):
    with pytest.raises(InputError, match=message):
        STAGES.get("prune").run(gqa_model, config, _ctx(gqa_model, tmp_path, _refuse_calibration))


def test_plan_counts_respect_grouped_query_attention(gqa_model):
    plan = plan_prune(gqa_model.config, PruneConfig(mlp_keep=0.5, heads_keep=2 / 3, query_heads_keep=0.5,
                                                    drop_layers=1))
    assert (plan.layers, plan.mlp_units, plan.kv_groups, plan.q_per_group) == (2, 64, 2, 1)


def _masked_logits(model, result, ids: torch.Tensor) -> torch.Tensor:
    """A reference for the same pruning done by masking the original: zeroed units and heads, skipped blocks."""
    masked = tiny_llama(1, hidden_size=48, num_attention_heads=6, num_key_value_heads=3, num_hidden_layers=3,
                        intermediate_size=128)
    masked.load_state_dict(model.state_dict())
    head_dim = model.config.head_dim
    handles = []
    with torch.no_grad():
        for i, layer in enumerate(masked.model.layers):
            if i not in result.keep_layers:
                handles.append(layer.register_forward_hook(
                    lambda m, args, kwargs, out: args[0] if args else kwargs["hidden_states"], with_kwargs=True))
                continue
            j = result.keep_layers.index(i)
            unit_mask = torch.zeros(layer.mlp.down_proj.in_features, dtype=torch.bool)
            unit_mask[result.units[j]] = True
            layer.mlp.down_proj.weight[:, ~unit_mask] = 0  # a removed unit adds nothing to the residual stream
            head_mask = torch.zeros(model.config.num_attention_heads, dtype=torch.bool)
            head_mask[result.q_heads[j]] = True
            cols = head_mask.repeat_interleave(head_dim)
            layer.self_attn.o_proj.weight[:, ~cols] = 0  # a removed query head adds nothing either
        logits = masked(input_ids=ids, use_cache=False).logits
    for h in handles:
        h.remove()
    return logits


def test_pruned_model_equals_masking_the_original(gqa_model):
    config = PruneConfig(mlp_keep=0.5, heads_keep=2 / 3, query_heads_keep=0.5, drop_layers=1, reconstruct=False,
                         importance=Importance.ACTIVATION)
    result = prune(gqa_model, config, _windows(8, 32))
    cfg = result.model.config
    assert (cfg.num_hidden_layers, cfg.intermediate_size, cfg.num_key_value_heads, cfg.num_attention_heads,
            cfg.head_dim) == (2, 64, 2, 2, 8)
    # Whole KV groups survive: every kept query head belongs to a kept group.
    for groups, heads in zip(result.groups, result.q_heads):
        assert set((heads // 2).tolist()) <= set(groups.tolist())
    ids = torch.tensor(_windows(2, 24, seed=5))
    with torch.no_grad():
        ours = result.model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(ours, _masked_logits(gqa_model, result, ids), atol=1e-4, rtol=1e-4)
    assert result.notes["params_after"] == param_count(result.model) < result.notes["params_before"]


def test_pruned_model_is_an_ordinary_checkpoint_the_export_module_accepts(tmp_path):
    from compress.exporters.llama import ExportLlama

    model = tiny_llama(2, num_hidden_layers=4, intermediate_size=256)
    result = prune(model, PruneConfig(mlp_keep=0.5, drop_layers=1), _windows(8, 32))
    checkpoint.save_stage(result.model, None, tmp_path / "ckpt")
    reloaded, _ = checkpoint.load_stage(tmp_path / "ckpt")
    assert type(reloaded).__name__ == "LlamaForCausalLM" and reloaded.config.intermediate_size == 128
    ids = torch.tensor(_windows(1, 16, seed=3))
    with torch.no_grad():
        hf = reloaded(input_ids=ids, use_cache=False).logits[0]  # (seq, vocab)
        export = ExportLlama.from_hf(reloaded, max_context=64)
        ours = export(ids, torch.tensor([0]))[0]  # (seq, vocab)
    torch.testing.assert_close(ours, hf, atol=1e-4, rtol=1e-4)


def test_head_pruned_model_and_the_export_module(gqa_model):
    """A head-pruned Llama keeps head_dim in its config (hidden_size // num_heads no longer holds)."""
    from compress.exporters.llama import ExportLlama

    result = prune(gqa_model, PruneConfig(heads_keep=2 / 3), _windows(8, 32))
    model = result.model
    assert model.config.head_dim * model.config.num_attention_heads != model.config.hidden_size
    ids = torch.arange(3, 23).view(1, -1)
    with torch.no_grad():
        hf = model(input_ids=ids, use_cache=False).logits[0]  # (seq, vocab)
        ours = ExportLlama.from_hf(model, max_context=64)(ids, torch.tensor([0]))[0]
    torch.testing.assert_close(ours, hf, atol=1e-4, rtol=1e-4)


def _plant_massive_unit(model, unit: int, trigger: int) -> None:
    """Layer 0 MLP unit `unit` fires (|a| ~ 2000) only at token `trigger` and writes a large vector."""
    hidden = model.config.hidden_size
    gen = torch.Generator().manual_seed(7)
    d = torch.randn(hidden, generator=gen)
    d /= d.norm()
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb -= torch.outer(emb @ d, d)  # no token but the trigger points along d ...
        emb[trigger] = 20 * d
        layer = model.model.layers[0]
        o = layer.self_attn.o_proj.weight
        o -= torch.outer(d, d @ o)  # ... and attention never writes along d
        mlp = layer.mlp
        for w in (mlp.gate_proj.weight, mlp.up_proj.weight):
            w[unit] = 6 * d / layer.post_attention_layernorm.weight
        mlp.down_proj.weight[:, unit] = 0.008 * torch.randn(hidden, generator=gen)


def test_importance_protects_a_planted_massive_activation_unit():
    model = tiny_llama(3, num_hidden_layers=2, intermediate_size=128)
    unit, trigger = 77, 7
    _plant_massive_unit(model, unit, trigger)
    windows = _windows(16, 256, seed=1)
    for w in windows[::4]:
        w[0] = trigger  # like a BOS: one position in 1024 carries the massive activation
    by_activation = {"reconstruct": False, "importance": Importance.ACTIVATION}
    protected = prune(model, PruneConfig(mlp_keep=0.5, **by_activation), windows)
    unprotected = prune(model, PruneConfig(mlp_keep=0.5, protect_ratio=1e12, **by_activation), windows)
    assert unit in protected.units[0].tolist() and protected.notes["protected_mlp_units"].get("0", 0) >= 1
    assert unit not in unprotected.units[0].tolist()  # by mean contribution alone it would be removed
    ids = torch.tensor(windows[::4])  # the windows that carry the trigger, at position 0
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits[:, :1]  # (windows, 1, vocab)
        kl_protected = mean_kl(ref, protected.model(input_ids=ids, use_cache=False).logits[:, :1])
        kl_unprotected = mean_kl(ref, unprotected.model(input_ids=ids, use_cache=False).logits[:, :1])
    assert kl_protected < 0.5 * kl_unprotected


def test_stage_records_what_was_removed_and_the_kl_after_pruning(gqa_model, tmp_path):
    result = STAGES.get("prune").run(gqa_model, PruneConfig(mlp_keep=0.5, drop_layers=1, calibration_samples=6,
                                                            calibration_len=32, kl_windows=2), _ctx(gqa_model, tmp_path))
    notes = result.notes
    assert notes["layers"] == "3 -> 2" and len(notes["dropped_layers"]) == 1
    assert notes["mlp_units_per_layer"] == "128 -> 64" and len(notes["block_kl_when_skipped"]) == 3
    assert notes["kl_after_prune"] > 0 and "2 held-out calibration windows" in notes["kl_measured_on"]
    assert 0 < notes["params_removed_fraction"] < 1
    assert 0 <= notes["mlp_output_error_after_refit"] < notes["mlp_output_error_before_refit"]


def _with_duplicated_units(seed: int, strength: float = 0.25):
    """A tiny Llama whose MLP units 64..127 are copies of units 0..63 (same gate and up rows; a random down column
    `strength` times as long): every unit's activation is exactly its twin's."""
    model = tiny_llama(seed, num_hidden_layers=3, intermediate_size=128)
    with torch.no_grad():
        for layer in model.model.layers:
            mlp = layer.mlp
            mlp.gate_proj.weight[64:] = mlp.gate_proj.weight[:64]
            mlp.up_proj.weight[64:] = mlp.up_proj.weight[:64]
            mlp.down_proj.weight[:, 64:] = strength * torch.randn_like(mlp.down_proj.weight[:, :64]) \
                * mlp.down_proj.weight[:, :64].norm(dim=0, keepdim=True) / mlp.down_proj.weight.shape[0] ** 0.5
    return model


def test_reconstruction_recovers_units_the_kept_ones_duplicate():
    from compress.stages.prune import apply_plan
    from compress.stages.prune_refit import refit_pruned

    model = _with_duplicated_units(4)
    config = PruneConfig(mlp_keep=0.5)
    plan = plan_prune(model.config, config)
    keep = list(range(3))
    units, groups, heads = [torch.arange(64)] * 3, [torch.arange(2)] * 3, [torch.arange(4)] * 3  # copies go

    def pruned(reconstruct: bool):
        new = apply_plan(model, plan, keep, units, groups, heads)
        notes = refit_pruned(model, new, keep, units, heads, _windows(16, 64, seed=2), QUIET) if reconstruct else {}
        return new, notes

    (plain, _), (refit, notes) = pruned(False), pruned(True)
    ids = torch.tensor(_windows(4, 48, seed=9))  # held out
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
        kl_plain = mean_kl(ref, plain(input_ids=ids, use_cache=False).logits)
        kl_refit = mean_kl(ref, refit(input_ids=ids, use_cache=False).logits)
    # W_down[:, a] + W_down[:, copy of a] is the exact answer; the 1% ridge damping keeps it from being exact
    assert kl_refit < 0.02 * kl_plain and kl_plain > 1e-4
    assert notes["mlp_output_error_after_refit"] < 0.02 < notes["mlp_output_error_before_refit"]
    w = model.model.layers[0].mlp.down_proj.weight.detach()
    torch.testing.assert_close(refit.model.layers[0].mlp.down_proj.weight, w[:, :64] + w[:, 64:],
                               atol=0.02 * float(w.abs().max()), rtol=0.02)


def test_obs_keeps_one_unit_of_every_twin_pair_and_recovers_the_mlp():
    """Twins of equal strength: activation importance keeps both units of the strong pairs and loses both of the
    weak ones; structured OBS sees that a twin costs nothing once its partner absorbs it."""
    model = _with_duplicated_units(5, strength=1.0)
    windows = _windows(16, 64, seed=2)
    by_activation = prune(model, PruneConfig(mlp_keep=0.5, importance=Importance.ACTIVATION), windows)
    by_obs = prune(model, PruneConfig(mlp_keep=0.5, importance=Importance.OBS), windows)
    for units in by_obs.units:
        assert sorted((units % 64).tolist()) == list(range(64))  # one of each pair
    assert any(sorted((u % 64).tolist()) != list(range(64)) for u in by_activation.units)
    ids = torch.tensor(_windows(4, 48, seed=9))
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
        kl_activation = mean_kl(ref, by_activation.model(input_ids=ids, use_cache=False).logits)
        kl_obs = mean_kl(ref, by_obs.model(input_ids=ids, use_cache=False).logits)
    assert kl_obs < 0.05 * kl_activation
    assert by_obs.notes["mlp_output_error_after_refit"] < 0.02


def test_obs_without_the_refit_is_refused_when_parsed():
    with pytest.raises(ConfigError, match="obs chooses units by the error left after the refit"):
        PruneConfig(mlp_keep=0.5, importance=Importance.OBS, reconstruct=False)


def test_reconstruction_refits_o_proj_when_heads_go(gqa_model):
    windows = _windows(16, 32, seed=3)
    plain = prune(gqa_model, PruneConfig(heads_keep=2 / 3, reconstruct=False, importance=Importance.ACTIVATION),
                  windows)
    refit = prune(gqa_model, PruneConfig(heads_keep=2 / 3), windows)
    assert all(torch.equal(a, b) for a, b in zip(plain.q_heads, refit.q_heads))
    changed = [not torch.equal(p.self_attn.o_proj.weight, r.self_attn.o_proj.weight)
               for p, r in zip(plain.model.model.layers, refit.model.model.layers)]
    assert all(changed)
    ids = torch.tensor(_windows(4, 32, seed=11))
    with torch.no_grad():
        ref = gqa_model(input_ids=ids, use_cache=False).logits
        kl_plain = mean_kl(ref, plain.model(input_ids=ids, use_cache=False).logits)
        kl_refit = mean_kl(ref, refit.model(input_ids=ids, use_cache=False).logits)
    assert kl_refit < kl_plain
