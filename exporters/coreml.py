"""Core ML `.mlpackage`: our export-friendly Llama traced and converted by coremltools, KV cache as states.

The package's one function is `main(tokens (1, q) int32, input_pos (1,) int32) -> logits (1, q, vocab)`
with q one of `query_lengths` (enumerated shapes: prefill chunks and decode, q = 1), and one fp16 state
per layer and cache (`layers_{i}_self_attn_{k,v}_cache`, (1, n_kv, max_context, head_dim)), updated in
place. It computes in fp16 (or fp32 on request) for iOS 18 / macOS 15, the first releases with states.
Weights are compressed afterwards by coremltools.optimize: int8/int4 linear quantization (per channel
or per block) or k-means palettization (per grouped channel). The tied embedding / lm_head pair is one
shared compressed constant when both ask for the same precision, and two deliberate copies otherwise.
Coverage is a post-condition: a linear left uncompressed fails the export unless the target allows it.
The artifact is a directory: `model.mlpackage`, the tokenizer files and `compress-mlpackage.json`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path
from typing import Any

from compress.artifact import Artifact
from compress.errors import ExportError, InputError
from compress.export_options import ComputeUnits, Dtype, MlpackageOptions
from compress.hashing import files_under
from compress.stages.configs import Activations, QuantizeConfig, WeightFormat
from compress.targets import Format
from compress.stages.qtensor import quantized_weights
from exporters.base import atomic_dir
from exporters.coreml_codes import lower_codes
from exporters.llama import AttentionBackend, ExportLlama
from exporters.torchao_quant import BITS, LinearPlan, check_plan, coverage, plan_linears
from runtimes.base import Availability

PACKAGE = "model.mlpackage"
SIDECAR = "compress-mlpackage.json"
EMBEDDING = "embed_tokens"


class CoreMLExporter:
    version = "1"

    def availability(self) -> Availability:
        if importlib.util.find_spec("coremltools") is None:
            return Availability(False, "coremltools is not installed; pip install 'compress[coreml]'")
        return Availability(True)

    def export(self, model: Any, tokenizer: Any, options: MlpackageOptions, out_dir: Path,
               console: Any) -> Artifact:
        limit = model.config.max_position_embeddings
        if options.max_context > limit:
            raise InputError(f"export.max_context {options.max_context} exceeds the model's "
                             f"max_position_embeddings {limit}")
        module = ExportLlama.from_hf(model, options.max_context, AttentionBackend.COREML, fp16_safe_norm=True)
        codes = quantized_weights(model)
        if codes is not None and options.quantize is not None:
            raise InputError("export.quantize would quantize the quantize stage's output again; remove it (the "
                             "stage's codes are lowered as they are)")
        if codes is not None and codes.export_config().activations is not Activations.NONE:
            raise InputError(f"the quantize stage set activations: {codes.export_config().activations.value}; Core ML "
                             f"programs compute with fp16 activations (no dynamic int8): set activations: none in the "
                             f"stage")
        # With the stage's codes, its scheme decides the layout (which constants exist, shared or not).
        q = options.quantize if codes is None else codes.export_config()
        plans = _plan(module, q) if q is not None else []
        if codes is not None:
            plans = [dataclasses.replace(p, bits=codes.tensors[p.name].bits, group_size=codes.tensors[p.name].group,
                                         skipped="") if p.name in codes.tensors else dataclasses.replace(p, bits=None)
                     for p in plans]
        check_plan(plans, options.allow_unquantized_linears)  # before the slow conversion
        tied = bool(model.config.tie_word_embeddings)
        # Tied and stored alike (both fp16, or both int8...): one constant serves the gather and the lm_head.
        share = tied and (q is None or BITS[q.embedding] == BITS[q.lm_head])
        timings: dict[str, float] = {}
        with atomic_dir(out_dir) as tmp:
            mlmodel = self._convert(module, options, dedup=share or not tied, timings=timings, console=console)
            linear_ops = _linear_ops(mlmodel)
            lowering = {}
            if codes is not None:
                with console.step("Lowering the quantize stage's codes (constexpr_blockwise_shift_scale)") as step:
                    mlmodel, lowering = lower_codes(mlmodel, _codes_by_const(mlmodel, codes, share))
                    step["detail"] = f"{lowering['with_integer_offsets']} with integer offsets, " \
                                     f"{lowering['with_float_offsets']} with float offsets"
                timings["lower_codes"] = step["seconds"]
            elif q is not None:
                with console.step("Compressing weights (coremltools.optimize)") as step:
                    mlmodel = _compress(mlmodel, q, plans)
                    step["detail"] = _scheme_name(q)
                timings["compress"] = step["seconds"]
            notes = {**_coverage(mlmodel, linear_ops, plans, q, tied, share), **lowering}
            if codes is not None:
                notes["quantization"] = f"quantize stage ({codes.scheme.get('algorithm')}): int{q.weight_bits} " \
                                        f"per-block {q.group_size}, codes lowered as they are"
            with console.step("Saving the package") as step:
                mlmodel.save(str(tmp / PACKAGE))
            timings["save"] = step["seconds"]
            tokenizer.save_pretrained(tmp)
            dims = module.dims
            sidecar = {"max_context": options.max_context, "query_lengths": sorted(set(options.query_lengths)),
                       "vocab_size": dims.vocab_size, "bos_id": dims.bos_token_id,
                       "eos_ids": sorted({int(i) for i in (dims.eos_token_id, tokenizer.eos_token_id) if i is not None}),
                       "inputs": {"tokens": "(1, q) int32", "input_pos": "(1,) int32"},
                       "outputs": {"logits": "(1, q, vocab) " + options.compute_precision.value},
                       "states": _state_names(module), "compute_units": options.compute_units.value,
                       "compute_precision": options.compute_precision.value,
                       "minimum_deployment_target": options.minimum_deployment_target,
                       "coverage": notes, "export_seconds": timings}
            (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=2))
            _check_coverage(notes, options)
        files = tuple(str(p) for p in files_under(out_dir))
        return Artifact(out_dir, Format.MLPACKAGE, files, {
            "max_context": options.max_context, "program": PACKAGE, "query_lengths": sidecar["query_lengths"],
            "vocab_size": module.dims.vocab_size,
            "compute_units": options.compute_units.value, "compute_precision": options.compute_precision.value,
            "coverage": notes, "export_seconds": timings})

    @staticmethod
    def _convert(module: Any, options: MlpackageOptions, dedup: bool, timings: dict[str, float],
                 console: Any) -> Any:
        import coremltools as ct
        import numpy as np
        import torch

        lengths = sorted(set(options.query_lengths))
        example = (torch.zeros(1, lengths[-1], dtype=torch.int32), torch.zeros(1, dtype=torch.int32))
        with console.step("Tracing the export module") as step, torch.no_grad():
            traced = torch.jit.trace(module, example, check_trace=False)
        timings["trace"] = step["seconds"]
        module.reset_cache()  # the trace ran the module once; its buffers become the states' initial values
        shape = (ct.EnumeratedShapes(shapes=[[1, n] for n in lengths], default=[1, lengths[-1]])
                 if len(lengths) > 1 else (1, lengths[0]))
        states = [ct.StateType(wrapped_type=ct.TensorType(shape=tuple(buf.shape), dtype=np.float16), name=name)
                  for name, buf in module.named_buffers() if name.endswith("_cache")]
        pipeline = ct.PassPipeline.DEFAULT
        if not dedup:  # keep the untied copies apart: the embedding and lm_head are compressed differently
            pipeline.remove_passes(["common::const_deduplication"])
        precision = {Dtype.FLOAT16: ct.precision.FLOAT16, Dtype.FLOAT32: ct.precision.FLOAT32}
        with console.step("Converting with coremltools") as step:
            mlmodel = ct.convert(
                traced, inputs=[ct.TensorType("tokens", shape=shape, dtype=np.int32),
                                ct.TensorType("input_pos", shape=(1,), dtype=np.int32)],
                outputs=[ct.TensorType("logits")], states=states,
                minimum_deployment_target=getattr(ct.target, options.minimum_deployment_target),
                compute_precision=precision[options.compute_precision], compute_units=_compute_unit(options),
                pass_pipeline=pipeline, skip_model_load=True)  # loading needs macOS; the runtime loads it there
            step["detail"] = f"query lengths {lengths}, {len(states)} states"
        timings["convert"] = step["seconds"]
        return mlmodel


def _codes_by_const(mlmodel: Any, codes: Any, share: bool) -> dict[str, Any]:
    """Weight const op name -> the stage's codes for it (the tied lm_head's codes go to the shared constant)."""
    consts = _weight_consts(mlmodel)
    out = {}
    for name, t in codes.tensors.items():
        const = _const_name(EMBEDDING if name == "lm_head" and share else name)
        if const in consts:
            out[consts[const]] = t
    return out


def _compute_unit(options: MlpackageOptions) -> Any:
    import coremltools as ct

    return {ComputeUnits.ALL: ct.ComputeUnit.ALL, ComputeUnits.CPU_ONLY: ct.ComputeUnit.CPU_ONLY,
            ComputeUnits.CPU_AND_GPU: ct.ComputeUnit.CPU_AND_GPU,
            ComputeUnits.CPU_AND_NE: ct.ComputeUnit.CPU_AND_NE}[options.compute_units]


def _state_names(module: Any) -> list[str]:
    return [name.replace(".", "_") for name, _ in module.named_buffers() if name.endswith("_cache")]


def _const_name(module_name: str) -> str:
    """The name coremltools gives a module's weight constant (after the fp16 cast, when there is one)."""
    return module_name.replace(".", "_") + "_weight"


