"""Core ML `.mlpackage`: our export-friendly Llama traced and converted by coremltools, KV cache as states.

Two interfaces (`export.io`), both for iOS 18 / macOS 15, the first releases with states:
  - `apple_llama` (default), the convention of Apple's "On Device Llama 3.1 with Core ML" and of swift-transformers'
    `LanguageModelWithStatefulKVCache`: `main(inputIds (1, q) int32, causalMask (1, 1, q, end) fp16) -> logits
    (1, q, vocab)` with q and end ranged 1..max_context (RangeDim), and two fp16 states `keyCache` / `valueCache`
    (layers, 1, n_kv, max_context, head_dim). The call's first position is end - q (no position input); the
    program adds a causal mask of its own to the caller's, so an all-zero mask (swift-transformers sends
    (1, 1, 1, end) zeros) still attends causally, and reads only the first `end` cache slots.
  - `fixed_shape`: `main(tokens (1, q) int32, input_pos (1,) int32) -> logits (1, q, vocab)`, q one of
    `query_lengths` (enumerated shapes), one fp16 state per layer and cache (`layers_{i}_self_attn_{k,v}_cache`,
    (1, n_kv, max_context, head_dim)), attention over the whole static cache: fixed shapes, which the Neural
    Engine needs (it runs a ranged input at its default shape only).
It computes in fp16 (or fp32 on request). The quantize stage's codes, when a target has that stage, are lowered
afterwards as they are (exporters/coreml_codes.py: constexpr_blockwise_shift_scale); without it the weights stay
fp16. The tied embedding / lm_head pair is one shared compressed constant when both have the same precision, and
two deliberate copies otherwise. Coverage is a post-condition: a linear with codes left uncompressed fails the
export unless the target allows it.
The artifact is a directory: `model.mlpackage`, the tokenizer files and `compress-mlpackage.json`.
"""

from __future__ import annotations

import enum
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compress.exporters.base import atomic_dir, model_problems, source_card
from compress.exporters.coreml_codes import lower_codes
from compress.exporters.coreml_interface import converter_io, describe_io, interface_record, trace_example

from compress.artifact import Artifact, Availability, Dtype
from compress.config import check_fields, setting
from compress.coreml_io import HUB_NAME_KEY, LOGITS, CoreMLIO
from compress.errors import ExportError, InputError, Problem
from compress.hashing import files_under
from compress.quantized import BITS_OF, Activations, QuantizeConfig, QuantizedWeights
from compress.rope import STATIC_ROPE

PACKAGE = "model.mlpackage"
SIDECAR = "compress-mlpackage.json"
EMBEDDING = "embed_tokens"


FIXED_QUERY_LENGTHS = (1, 64)  # fixed_shape's default: decode and prefill chunks of 64


class ComputeUnits(enum.StrEnum):
    ALL = "all"
    CPU_ONLY = "cpu_only"
    CPU_AND_GPU = "cpu_and_gpu"
    CPU_AND_NE = "cpu_and_ne"


