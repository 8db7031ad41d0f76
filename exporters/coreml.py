"""Core ML `.mlpackage`: our export-friendly Llama traced and converted by coremltools, KV cache as states.

The package's one function is `main(tokens (1, q) int32, input_pos (1,) int32) -> logits (1, q, vocab)`
with q one of `query_lengths` (enumerated shapes: prefill chunks and decode, q = 1), and one fp16 state
per layer and cache (`layers_{i}_self_attn_{k,v}_cache`, (1, n_kv, max_context, head_dim)), updated in
place. It computes in fp16 (or fp32 on request) for iOS 18 / macOS 15, the first releases with states.
The quantize stage's codes, when a target has that stage, are lowered afterwards as they are
(exporters/coreml_codes.py: constexpr_blockwise_shift_scale); without it the weights stay fp16. The tied
embedding / lm_head pair is one shared compressed constant when both have the same precision, and two
deliberate copies otherwise. Coverage is a post-condition: a linear with codes left uncompressed fails the
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

from compress.artifact import Artifact, Availability, Dtype
from compress.config import check_fields, setting
from compress.errors import ExportError, InputError, Problem
from compress.hashing import files_under
from compress.quantized import BITS_OF, Activations, QuantizeConfig, QuantizedWeights
from compress.rope import STATIC_ROPE

PACKAGE = "model.mlpackage"
SIDECAR = "compress-mlpackage.json"
EMBEDDING = "embed_tokens"


class ComputeUnits(enum.StrEnum):
    ALL = "all"
    CPU_ONLY = "cpu_only"
    CPU_AND_GPU = "cpu_and_gpu"
    CPU_AND_NE = "cpu_and_ne"


@dataclass(frozen=True)
class MlpackageOptions:
    max_context: int = setting(512, ge=16, le=8192, doc="positions the Core ML states hold")
    compute_units: ComputeUnits = ComputeUnits.CPU_AND_NE
    minimum_deployment_target: str = setting("iOS18", choices=("iOS18", "macOS15"), doc="states need iOS18/macOS15")
    query_lengths: tuple[int, ...] = setting((1, 64), doc="the enumerated tokens-per-call shapes; 1 is decode")
    compute_precision: Dtype = setting(Dtype.FLOAT16, choices=(Dtype.FLOAT16, Dtype.FLOAT32))
    allow_unquantized_linears: bool = setting(False, doc="let the export succeed when a linear is not compressed")

    def __post_init__(self) -> None:
        extra = []
        if not self.query_lengths or 1 not in self.query_lengths:
            extra.append(Problem("query_lengths", f"{list(self.query_lengths)} must contain 1 (decode)"))
        if any(q < 1 or q > self.max_context for q in self.query_lengths):
            extra.append(Problem("query_lengths", f"{list(self.query_lengths)}: each must be in 1..max_context "
                                                  f"({self.max_context})"))
        if len(set(self.query_lengths)) > 16:
            extra.append(Problem("query_lengths", f"{len(set(self.query_lengths))} lengths; at most 16 (each is a "
                                                  f"shape Core ML specializes the model for)"))
        if self.compute_precision is Dtype.FLOAT32 and self.compute_units is ComputeUnits.CPU_AND_NE:
            extra.append(Problem("compute_precision", "float32 cannot run on the Neural Engine (fp16 only); use "
                                                      "float16, or compute_units cpu_only or cpu_and_gpu"))
        check_fields(self, extra)

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

        module = ExportLlama.from_hf(model, options.max_context, AttentionBackend.COREML, fp16_safe_norm=True)
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
        return Artifact(out_dir, self.format, files, main=PACKAGE, max_context=options.max_context,
                        vocab_size=module.dims.vocab_size, query_lengths=tuple(sidecar["query_lengths"]),
                        compute_units=options.compute_units.value,
                        record={"compute_precision": options.compute_precision.value, "coverage": notes,
                                "export_seconds": timings})

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


def _describe(mlmodel: Any, model: Any, dims: Any, options: MlpackageOptions, notes: dict[str, Any]) -> None:
    """What Xcode's model page shows: author, license, version, a short description (the source GGUF's own
    `general.*` where the checkpoint was converted from one), and a description of every input, output and state."""
    from compress import __version__

    card = source_card(model)
    lengths = sorted(set(options.query_lengths))
    weights = notes.get("quantization") or f"{options.compute_precision.value} weights"
    mlmodel.short_description = (f"{card.name}: a Llama causal LM ({dims.num_layers} layers, vocabulary "
                                 f"{dims.vocab_size}, a {options.max_context}-position KV cache as states); "
                                 f"{weights}; written by compress {__version__}")
    mlmodel.author = card.author
    mlmodel.license = card.license
    mlmodel.version = __version__
    mlmodel.input_description["tokens"] = (f"Token ids, shape (1, q), q in {lengths}: q = 1 decodes one token, "
                                           f"longer calls prefill a prompt in chunks")
    mlmodel.input_description["input_pos"] = "Cache position of the first of this call's tokens, shape (1,)"
    mlmodel.output_description["logits"] = "Next-token logits for each of the q positions, shape (1, q, vocabulary)"
    for state in mlmodel._spec.description.state:  # coremltools has no setter for states' descriptions
        layer, kind = state.name.split("_")[1], "keys" if state.name.endswith("k_cache") else "values"
        state.shortDescription = f"Layer {layer}'s cached {kind}, fp16 (1, kv heads, positions, head dim)"
    mlmodel.user_defined_metadata.update({"compress.max_context": str(options.max_context),
                                          "compress.query_lengths": ",".join(map(str, lengths)),
                                          "compress.eos_token_id": str(dims.eos_token_id)})


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
