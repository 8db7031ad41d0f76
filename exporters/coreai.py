"""Core AI `.aimodel` (Apple's format for iOS/macOS 27): our export-friendly Llama through `torch.export` and
coreai-torch's converter, its KV cache as Core AI states.

The asset's one function is `main(tokens (1, q) int32, input_pos (1,) int32) -> logits (1, q, vocab)` with q
dynamic in 1..max_context (one function for prefill and decode), and two fp16 states per layer,
`layers_{i}_{k,v}_cache` of shape (max_context, kv_heads, head_dim), written in place at the call's positions.
Weights and arithmetic are fp16 (`compute_precision: float16`, the default: what Apple's accelerators run) or
fp32. Apple's Linux interpreter runs the fp16 asset far slower than the fp32 one (measured on SmolLM2-135M:
175 s for a 32-token prefill against 6.8 s for a 128-token prefill at fp32), so the shipped `ios-coreai` target
verifies the fp32 asset; an fp32 cast of fp16-stored weights is folded back into fp32 constants by the
conversion, so fp16 storage with fp32 arithmetic is not offered.
The quantize stage's codes, when a target has that stage, go in as Core AI's compressed weights
(exporters/coreai_codes.py: `constexpr_blockwise_shift_scale` over uint4/uint8 codes, w = codes * scale + offset
as the stage wrote them); a tied embedding gathers rows of the lm_head's compressed matrix (one stored copy).
The asset's metadata.json carries author, license and a description (the source GGUF's `general.*` where the
checkpoint came from one) and, as custom entries, compress's version, the context, the end-of-sequence id and a
description of every input, output and state; it is written for `minimum_os` v27, the only release coreai-core
writes.
The artifact is a directory: `model.aimodel`, the tokenizer files and `compress-aimodel.json`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compress.exporters.base import atomic_dir, model_problems, source_card

from compress.artifact import AppleComputeUnit, Artifact, Availability, CacheShape, Dtype
from compress.config import check_fields, setting
from compress.errors import InputError, Problem
from compress.hashing import files_under
from compress.quantized import Activations, QuantizeConfig, QuantizedWeights
from compress.rope import STATIC_ROPE

ASSET = "model.aimodel"
SIDECAR = "compress-aimodel.json"
FUNCTION = "main"


def state_names(num_layers: int) -> list[str]:
    """The states in the order the converter lists the module's buffers (layer by layer, key then value)."""
    return [f"layers_{i}_{kind}_cache" for i in range(num_layers) for kind in ("k", "v")]


@dataclass(frozen=True)
class AimodelOptions:
    max_context: int = setting(512, ge=16, le=8192, doc="positions the Core AI states hold")
    compute_precision: Dtype = setting(Dtype.FLOAT16, choices=(Dtype.FLOAT16, Dtype.FLOAT32), doc="weights, math")
    compute_unit: AppleComputeUnit = setting(AppleComputeUnit.DEFAULT, doc="the compute unit the asset is specialized for "
                                                                 "when it loads on an Apple device")
    minimum_os: str = setting("v27", choices=("v27",), doc="the OS release the asset is written for (iOS/macOS 27); "
                                                           "coreai-core writes no other")

    def __post_init__(self) -> None:
        check_fields(self)

    def codes_problems(self, q: QuantizeConfig) -> list[Problem]:
        """Core AI holds affine weight codes (exporters/coreai_codes.py); activations stay float."""
        if q.activations is not Activations.NONE:
            return [Problem("quantize.activations", f"{q.activations.value!r} is not supported for aimodel (float "
                                                    f"activations, weight-only codes); use 'none'")]
        return []

    def model_problems(self, config: Any, q: QuantizeConfig | None) -> list[Problem]:
        """What of the model (its HF config) this format cannot hold: checked before any work."""
        return model_problems(config, self.max_context, STATIC_ROPE, "the aimodel exporter")


