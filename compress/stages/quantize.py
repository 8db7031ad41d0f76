"""The quantize stage: quantize once, as codes every exporter lowers (ExecuTorch alone rounds two terms again for its
per-channel int8 kernels, an 8-bit per-group lm_head and the offset correction: exporters/xnnpack_codes.py).

It plans a (bits, group) per linear (the config's scheme, `overrides` by glob on the export module's names,
first match wins; the lm_head from `lm_head`), quantizes each weight with the configured algorithm
(compress.stages.quant_algorithms), optionally raises the most KL-sensitive linears to 8 bits until the
measured KL meets `max_kl` within `max_avg_bits` (compress.stages.sensitivity; the whole budget, best effort,
when it cannot), and returns the fp32 model with every quantized weight replaced by its exact dequantized value
(so eager PyTorch runs the quantized model) and, in the StageResult, the codes themselves (`QuantizedWeights`,
saved beside the stage checkpoint). Its notes record the scheme, the average bits, the calibration text it used,
the KL it measured against the unquantized model and, with mixed precision, the bits-vs-KL points measured.
With `smoothing` (compress.stages.smoothing) the smoothed model is quantized too, and its codes are kept only when
they measure a lower KL (tried only while the KL is above `max_kl`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable
from typing import Any

from compress.quantized import QuantizeConfig, QuantizedWeights, Rotation
from compress.stages import StageContext, StageResult
from compress.stages.quant_plan import CALIBRATED, apply, linear_weights, load_codes, plan, quantize_model


class QuantizeStage:
    version = "3"  # 2: mixed precision is best effort and measures a bits-vs-KL frontier; 3: fp16 scales, offsets

    def run(self, model: Any, config: QuantizeConfig, ctx: StageContext) -> StageResult:
        from compress.stages import sensitivity

        notes: dict[str, Any] = {}
        # The caller's model (the fp32 reference, or an earlier stage's result) is never overwritten here unless
        # the stage owns it (ctx.owns_model). An owned model is quantized in place: where float weights are needed
        # again afterwards (the smoothing candidate, the mixed-precision search), they are written back into it
        # from its checkpoint (ctx.restore_floats), so one fp32 model lives here; without a way to restore them
        # (or after a rotation, which makes a model of its own) the stage quantizes a copy.
        given = None if ctx.owns_model else model
        restore = ctx.restore_floats if ctx.owns_model else None
        if config.rotation is Rotation.HADAMARD:
            from compress.stages.rotation import rotate

            with ctx.console.step("Rotating the residual stream and value heads (randomized Hadamard)") as step:
                model = rotate(model, ctx.seed)
            notes["rotation"] = {"kind": config.rotation.value, "seed": ctx.seed, "seconds": step["seconds"],
                                 "untied_lm_head": True}
            restore = None  # the checkpoint holds the unrotated weights
        plans = plan(model, config)  # refuses what cannot be done as asked, before any work
        fits = config.algorithm in CALIBRATED
        windows = ctx.calibration(config.calibration_windows + (config.fit_windows if fits else 0),
                                  config.calibration_len)
        windows, fit = windows[:config.calibration_windows], windows[config.calibration_windows:]
        measure = sensitivity.KlProbe(ctx.reference, windows)  # first: an owned model may be the reference itself
        floats_needed = config.smoothing is not None or config.max_kl is not None
        in_place = model is not given and (restore is not None or not floats_needed)
        refloat = restore if in_place else None  # set when `model` loses its float weights to the codes
        start = time.perf_counter()
        quantized, qw = quantize_model(model, config, ctx.console, fit, in_place=in_place)
        seconds = {"quantize": time.perf_counter() - start}
        kl = measure(quantized)
        smoothing = None
        if config.smoothing is not None and (config.max_kl is None or kl > config.max_kl):
            # Smoothing is a candidate, kept only when its codes measure a lower KL: it rebalances weights that
            # carry folded norm gains, and moves weights that already sit on a grid off it. The unsmoothed
            # dequantized weights are dropped while the candidate is measured and rebuilt from the codes if it
            # loses; the candidate is smoothed in the stage's own model (floats restored) or in a copy of the
            # caller's, so at most two fp32 models live here (the caller's and the candidate), one when owned.
            del quantized
            start = time.perf_counter()
            smoothing, quantized, qw, kl, notes["smoothing"] = self._smoothed(model, qw, kl, config, ctx, fit,
                                                                             fit or windows, measure, refloat)
            seconds["smoothing"] = time.perf_counter() - start
        notes["kl_all_at_weight_bits"] = kl
        if config.max_kl is not None and kl > config.max_kl:
            start = time.perf_counter()
            tensors = dict(qw.tensors)
            # The search sets its trials in one model in place and hands it back holding the chosen codes: the
            # smoothed (or rotated) copy is the stage's own, so it becomes that model, no third fp32 copy.
            del quantized
            if refloat is not None:  # the stage's own model holds codes: its float weights again
                refloat(model)
            if smoothing is not None:  # its float weights, rebuilt bitwise from the scales (quantized in place)
                model = smoothing.apply(model, in_place=refloat is not None)
            mixed = sensitivity.promote_until(model, tensors, plans, config, measure, ctx.console, kl,
                                              work=None if model is given else model)
            seconds["mixed_precision"] = time.perf_counter() - start
            kl = mixed.kl
            quantized, qw = mixed.model, QuantizedWeights(tensors, config, tuple(mixed.promoted))
            notes.update(promoted_to_8bit=mixed.promoted, max_kl_reached=mixed.reached,
                         sensitivity_top=mixed.ranking[:10],
                         bits_vs_kl=[dataclasses.asdict(p) for p in mixed.frontier])
        total = len(linear_weights(quantized))
        notes.update(scheme=qw.scheme, kl_vs_unquantized=kl, max_kl=config.max_kl, **qw.bits_summary(),
                     linears_quantized=len(qw.tensors), linears_total=total, seconds=seconds,
                     calibration=_calibration_record(windows), fit=_calibration_record(fit) if fit else None)
        ctx.console.print(f"  quantized {len(qw.tensors)}/{total} linears, {notes.get('avg_code_bits')} code bits "
                          f"per weight, KL vs unquantized {kl:.4g} on {len(windows)} calibration windows")
        return StageResult(quantized, notes, qw)

    @staticmethod
    def _smoothed(model: Any, qw: QuantizedWeights, kl: float, config: QuantizeConfig, ctx: StageContext,
                  fit: list[list[int]], windows: list[list[int]], measure: Any,
                  refloat: Callable[[Any], None] | None) -> tuple[Any, Any, QuantizedWeights, float, dict]:
        """The smoothed candidate against the unsmoothed codes `qw` (KL `kl`): (the Smoothing when kept, else
        None; the kept codes' dequantized model; the codes; their KL; the notes). The scales come from the
        activations over `windows`, GPTQ fits on `fit`. With `refloat`, `model` is the stage's own and holds the
        unsmoothed codes: its float weights are restored and smoothed in place (no second fp32 copy), else a
        smoothed copy is made; either way the candidate is quantized in place."""
        from compress.stages.smoothing import smoothing_for

        if refloat is not None:
            refloat(model)
        with ctx.console.step(f"Smoothing the normed activations (alpha {config.smoothing})") as step:
            smoothing = smoothing_for(model, windows, config.smoothing)
            info: dict[str, Any] = dict(smoothing.info)
            step["detail"] = (f"largest channel / median {info['outlier_ratio_before']} -> "
                              f"{info['outlier_ratio_after']}")
        s_quantized, s_qw = quantize_model(smoothing.apply(model, in_place=refloat is not None), config,
                                           ctx.console, fit, in_place=True)
        s_kl = measure(s_quantized)
        info.update(kl_without=kl, kl_with=s_kl, kept=s_kl < kl)
        ctx.console.print(f"  smoothing: KL {kl:.4g} without, {s_kl:.4g} with: "
                          f"{'smoothed' if s_kl < kl else 'unsmoothed'} codes kept")
        if s_kl < kl:
            return smoothing, s_quantized, s_qw, s_kl, info
        del s_quantized, s_qw
        if refloat is not None:  # the unsmoothed codes' values, in the stage's own model again
            refloat(model)
            return None, load_codes(model, qw.tensors), qw, kl, info
        return None, apply(model, qw.tensors), qw, kl, info


def _calibration_record(windows: list[list[int]]) -> dict[str, Any]:
    digest = hashlib.sha256(str([list(w) for w in windows]).encode()).hexdigest()
    return {"split": "calibration (disjoint from the evaluation windows)", "windows": len(windows),
            "tokens": sum(len(w) for w in windows), "token_ids_sha256": digest}