@dataclass(frozen=True)
class MlpackageOptions:
    max_context: int = setting(512, ge=16, le=8192, doc="positions the Core ML states hold")
    io: CoreMLIO = setting(CoreMLIO.APPLE_LLAMA, doc="apple_llama: the names and ranged shapes of Apple's Llama "
                                                     "example and swift-transformers; fixed_shape: enumerated "
                                                     "shapes the Neural Engine can run")
    compute_units: ComputeUnits = ComputeUnits.CPU_AND_GPU  # swift-transformers' default too
    minimum_deployment_target: str = setting("iOS18", choices=("iOS18", "macOS15"), doc="states need iOS18/macOS15")
    query_lengths: tuple[int, ...] = setting((), doc="fixed_shape only: the enumerated tokens-per-call shapes, 1 "
                                                     "is decode (default 1 and 64); apple_llama takes any 1..max_context")
    compute_precision: Dtype = setting(Dtype.FLOAT16, choices=(Dtype.FLOAT16, Dtype.FLOAT32))
    allow_unquantized_linears: bool = setting(False, doc="let the export succeed when a linear is not compressed")

    def __post_init__(self) -> None:
        extra = []
        if self.io is CoreMLIO.APPLE_LLAMA:
            if self.query_lengths:
                extra.append(Problem("query_lengths", f"{list(self.query_lengths)}: enumerated lengths are for io: "
                                                      f"fixed_shape; apple_llama takes any 1..max_context tokens"))
            if self.compute_units is ComputeUnits.CPU_AND_NE:
                extra.append(Problem("io", "apple_llama's ranged shapes run on the Neural Engine at their default "
                                           "shape only; use compute_units cpu_and_gpu, or io: fixed_shape"))
        elif 1 not in self.lengths:
            extra.append(Problem("query_lengths", f"{list(self.query_lengths)} must contain 1 (decode)"))
        if any(q < 1 or q > self.max_context for q in self.lengths):
            extra.append(Problem("query_lengths", f"{list(self.lengths)}: each must be in 1..max_context "
                                                  f"({self.max_context})"))
        if len(self.lengths) > 16:
            extra.append(Problem("query_lengths", f"{len(self.lengths)} lengths; at most 16 (each is a "
                                                  f"shape Core ML specializes the model for)"))
        if self.compute_precision is Dtype.FLOAT32 and self.compute_units is ComputeUnits.CPU_AND_NE:
            extra.append(Problem("compute_precision", "float32 cannot run on the Neural Engine (fp16 only); use "
                                                      "float16, or compute_units cpu_only or cpu_and_gpu"))
        check_fields(self, extra)

    @property
    def lengths(self) -> tuple[int, ...]:
        """fixed_shape's enumerated query lengths, sorted (apple_llama: none, every length is allowed)."""
        if self.io is CoreMLIO.APPLE_LLAMA:
            return ()
        return tuple(sorted(set(self.query_lengths or FIXED_QUERY_LENGTHS)))

    def codes_problems(self, q: QuantizeConfig) -> list[Problem]:
        """Core ML holds affine codes as constexpr_blockwise_shift_scale (exporters/coreml_codes.py) and computes
        with fp16 activations; the Neural Engine wants one scale per output channel."""
        out = []
        if q.activations is not Activations.NONE:
            out.append(Problem("quantize.activations", f"{q.activations.value!r} is not supported for mlpackage "
                                                       f"(fp16 activations, weight-only codes); use 'none'"))
        if self.compute_units is ComputeUnits.CPU_AND_NE and q.group_size is not None:
            out.append(Problem("quantize.group_size", f"{q.group_size}: per-block scales do not run on the Neural "
                                                      f"Engine (compute_units: cpu_and_ne), which wants per-channel "
                                                      f"scales; use group_size: null or compute_units: cpu_and_gpu"))
        return out

    def model_problems(self, config: Any, q: QuantizeConfig | None) -> list[Problem]:
        """What of the model (its HF config) this format cannot hold: checked before any work."""
        return model_problems(config, self.max_context, STATIC_ROPE, "the mlpackage exporter")


