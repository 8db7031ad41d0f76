"""The quantize stage: quantize once, as codes every exporter lowers without re-rounding.

It plans a (bits, group) per linear (the config's scheme, `overrides` by glob on the export module's names,
first match wins; the lm_head from `lm_head`), quantizes each weight with the configured algorithm
(compress.stages.quant_algorithms), optionally raises the most KL-sensitive linears to 8 bits until the
measured KL meets `max_kl` (compress.stages.sensitivity), and returns the fp32 model with every quantized weight
replaced by its exact dequantized value (so eager PyTorch runs the quantized model) plus the codes themselves
(`QuantizedWeights`, attached to the model, saved beside the stage checkpoint). Its notes record the scheme,
the average bits, the calibration text it used and the KL it measured against the unquantized model.
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import time
from dataclasses import dataclass
from typing import Any

from compress.errors import InputError
from compress.stages import StageContext, StageResult
from compress.stages.configs import BITS_OF, QuantAlgorithm, QuantizeConfig, WeightFormat
from compress.stages.qtensor import ATTRIBUTE, QuantizedWeights, QuantTensor

AVAILABLE = (QuantAlgorithm.RTN, QuantAlgorithm.HQQ, QuantAlgorithm.KEEP_GGUF)


@dataclass(frozen=True)
class Plan:
    name: str  # export-module name: layers.0.self_attn.q_proj, lm_head
    bits: int
    group: int


def linear_weights(model: Any) -> dict[str, Any]:
    """Export-module name -> the HF model's fp32 weight (the lm_head of a tied model is the embedding)."""
    from torch import nn

    out = {name.removeprefix("model."): mod.weight for name, mod in model.named_modules()
           if isinstance(mod, nn.Linear)}
    return out


def plan(model: Any, q: QuantizeConfig) -> list[Plan]:
    """Every linear's (bits, group); raises InputError (before any work) for what cannot be done as asked."""
    if q.algorithm not in AVAILABLE:
        raise InputError(f"quantize.algorithm {q.algorithm.value!r} is not available in the quantize stage; "
                         f"choose one of {', '.join(a.value for a in AVAILABLE)}")
    if q.weight_format is not WeightFormat.AFFINE:
        raise InputError(f"quantize.weight_format {q.weight_format.value!r} is not available in the quantize stage; "
                         f"choose 'affine' (palettization: export.quantize on an mlpackage target)")
    tied = bool(model.config.tie_word_embeddings)
    if tied and q.embedding is not q.lm_head:
        raise InputError(f"quantize.embedding {q.embedding.value!r} != lm_head {q.lm_head.value!r}: this model ties "
                         f"them (one matrix), so the stage quantizes it once; set both to the same precision")
    weights = linear_weights(model)
    unused = [o.pattern for o in q.overrides if not any(fnmatch.fnmatchcase(n, o.pattern) for n in weights)]
    if unused:
        raise InputError(f"quantize.overrides pattern {unused[0]!r} matches no linear (names look like "
                         f"{next(iter(weights))!r}, lm_head)")
    plans, bad = [], []
    for name, w in weights.items():
        width = w.shape[1]
        if name == "lm_head":
            bits = BITS_OF[q.lm_head]
            # GGUF's Q8_0 / Q4_1 blocks are 32 wide; otherwise the body's group (MatMulNBits needs blocks).
            group = 32 if q.algorithm is QuantAlgorithm.KEEP_GGUF else q.group_size
        else:
            override = next((o for o in q.overrides if fnmatch.fnmatchcase(name, o.pattern)), None)
            bits = q.weight_bits if override is None else (None if override.weight_bits == 16 else override.weight_bits)
            group = q.group_size if override is None else override.group_size
        if bits is None:
            continue
        group = group or width  # per channel: one group spans the row
        if width % group:
            bad.append(f"{name} (in_features {width})")
        plans.append(Plan(name, bits, group))
    if bad:
        raise InputError(f"quantize.group_size {q.group_size} does not divide {len(bad)} linear(s): {bad[0]}; choose a "
                         f"group size that divides every width or add an override for them")
    return plans