class CoreAIExporter:
    format = "aimodel"  # targets.yaml's export.format
    options = AimodelOptions
    runtimes = ("coreai",)  # the runtimes that run this format
    artifact_name = "coreai"  # its name in the build directory
    version = "4"

    def availability(self) -> Availability:
        missing = [pkg for mod, pkg in (("coreai_torch", "coreai-torch"), ("coreai", "coreai-core"))
                   if importlib.util.find_spec(mod) is None]
        if missing:
            return Availability(False, f"{', '.join(missing)} not installed; pip install 'compress[coreai]'")
        return Availability(True)

    def export(self, model: Any, tokenizer: Any, options: AimodelOptions, out_dir: Path, console: Any,
               quantized: QuantizedWeights | None = None) -> Artifact:
        q = quantized.export_config() if quantized is not None else None
        if problems := (options.codes_problems(q) if q is not None else []) + options.model_problems(model.config, q):
            raise InputError(str(problems[0]))
        import torch  # loaded when exporting
        from compress.exporters.coreai_codes import place_codes
        from compress.exporters.llama import AttentionBackend, ExportLlama

        module = ExportLlama.from_hf(model, options.max_context, AttentionBackend.COREAI, fp16_safe_norm=True)
        if options.compute_precision is Dtype.FLOAT16:
            module = module.half()
        dims = module.dims
        coverage: dict[str, Any] = {"quantization": f"none ({options.compute_precision.value} weights)"}
        if quantized is not None:
            dtype = torch.float16 if options.compute_precision is Dtype.FLOAT16 else torch.float32
            coverage = place_codes(module, quantized, bool(model.config.tie_word_embeddings), dtype)
            coverage["quantization"] = f"quantize stage ({quantized.config.algorithm}): int{q.weight_bits} " \
                                       f"per-block {q.group_size}, codes placed as they are"
        timings: dict[str, float] = {}
        with atomic_dir(out_dir) as tmp:
            program = _convert(module, options, timings, console)
            from coreai.authoring import OSVersion

            with console.step("Saving the asset") as step:
                asset = program.save_asset(tmp / ASSET, minimum_os=OSVersion(options.minimum_os))
                io_ = _io_descriptions(dims, options)
                asset.update_metadata(lambda m: _describe(m, model, dims, options, coverage, io_))
            timings["save"] = step["seconds"]
            tokenizer.save_pretrained(tmp)
            sidecar = {"function": FUNCTION, "max_context": options.max_context, "vocab_size": dims.vocab_size,
                       **io_, "compute_precision": options.compute_precision.value,
                       "minimum_os": options.minimum_os, "coverage": coverage, "export_seconds": timings}
            (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=2))
        files = tuple(str(p) for p in files_under(out_dir))
        return Artifact(out_dir, self.format, files, main=ASSET, max_context=options.max_context,
                        vocab_size=dims.vocab_size, cache=CacheShape(dims.num_layers, dims.num_kv_heads, dims.head_dim),
                        compute_units=options.compute_unit.value,
                        record={"compute_precision": options.compute_precision.value, "coverage": coverage,
                                "export_seconds": timings})


def _io_descriptions(dims: Any, options: AimodelOptions) -> dict[str, dict[str, str]]:
    """Every input, output and state of `main`, with its shape and meaning (the sidecar and the asset's metadata)."""
    precision = options.compute_precision.value
    states = {f"layers_{i}_{kind}_cache": f"layer {i}'s cached {'keys' if kind == 'k' else 'values'}, float16 "
                                          f"({options.max_context} positions, {dims.num_kv_heads} kv heads, "
                                          f"{dims.head_dim} head dim), written in place at the call's positions"
              for i in range(dims.num_layers) for kind in ("k", "v")}
    return {"inputs": {"tokens": "token ids, (1, q) int32, q in 1..max_context: q = 1 decodes one token, longer "
                                 "calls prefill",
                       "input_pos": "cache position of the first of this call's tokens, (1,) int32"},
            "outputs": {"logits": f"next-token logits for each of the q positions, (1, q, vocab) {precision}"},
            "states": states}


def _describe(metadata: Any, model: Any, dims: Any, options: AimodelOptions, coverage: dict[str, Any],
              io_: dict[str, dict[str, str]]) -> None:
    """The asset's metadata.json: author, license, a description, and compress's facts as custom entries."""
    from compress import __version__

    card = source_card(model)
    metadata.author = card.author
    metadata.license = card.license
    metadata.model_description = (f"{card.name}: a Llama causal LM ({dims.num_layers} layers, vocabulary "
                                  f"{dims.vocab_size}, a {options.max_context}-position KV cache as states); "
                                  f"{coverage['quantization']}; written by compress {__version__}")
    for key, value in {"version": __version__, "function": FUNCTION, "max_context": options.max_context,
                       "eos_token_id": dims.eos_token_id, "compute_precision": options.compute_precision.value,
                       **io_}.items():
        if value is not None:
            metadata.set_custom(f"compress.{key}", value)


def _convert(module: Any, options: AimodelOptions, timings: dict[str, float], console: Any) -> Any:
    """torch.export with a dynamic query length, coreai-torch's decompositions, then its converter."""
    import coreai_torch
    import torch

    seq = torch.export.Dim("q", min=1, max=options.max_context)
    example = (torch.zeros(1, 2, dtype=torch.int32), torch.zeros(1, dtype=torch.int32))

    def export_fn(m: Any) -> Any:
        return torch.export.export(m, args=example, dynamic_shapes=({1: seq}, None)).run_decompositions(
            coreai_torch.get_decomp_table())

    converter = coreai_torch.TorchConverter(mode=coreai_torch.TorchConverter.Mode.RELEASE)
    with console.step("Exporting the module (torch.export, dynamic query length)") as step:
        converter.add_pytorch_module(module, export_fn=export_fn, input_names=["tokens", "input_pos"],
                                     output_names=["logits"], state_names=state_names(module.dims.num_layers),
                                     entrypoint_name=FUNCTION)
    timings["export"] = step["seconds"]
    with console.step("Converting with coreai-torch") as step, contextlib.redirect_stdout(io.StringIO()):
        program = converter.to_coreai()  # its banner and progress bar would land on our stdout
    timings["convert"] = step["seconds"]
    return program
