"""Export options: one frozen dataclass per artifact format, validated before any exporter runs.

`export: {format: NAME, **options}` in targets.yaml is parsed into the format's dataclass here; the
exporter for that format receives it unchanged. Each also declares what its backend can hold of the quantize
stage's codes (`codes_problems`), checked when targets.yaml is read.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from compress.config import check_fields, setting
from compress.errors import Problem
from compress.quantized import BITS_OF, Activations, Precision, QuantizeConfig


class Dtype(enum.StrEnum):
    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"


class ComputeUnits(enum.StrEnum):
    ALL = "all"
    CPU_ONLY = "cpu_only"
    CPU_AND_GPU = "cpu_and_gpu"
    CPU_AND_NE = "cpu_and_ne"


class PteAttention(enum.StrEnum):
    XNNPACK = "xnnpack"  # bmm/softmax over the written cache prefix on XNNPACK: faster prefill
    CUSTOM_SDPA = "custom_sdpa"  # ExecuTorch's custom SDPA kernel (what its own LLM export uses): faster decode


class GgufType(enum.StrEnum):
    F32 = "f32"
    F16 = "f16"
    Q8_0 = "q8_0"
    Q4_0 = "q4_0"
    Q4_K_M = "q4_k_m"
    Q5_K_M = "q5_k_m"


# ---- export options, one dataclass per format -------------------------------------------------
#
# Each format's options say what its kernels can hold of the quantize stage's codes (`codes_problems`):
# targets.yaml is checked against it when it is read, before any work.


def _bits_used(q: QuantizeConfig) -> set[int]:
    """Every code width the stage will write for this config (body, overrides, lm_head and embedding)."""
    bits = {q.weight_bits} | {o.weight_bits for o in q.overrides if o.weight_bits != 16}
    return bits | {b for b in (BITS_OF[q.lm_head], BITS_OF[q.embedding]) if b is not None}


@dataclass(frozen=True)
class PteOptions:
    max_context: int = setting(512, ge=16, le=32768, doc="KV-cache length baked into the program")
    backend: str = setting("xnnpack", choices=("xnnpack",))
    attention: PteAttention = PteAttention.XNNPACK
    allow_unquantized_linears: bool = setting(False, doc="let the export succeed when a linear is skipped")
    external_data: bool = setting(True, doc="weights in model.ptd beside model.pte (tied weights stored once)")

    def __post_init__(self) -> None:
        check_fields(self)

    def codes_problems(self, q: QuantizeConfig) -> list[Problem]:
        """XNNPACK runs int4 weights only with int8 dynamic activations (8da4w); offsets it lacks are exact extra
        terms (exporters/xnnpack_codes.py), so any affine scheme otherwise fits."""
        if 4 in _bits_used(q) and q.activations is not Activations.INT8_DYNAMIC:
            return [Problem("quantize.activations", f"{q.activations.value!r} with 4-bit codes: XNNPACK runs int4 "
                                                    f"weights only with int8 dynamic activations; use int8_dynamic")]
        return []


class OnnxDeploy(enum.StrEnum):
    DESKTOP = "desktop"  # ONNX Runtime (CPU EP) / onnxruntime-genai
    WEB = "web"  # onnxruntime-web (WASM, WebGPU) / transformers.js: the graph must use only ops it ships


# MatMulNBits' block sizes (onnxruntime's CPU kernels and the onnxruntime-genai builder accept these).
ONNX_BLOCK_SIZES = (16, 32, 64, 128, 256)


@dataclass(frozen=True)
class OnnxOptions:
    max_context: int = setting(2048, ge=16, le=131072, doc="KV-cache length a session pre-allocates")
    max_opset: int = setting(22, ge=17, le=24, doc="highest ai.onnx opset the deploying runtime runs")
    external_data: bool = setting(True, doc="weights in model.onnx.data beside model.onnx (false: one file)")
    deploy: OnnxDeploy = OnnxDeploy.DESKTOP
    allow_unquantized_matmuls: bool = setting(False, doc="let the export succeed when a MatMul is skipped")

    def __post_init__(self) -> None:
        check_fields(self)

    def codes_problems(self, q: QuantizeConfig) -> list[Problem]:
        """What MatMulNBits (block-wise int4/int8) and GatherBlockQuantized (the shared embedding) can hold."""
        out = []
        if q.group_size is None or q.group_size not in ONNX_BLOCK_SIZES:
            out.append(Problem("quantize.group_size", f"{q.group_size} is not a MatMulNBits block size (it is "
                                                      f"block-wise); choose one of {list(ONNX_BLOCK_SIZES)}"))
        if q.lm_head not in (Precision.FP32, Precision.INT8, Precision.INT4):
            out.append(Problem("quantize.lm_head", f"{q.lm_head.value!r} is not available for onnx; choose fp32, "
                                                   f"int8 or int4"))
        if q.embedding not in (Precision.FP32, q.lm_head):
            out.append(Problem("quantize.embedding", f"{q.embedding.value!r} with lm_head {q.lm_head.value!r}: the "
                                                     f"ONNX export either shares the output layer's quantized matrix "
                                                     f"with the embedding (set embedding: {q.lm_head.value}) or keeps "
                                                     f"it fp32 (embedding: fp32)"))
        odd = [o for o in q.overrides if o.weight_bits != 16 and o.group_size != q.group_size]
        if odd:
            out.append(Problem("quantize.overrides", f"{odd[0].pattern!r} sets group_size {odd[0].group_size}: the "
                                                     f"builder's fused QKV and gate/up MatMulNBits hold one block "
                                                     f"size; set group_size: {q.group_size} in the override"))
        return out


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


@dataclass(frozen=True)
class GgufOptions:
    file_type: GgufType = GgufType.Q4_K_M
    max_context: int = setting(2048, ge=16, le=131072, doc="llama.cpp context (n_ctx) the runtime allocates")

    def __post_init__(self) -> None:
        check_fields(self)

    def codes_problems(self, q: QuantizeConfig) -> list[Problem]:
        return [Problem("stages", "the gguf exporter writes its own file_type (gguf-py / llama.cpp's quantizer) and "
                                  "cannot hold the quantize stage's codes; remove the quantize stage or choose pte, "
                                  "onnx or mlpackage")]


@dataclass(frozen=True)
class SafetensorsOptions:
    dtype: Dtype = Dtype.FLOAT32
    max_context: int = setting(2048, ge=16, le=131072)

    def __post_init__(self) -> None:
        check_fields(self)

    def codes_problems(self, q: QuantizeConfig) -> list[Problem]:
        return []  # the checkpoint holds the codes' exact dequantized values