def quantize_one(w: Any, p: Plan, q: QuantizeConfig) -> QuantTensor:
    from compress.stages import quant_algorithms as qa

    w = w.detach().float()
    if q.algorithm is QuantAlgorithm.KEEP_GGUF:
        t, err = qa.recover_grid(w, p.bits, p.group)
        if t is None:
            raise InputError(f"quantize.algorithm 'keep_gguf': {p.name} is not on a {p.bits}-bit grid per group of "
                             f"{p.group} (worst error {err:.3g} of a step): the source is not a GGUF with Q4_1/Q8_0 "
                             f"weights there; use algorithm 'hqq' or 'rtn', or an override for it")
        return t
    if q.algorithm is QuantAlgorithm.HQQ and p.name != "lm_head":
        return qa.hqq(w, p.bits, p.group)
    # The lm_head is round to nearest even under HQQ: a tied embedding's gather (ONNX's GatherBlockQuantized,
    # ExecuTorch's quantized embedding) takes integer zero points only, and HQQ's are floats.
    return qa.rtn(w, p.bits, p.group, q.symmetric)


def apply(model: Any, tensors: dict[str, QuantTensor], scheme: dict[str, Any]) -> Any:
    """A copy of `model` whose quantized weights hold their dequantized values, carrying the codes."""
    import torch

    out = copy.deepcopy(model)
    weights = linear_weights(out)
    with torch.no_grad():
        for name, t in tensors.items():
            weights[name].copy_(t.dequantize())
    setattr(out, ATTRIBUTE, QuantizedWeights(dict(tensors), scheme))
    return out


class QuantizeStage:
    version = "1"

    def run(self, model: Any, config: QuantizeConfig, ctx: StageContext) -> StageResult:
        from compress.stages import sensitivity

        plans = plan(model, config)
        windows = ctx.calibration(config.calibration_windows, config.calibration_len)
        weights = linear_weights(model)
        start = time.perf_counter()
        tensors = {}
        for p in ctx.console.track(plans, f"Quantizing {len(plans)} linears ({config.algorithm.value})"):
            tensors[p.name] = quantize_one(weights[p.name], p, config)
        seconds = {"quantize": time.perf_counter() - start}
        scheme = {"algorithm": config.algorithm.value, "weight_bits": config.weight_bits,
                  "group_size": config.group_size, "symmetric": config.symmetric,
                  "activations": config.activations.value, "embedding": config.embedding.value,
                  "lm_head": config.lm_head.value}
        measure = sensitivity.KlProbe(ctx.reference, windows)
        quantized = apply(model, tensors, scheme)
        kl = measure(quantized)
        notes: dict[str, Any] = {"kl_all_at_weight_bits": kl}
        if config.max_kl is not None and kl > config.max_kl:
            start = time.perf_counter()
            promoted, kl, ranking = sensitivity.promote_until(model, tensors, plans, config, measure, ctx.console)
            seconds["mixed_precision"] = time.perf_counter() - start
            quantized = apply(model, tensors, {**scheme, "promoted_to_8bit": promoted})
            notes.update(promoted_to_8bit=promoted, sensitivity_top=ranking[:10])
        qw = getattr(quantized, ATTRIBUTE)
        notes.update(scheme=qw.scheme, kl_vs_unquantized=kl, max_kl=config.max_kl, **qw.bits_summary(),
                     linears_quantized=len(tensors), linears_total=len(weights), seconds=seconds,
                     calibration=_calibration_record(windows))
        ctx.console.print(f"  quantized {len(tensors)}/{len(weights)} linears, {notes.get('avg_code_bits')} code bits "
                          f"per weight, KL vs unquantized {kl:.4g} on {len(windows)} calibration windows")
        return StageResult(quantized, notes)


def _calibration_record(windows: list[list[int]]) -> dict[str, Any]:
    digest = hashlib.sha256(str([list(w) for w in windows]).encode()).hexdigest()
    return {"split": "calibration (disjoint from the evaluation windows)", "windows": len(windows),
            "tokens": sum(len(w) for w in windows), "token_ids_sha256": digest}
