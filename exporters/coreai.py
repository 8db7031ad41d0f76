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

from compress.exporters.base import atomic_dir, model_problems

from compress.artifact import Artifact, Availability, CacheShape, Dtype
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
    version = "2"

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
            with console.step("Saving the asset") as step:
                program.save_asset(tmp / ASSET)
            timings["save"] = step["seconds"]
            tokenizer.save_pretrained(tmp)
            sidecar = {"function": FUNCTION, "max_context": options.max_context, "vocab_size": dims.vocab_size,
                       "inputs": {"tokens": "(1, q) int32, q in 1..max_context", "input_pos": "(1,) int32"},
                       "outputs": {"logits": f"(1, q, vocab) {options.compute_precision.value}"},
                       "states": {name: f"({options.max_context}, {dims.num_kv_heads}, {dims.head_dim}) float16"
                                  for name in state_names(dims.num_layers)},
                       "compute_precision": options.compute_precision.value, "coverage": coverage,
                       "export_seconds": timings}
            (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=2))
        files = tuple(str(p) for p in files_under(out_dir))
        return Artifact(out_dir, self.format, files, main=ASSET, max_context=options.max_context,
                        vocab_size=dims.vocab_size, cache=CacheShape(dims.num_layers, dims.num_kv_heads, dims.head_dim),
                        record={"compute_precision": options.compute_precision.value, "coverage": coverage,
                                "export_seconds": timings})


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
