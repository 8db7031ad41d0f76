from __future__ import annotations

import pytest

from compress.errors import ExportError
from compress.models.tiny import tiny_llama
from compress.stages.configs import Activations, LayerOverride, Precision, QuantizeConfig
from exporters.llama import ExportLlama
from exporters.torchao_quant import check_plan, coverage, plan_linears


def _module(**dims):
    return ExportLlama.from_hf(tiny_llama(seed=0, **dims), max_context=32)


def test_plan_follows_scheme_lm_head_and_first_matching_override():
    q = QuantizeConfig(weight_bits=4, group_size=32, activations=Activations.INT8_DYNAMIC, lm_head=Precision.INT8,
                       overrides=(LayerOverride("layers.0.mlp.*", weight_bits=8), LayerOverride("layers.0.*",
                                                                                                weight_bits=16)))
    plans = {p.name: p for p in plan_linears(_module(), q)}
    assert len(plans) == 2 * 7 + 1
    assert (plans["layers.1.self_attn.q_proj"].bits, plans["layers.1.self_attn.q_proj"].group_size) == (4, 32)
    assert (plans["lm_head"].bits, plans["lm_head"].group_size) == (8, None)
    assert plans["layers.0.mlp.down_proj"].bits == 8  # the first override matches before the broader one
    assert plans["layers.0.self_attn.k_proj"].bits is None  # 16 bits: kept fp32 by request
    cov = coverage(list(plans.values()))
    assert (cov["linears_total"], cov["linears_quantized"], cov["linears_fp32_by_request"]) == (15, 11, 4)


def test_a_group_that_does_not_divide_a_width_fails_unless_allowed():
    q = QuantizeConfig(weight_bits=4, group_size=64, activations=Activations.INT8_DYNAMIC)
    plans = plan_linears(_module(intermediate_size=96), q)  # down_proj has 96 inputs
    skipped = [p for p in plans if p.skipped]
    assert [p.name for p in skipped] == ["layers.0.mlp.down_proj", "layers.1.mlp.down_proj"]
    with pytest.raises(ExportError, match="2 of 15 linears cannot be quantized as configured "
                                          r"\(layers.0.mlp.down_proj: in_features 96 is not a multiple of "
                                          "group_size 64\\)"):
        check_plan(plans, allow_skips=False)
    check_plan(plans, allow_skips=True)
    assert (coverage(plans)["linears_quantized"], coverage(plans)["linears_fp32_by_request"]) == (12, 1)  # lm_head: fp32