class CoreMLExporter:
    format = "mlpackage"  # targets.yaml's export.format
    options = MlpackageOptions
    runtimes = ("coreml",)  # the runtimes that run this format
    artifact_name = "coreml"  # its name in the build directory
    version = "1"

    def availability(self) -> Availability:
        if importlib.util.find_spec("coremltools") is None:
            return Availability(False, "coremltools is not installed; pip install 'compress[coreml]'")
        return Availability(True)

    def export(self, model: Any, tokenizer: Any, options: MlpackageOptions, out_dir: Path,
               console: Any,
               quantized: QuantizedWeights | None = None) -> Artifact:
        limit = model.config.max_position_embeddings
        if options.max_context > limit:
            raise InputError(f"export.max_context {options.max_context} exceeds the model's "
                             f"max_position_embeddings {limit}")
        from compress.exporters.llama import AttentionBackend, ExportLlama  # torch: loaded when exporting

        backend = AttentionBackend.COREML_STACKED if options.io is CoreMLIO.APPLE_LLAMA else AttentionBackend.COREML
        module = ExportLlama.from_hf(model, options.max_context, backend, fp16_safe_norm=True)
        codes = quantized
        q = codes.export_config() if codes is not None else None
        if q is not None and q.activations is not Activations.NONE:
            raise InputError(f"the quantize stage set activations: {q.activations.value}; Core ML programs compute "
                             f"with fp16 activations (no dynamic int8): set activations: none in the stage")
        tied = bool(model.config.tie_word_embeddings)
        # Tied and stored alike (both fp16, or both int8...): one constant serves the gather and the lm_head.
        share = tied and (q is None or BITS_OF[q.embedding] == BITS_OF[q.lm_head])
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
            notes = {**_coverage(mlmodel, linear_ops, codes, tied, share), **lowering}
            if codes is not None:
                notes["quantization"] = f"quantize stage ({codes.config.algorithm}): int{q.weight_bits} " \
                                        f"per-block {q.group_size}, codes lowered as they are"
            _describe(mlmodel, model, module.dims, options, notes)
            with console.step("Saving the package") as step:
                mlmodel.save(str(tmp / PACKAGE))
            timings["save"] = step["seconds"]
            tokenizer.save_pretrained(tmp)
            dims = module.dims
            sidecar = {"max_context": options.max_context, "io": options.io.value,
                       "query_lengths": list(options.lengths), "vocab_size": dims.vocab_size,
                       "bos_id": dims.bos_token_id,
                       "eos_ids": sorted({int(i) for i in (dims.eos_token_id, tokenizer.eos_token_id) if i is not None}),
                       **interface_record(options.io, module, options.compute_precision.value),
                       "compute_units": options.compute_units.value,
                       "compute_precision": options.compute_precision.value,
                       "minimum_deployment_target": options.minimum_deployment_target,
                       "coverage": notes, "export_seconds": timings}
            (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=2))
            _check_coverage(notes, options)
        files = tuple(str(p) for p in files_under(out_dir))
        return Artifact(out_dir, self.format, files, main=PACKAGE, max_context=options.max_context,
                        vocab_size=module.dims.vocab_size, query_lengths=tuple(sidecar["query_lengths"]),
                        compute_units=options.compute_units.value,
                        record={"compute_precision": options.compute_precision.value, "coverage": notes,
                                "export_seconds": timings})

    @staticmethod
    def _convert(module: Any, options: MlpackageOptions, dedup: bool, timings: dict[str, float],
                 console: Any) -> Any:
        import coremltools as ct
        import torch

        example = trace_example(options.io, options.lengths)
        with console.step("Tracing the export module") as step, torch.no_grad():
            traced = torch.jit.trace(module, example, check_trace=False)
        timings["trace"] = step["seconds"]
        module.reset_cache()  # the trace ran the module once; its buffers become the states' initial values
        inputs, states, detail = converter_io(options.io, module, options.max_context, options.lengths)
        pipeline = ct.PassPipeline.DEFAULT
        if not dedup:  # keep the untied copies apart: the embedding and lm_head are compressed differently
            pipeline.remove_passes(["common::const_deduplication"])
        precision = {Dtype.FLOAT16: ct.precision.FLOAT16, Dtype.FLOAT32: ct.precision.FLOAT32}
        with console.step("Converting with coremltools") as step:
            mlmodel = ct.convert(
                traced, inputs=inputs, outputs=[ct.TensorType(LOGITS)], states=states,
                minimum_deployment_target=getattr(ct.target, options.minimum_deployment_target),
                compute_precision=precision[options.compute_precision], compute_units=_compute_unit(options),
                pass_pipeline=pipeline, skip_model_load=True)  # loading needs macOS; the runtime loads it there
            step["detail"] = detail
        timings["convert"] = step["seconds"]
        return mlmodel


