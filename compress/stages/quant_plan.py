"""The quantize stage's planning and quantizing helpers, shared by the stage and its sensitivity search.

`plan` decides every linear's (bits, group) from the config (overrides by glob on the export module's names,
first match wins; the lm_head from `lm_head`) and refuses, before any work, what cannot be done as asked.
`quantize_one` runs the configured algorithm (compress.stages.quant_algorithms) on one weight; `apply` returns
a copy of the model whose quantized weights hold their exact dequantized values, carrying the codes.
"""

from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass
from typing import Any

from compress.errors import InputError
from compress.quantized import BITS_OF, QuantAlgorithm, QuantizeConfig, QuantizedWeights, QuantTensor, rtn

AVAILABLE = (QuantAlgorithm.RTN, QuantAlgorithm.HQQ, QuantAlgorithm.GPTQ, QuantAlgorithm.KEEP_GGUF)
CALIBRATED = (QuantAlgorithm.GPTQ,)  # these fit the codes on calibration text


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
        return qa.hqq(w, p.bits, p.group, q.scale_bits, q.zero_point)
    # The lm_head is round to nearest even under HQQ: a tied embedding's gather (ONNX's GatherBlockQuantized,
    # ExecuTorch's quantized embedding) takes integer zero points only, and HQQ's are floats.
    return rtn(w, p.bits, p.group, q.symmetric)


def apply(model: Any, tensors: dict[str, QuantTensor]) -> Any:
    """A copy of `model` whose quantized weights hold their exact dequantized values (eager PyTorch then runs
    the quantized model)."""
    return load_codes(copy.deepcopy(model), tensors)


def load_codes(model: Any, tensors: dict[str, QuantTensor]) -> Any:
    """`model` itself (returned), its named weights overwritten in place with the tensors' dequantized values."""
    import torch

    weights = linear_weights(model)
    with torch.no_grad():
        for name, t in tensors.items():
            t.dequantize_into(weights[name])
    return model


def quantize_model(model: Any, q: QuantizeConfig, console: Any = None, fit: list[list[int]] | None = None,
                   in_place: bool = False) -> tuple[Any, QuantizedWeights]:
    """Every planned linear quantized with the configured algorithm: (dequantized copy, codes); with `in_place`,
    `model` itself holds the dequantized values (its float weights are gone). A calibrated algorithm fits the
    decoder's linears on the `fit` windows; the lm_head is rounded to nearest."""
    from compress.progress import Console

    console = console or Console(quiet=True)
    plans = plan(model, q)
    weights = linear_weights(model)
    tensors: dict[str, QuantTensor] = {}
    if q.algorithm in CALIBRATED:
        if not fit:
            raise InputError(f"quantize.algorithm {q.algorithm.value!r} fits the codes on calibration text and got "
                             f"none")
        from compress.stages.gptq import gptq_linears

        body = {p.name: (p.bits, p.group) for p in plans if p.name != "lm_head"}
        tensors.update(gptq_linears(model, fit, body, console, q.scale_bits, q.zero_point))
    rest = [p for p in plans if p.name not in tensors]
    for p in console.track(rest, f"Quantizing {len(rest)} linears ({q.algorithm.value})"):
        tensors[p.name] = quantize_one(weights[p.name], p, q)
    codes = QuantizedWeights({p.name: tensors[p.name] for p in plans}, q)
    return (load_codes(model, tensors) if in_place else apply(model, tensors)), codes