def _palettized(q: QuantizeConfig, plan: LinearPlan) -> bool:
    """Palettization applies to the linears at weight_bits; an lm_head at another precision stays affine."""
    return q.weight_format is WeightFormat.PALETTIZED and plan.bits == q.weight_bits


def _plan(module: Any, q: QuantizeConfig) -> list[LinearPlan]:
    """Per linear: bits and group. Palettization groups output channels (rows) rather than input blocks."""
    if q.weight_format is WeightFormat.AFFINE:
        return plan_linears(module, q)
    rows = {name: mod.out_features for name, mod in module.named_modules() if hasattr(mod, "out_features")}
    plans = []
    for p in plan_linears(module, dataclasses.replace(q, group_size=None)):
        if not _palettized(q, p):
            plans.append(p)
            continue
        group = q.group_size
        skipped = f"out_features {rows[p.name]} is not a multiple of group_size {group}" \
            if group is not None and rows[p.name] % group else ""
        plans.append(dataclasses.replace(p, group_size=group, skipped=skipped))
    return plans


def _op_config(q: QuantizeConfig, bits: int, group: int | None, palettize: bool) -> Any:
    import coremltools.optimize as cto

    if palettize:
        granularity = "per_grouped_channel" if group else "per_tensor"
        # One k-means worker: coremltools' worker pool forks, and forked workers hung here (0 CPU, minutes)
        # after torch and BLAS had started their threads.
        return cto.coreml.OpPalettizerConfig(mode="kmeans", nbits=bits, granularity=granularity,
                                             group_size=group or 32, weight_threshold=0)
    mode = "linear_symmetric" if q.symmetric else "linear"
    if group:
        return cto.coreml.OpLinearQuantizerConfig(mode=mode, dtype=f"int{bits}", granularity="per_block",
                                                  block_size=group, weight_threshold=0)
    return cto.coreml.OpLinearQuantizerConfig(mode=mode, dtype=f"int{bits}", granularity="per_channel",
                                              weight_threshold=0)