def _describe(mlmodel: Any, model: Any, dims: Any, options: MlpackageOptions, notes: dict[str, Any]) -> None:
    """What Xcode's model page shows: author, license, version, a short description (the source GGUF's own
    `general.*` where the checkpoint was converted from one), and a description of every input, output and state."""
    from compress import __version__

    card = source_card(model)
    weights = notes.get("quantization") or f"{options.compute_precision.value} weights"
    mlmodel.short_description = (f"{card.name}: a Llama causal LM ({dims.num_layers} layers, vocabulary "
                                 f"{dims.vocab_size}, a {options.max_context}-position KV cache as states); "
                                 f"{weights}; written by compress {__version__}")
    mlmodel.author = card.author
    mlmodel.license = card.license
    mlmodel.version = __version__
    describe_io(mlmodel, options.io, options.max_context, options.lengths)
    metadata = {"compress.max_context": str(options.max_context), "compress.io": options.io.value,
                "compress.eos_token_id": str(dims.eos_token_id)}
    if options.lengths:
        metadata["compress.query_lengths"] = ",".join(map(str, options.lengths))
    if card.hub_id:  # swift-transformers fetches config and tokenizer by it when the app passes no tokenizer
        metadata[HUB_NAME_KEY] = card.hub_id
    mlmodel.user_defined_metadata.update(metadata)


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


def _const_name(module_name: str) -> str:
    """The name coremltools gives a module's weight constant (after the fp16 cast, when there is one)."""
    return module_name.replace(".", "_") + "_weight"


def _weight_consts(mlmodel: Any) -> dict[str, str]:
    """Module-style weight name -> name of the const op that holds it in the program. (`_mil_program` is the
    only handle coremltools gives on a converted model's program; its own optimize passes read it too.)"""
    out = {}
    for op in mlmodel._mil_program.functions["main"].operations:
        if op.op_type == "const" and op.name.endswith(("_weight", "_weight_to_fp16")):
            out[op.name.removesuffix("_to_fp16")] = op.name
    return out


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


def _coverage(mlmodel: Any, linear_ops: dict[str, str], codes: Any, tied: bool, shared: bool) -> dict[str, Any]:
    """What the saved program really holds: each model linear's weight is compressed iff a constexpr makes it."""
    ops = {op.name: op for op in mlmodel._mil_program.functions["main"].operations}
    compressed = sorted(name for op_name, name in linear_ops.items()
                        if op_name in ops and ops[op_name].weight.op.op_type.startswith("constexpr_"))
    coded = set(codes.tensors) if codes is not None else set()
    wanted = {_const_name(name).removesuffix("_weight") for name in coded}
    gathers = [op for op in ops.values() if op.op_type == "gather" and op.x.op is not None
               and op.x.op.op_type.startswith("constexpr_")]
    q = codes.export_config() if codes is not None else None
    return {"quantization": "none (fp16 weights)", "tied_embeddings": tied,
            "tied_storage": ("one shared compressed copy" if shared else "two copies") if tied else "untied",
            "embedding": q.embedding.value if q else "fp16", "lm_head": q.lm_head.value if q else "fp16",
            "embedding_compressed": bool(gathers),
            "linears_compressed_names": compressed,
            "linears_not_compressed": sorted(wanted - set(compressed)),
            "linears_total": len(linear_ops), "linears_quantized": len(compressed),
            "linears_fp32_by_request": len(set(linear_ops.values()) - coded), "linears_skipped": []}


def _check_coverage(notes: dict[str, Any], options: MlpackageOptions) -> None:
    missing = notes["linears_not_compressed"]
    if missing and not options.allow_unquantized_linears:
        raise ExportError(f"{len(missing)} linears the config compresses were left uncompressed by coremltools "
                          f"({missing[0]}, ...); set export.allow_unquantized_linears: true to accept")
