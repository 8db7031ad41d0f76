"""The quantize stage: quantize once, as codes every exporter lowers without re-rounding.

It plans a (bits, group) per linear (the config's scheme, `overrides` by glob on the export module's names,
first match wins; the lm_head from `lm_head`), quantizes each weight with the configured algorithm
(compress.stages.quant_algorithms), optionally raises the most KL-sensitive linears to 8 bits until the
measured KL meets `max_kl` (compress.stages.sensitivity), and returns the fp32 model with every quantized weight
replaced by its exact dequantized value (so eager PyTorch runs the quantized model) and, in the StageResult, the
codes themselves (`QuantizedWeights`, saved beside the stage checkpoint). Its notes record the scheme,
the average bits, the calibration text it used and the KL it measured against the unquantized model.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

from compress.quantized import QuantizeConfig, QuantizedWeights, Rotation
from compress.stages import StageContext, StageResult
from compress.stages.quant_plan import CALIBRATED, apply, linear_weights, plan, quantize_model


class QuantizeStage:
    version = "1"

    def run(self, model: Any, config: QuantizeConfig, ctx: StageContext) -> StageResult:
        from compress.stages import sensitivity

        notes: dict[str, Any] = {}
        if config.rotation is Rotation.HADAMARD:
            from compress.stages.rotation import rotate

            with ctx.console.step("Rotating the residual stream and value heads (randomized Hadamard)") as step:
                model = rotate(model, ctx.seed)
            notes["rotation"] = {"kind": config.rotation.value, "seed": ctx.seed, "seconds": step["seconds"],
                                 "untied_lm_head": True}
        plans = plan(model, config)  # refuses what cannot be done as asked, before any work
        fits = config.algorithm in CALIBRATED
        windows = ctx.calibration(config.calibration_windows + (config.fit_windows if fits else 0),
                                  config.calibration_len)
        windows, fit = windows[:config.calibration_windows], windows[config.calibration_windows:]
        start = time.perf_counter()
        quantized, qw = quantize_model(model, config, ctx.console, fit)
        seconds = {"quantize": time.perf_counter() - start}
        measure = sensitivity.KlProbe(ctx.reference, windows)
        kl = measure(quantized)
        notes["kl_all_at_weight_bits"] = kl
        if config.max_kl is not None and kl > config.max_kl:
            start = time.perf_counter()
            tensors = dict(qw.tensors)
            promoted, kl, ranking = sensitivity.promote_until(model, tensors, plans, config, measure, ctx.console)
            seconds["mixed_precision"] = time.perf_counter() - start
            quantized, qw = apply(model, tensors), QuantizedWeights(tensors, config, tuple(promoted))
            notes.update(promoted_to_8bit=promoted, sensitivity_top=ranking[:10])
        total = len(linear_weights(model))
        notes.update(scheme=qw.scheme, kl_vs_unquantized=kl, max_kl=config.max_kl, **qw.bits_summary(),
                     linears_quantized=len(qw.tensors), linears_total=total, seconds=seconds,
                     calibration=_calibration_record(windows), fit=_calibration_record(fit) if fit else None)
        ctx.console.print(f"  quantized {len(qw.tensors)}/{total} linears, {notes.get('avg_code_bits')} code bits "
                          f"per weight, KL vs unquantized {kl:.4g} on {len(windows)} calibration windows")
        return StageResult(quantized, notes, qw)


def _calibration_record(windows: list[list[int]]) -> dict[str, Any]:
    digest = hashlib.sha256(str([list(w) for w in windows]).encode()).hexdigest()
    return {"split": "calibration (disjoint from the evaluation windows)", "windows": len(windows),
            "tokens": sum(len(w) for w in windows), "token_ids_sha256": digest}