def _weight_consts(mlmodel: Any) -> dict[str, str]:
    """Module-style weight name -> name of the const op that holds it in the program. (`_mil_program` is the
    only handle coremltools gives on a converted model's program; its own optimize passes read it too.)"""
    out = {}
    for op in mlmodel._mil_program.functions["main"].operations:
        if op.op_type == "const" and op.name.endswith(("_weight", "_weight_to_fp16")):
            out[op.name.removesuffix("_to_fp16")] = op.name
    return out


def _compress(mlmodel: Any, q: QuantizeConfig, plans: list[LinearPlan]) -> Any:
    """One coremltools.optimize pass per weight format, each configured by weight-constant name only."""
    import coremltools.optimize as cto

    consts = _weight_consts(mlmodel)
    palette: dict[str, Any] = {}
    affine: dict[str, Any] = {}
    for p in plans:
        if p.quantized and _const_name(p.name) in consts:
            target = palette if _palettized(q, p) else affine
            target[consts[_const_name(p.name)]] = _op_config(q, p.bits, p.group_size, target is palette)
    # The embedding (a gather) is always linearly quantized: per row (int8) or per block (int4). When the tied
    # lm_head shares its constant (same precision), this one config compresses both.
    bits = BITS[q.embedding]
    embed_const = consts.get(_const_name(EMBEDDING))
    if bits is not None and embed_const is not None:
        affine[embed_const] = _op_config(q, bits, (q.group_size or 32) if bits == 4 else None, False)
    if palette:
        mlmodel = cto.coreml.palettize_weights(mlmodel, cto.coreml.OptimizationConfig(op_name_configs=palette))
    if affine:
        mlmodel = cto.coreml.linear_quantize_weights(mlmodel, cto.coreml.OptimizationConfig(op_name_configs=affine))
    return mlmodel


def _linear_ops(mlmodel: Any) -> dict[str, str]:
    """Linear op name -> module name, for the model's own linears (not RMSNorm's mean row or RoPE's rotation)."""
    consts = {v: k for k, v in _weight_consts(mlmodel).items()}
    out = {}
    for op in mlmodel._mil_program.functions["main"].operations:
        if op.op_type == "linear" and op.weight.op is not None and op.weight.op.name in consts:
            name = consts[op.weight.op.name].removesuffix("_weight")
            if name == EMBEDDING:  # the lm_head reads the tied embedding's one deduplicated constant
                name = "lm_head"
            if name.endswith(("_proj", "lm_head")):
                out[op.name] = name
    return out


def _coverage(mlmodel: Any, linear_ops: dict[str, str], plans: list[LinearPlan], q: QuantizeConfig | None,
              tied: bool, shared: bool) -> dict[str, Any]:
    """What the saved program really holds: each model linear's weight is compressed iff a constexpr makes it."""
    ops = {op.name: op for op in mlmodel._mil_program.functions["main"].operations}
    compressed = sorted(name for op_name, name in linear_ops.items()
                        if op_name in ops and ops[op_name].weight.op.op_type.startswith("constexpr_"))
    wanted = {_const_name(p.name).removesuffix("_weight") for p in plans if p.quantized}
    gathers = [op for op in ops.values() if op.op_type == "gather" and op.x.op is not None
               and op.x.op.op_type.startswith("constexpr_")]
    notes: dict[str, Any] = {"quantization": _scheme_name(q) if q else "none (fp16 weights)",
                             "tied_embeddings": tied,
                             "tied_storage": ("one shared compressed copy" if shared else "two copies")
                             if tied else "untied",
                             "embedding": q.embedding.value if q else "fp16", "lm_head": q.lm_head.value if q else "fp16",
                             "embedding_compressed": bool(gathers),
                             "linears_compressed_names": compressed,
                             "linears_not_compressed": sorted(wanted - set(compressed))}
    notes.update(coverage(plans) if plans else {"linears_total": len(linear_ops), "linears_quantized": 0,
                                                "linears_fp32_by_request": len(linear_ops), "linears_skipped": []})
    notes["linears_quantized"] = len(compressed)
    notes["linears_total"] = len(linear_ops)
    return notes


def _check_coverage(notes: dict[str, Any], options: MlpackageOptions) -> None:
    missing = notes["linears_not_compressed"]
    if missing and not options.allow_unquantized_linears:
        raise ExportError(f"{len(missing)} linears the config compresses were left uncompressed by coremltools "
                          f"({missing[0]}, ...); set export.allow_unquantized_linears: true to accept")


def _scheme_name(q: QuantizeConfig) -> str:
    if q.weight_format is WeightFormat.PALETTIZED:
        lut = f"a LUT per {q.group_size} rows" if q.group_size else "one LUT per tensor"
        return f"{q.weight_bits}-bit palettized (k-means, {lut})"
    group = f"per-block {q.group_size}" if q.group_size else "per-channel"
    return f"int{q.weight_bits} {group} ({'symmetric' if q.symmetric else 'asymmetric'})"

