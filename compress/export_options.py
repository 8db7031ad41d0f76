"""Export options: one frozen dataclass per artifact format, validated before any exporter runs.

`export: {format: NAME, **options}` in targets.yaml is parsed into the format's dataclass here; the
exporter for that format receives it unchanged.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from compress.config import check_fields, setting
from compress.errors import Problem
from compress.stages.configs import Activations, Precision, QuantAlgorithm, QuantizeConfig, WeightFormat


class Dtype(enum.Enum):
    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"


class ComputeUnits(enum.Enum):
    ALL = "all"
    CPU_ONLY = "cpu_only"
    CPU_AND_GPU = "cpu_and_gpu"
    CPU_AND_NE = "cpu_and_ne"


class PteAttention(enum.Enum):
    XNNPACK = "xnnpack"  # bmm/softmax over the written cache prefix on XNNPACK: faster prefill
    CUSTOM_SDPA = "custom_sdpa"  # ExecuTorch's custom SDPA kernel (what its own LLM export uses): faster decode


class GgufType(enum.Enum):
    F32 = "f32"
    F16 = "f16"
    Q8_0 = "q8_0"
    Q4_0 = "q4_0"
    Q4_K_M = "q4_k_m"
    Q5_K_M = "q5_k_m"


# ---- export options, one dataclass per format -------------------------------------------------

_STAGE_ONLY = ("max_kl", "max_avg_bits", "calibration_windows", "calibration_len")


def stage_only_problems(q: QuantizeConfig) -> list[Problem]:
    """Settings only the quantize stage honours; in export.quantize they would be silently ignored."""
    defaults = QuantizeConfig()
    return [Problem(f"quantize.{name}", "only the quantize stage measures KL on calibration text; move this "
                                        "quantize block to `stages: [{quantize: ...}]`")
            for name in _STAGE_ONLY if getattr(q, name) != getattr(defaults, name)]



def pte_quantize_problems(q: QuantizeConfig | None) -> list[Problem]:
    """What XNNPACK can run: 8da4w / 8da8w (int8 dynamic activations) or int8 weight-only, symmetric."""
    if q is None:
        return []
    out = stage_only_problems(q)
    if q.weight_bits == 4 and q.activations is not Activations.INT8_DYNAMIC:
        out.append(Problem("quantize.activations", "int4 weights on XNNPACK need activations: int8_dynamic (8da4w)"))
    if not q.symmetric:
        out.append(Problem("quantize.symmetric", "false is not supported by XNNPACK's integer kernels; use true"))
    if q.algorithm not in (QuantAlgorithm.RTN, QuantAlgorithm.HQQ):
        out.append(Problem("quantize.algorithm", f"{q.algorithm.value!r} is not available for pte yet; choose 'rtn' "
                                                 f"or 'hqq'"))
    if q.lm_head is Precision.FP16 or q.embedding is Precision.FP16:
        out.append(Problem("quantize", "fp16 embedding/lm_head is not supported for pte; use fp32, int8 or int4"))
    if q.weight_format is not WeightFormat.AFFINE:
        out.append(Problem("quantize.weight_format", f"{q.weight_format.value!r} is not supported by XNNPACK; use "
                                                     f"'affine'"))
    return out


@dataclass(frozen=True)
class PteOptions:
    max_context: int = setting(512, ge=16, le=32768, doc="KV-cache length baked into the program")
    backend: str = setting("xnnpack", choices=("xnnpack",))
    attention: PteAttention = PteAttention.XNNPACK
    quantize: QuantizeConfig | None = None  # torchao quantization applied before lowering; null: fp32
    allow_unquantized_linears: bool = setting(False, doc="let the export succeed when a linear is skipped")
    external_data: bool = setting(True, doc="weights in model.ptd beside model.pte (tied weights stored once)")

    def __post_init__(self) -> None:
        check_fields(self, pte_quantize_problems(self.quantize))


class OnnxDeploy(enum.Enum):
    DESKTOP = "desktop"  # ONNX Runtime (CPU EP) / onnxruntime-genai
    WEB = "web"  # onnxruntime-web (WASM, WebGPU) / transformers.js: the graph must use only ops it ships


# MatMulNBits' block sizes (onnxruntime's CPU kernels and the onnxruntime-genai builder accept these).
ONNX_BLOCK_SIZES = (16, 32, 64, 128, 256)


def onnx_quantize_problems(q: QuantizeConfig | None) -> list[Problem]:
    """What ONNX Runtime's weight-only MatMulNBits (int4/int8, block-wise) and GatherBlockQuantized can hold."""
    if q is None:
        return []
    out = stage_only_problems(q)
    if q.group_size is None:
        out.append(Problem("quantize.group_size", "null (per-channel) is not available for onnx: MatMulNBits is "
                                                  f"block-wise; choose one of {list(ONNX_BLOCK_SIZES)}"))
    elif q.group_size not in ONNX_BLOCK_SIZES:
        out.append(Problem("quantize.group_size", f"{q.group_size} is not a MatMulNBits block size; choose one of "
                                                  f"{list(ONNX_BLOCK_SIZES)}"))
    if q.weight_format is not WeightFormat.AFFINE:
        out.append(Problem("quantize.weight_format", f"{q.weight_format.value!r} has no ONNX Runtime kernel; use "
                                                     f"'affine' (MatMulNBits)"))
    if q.algorithm is not QuantAlgorithm.RTN:
        out.append(Problem("quantize.algorithm", f"{q.algorithm.value!r} is not available for onnx yet; choose 'rtn'"))
    if q.lm_head not in (Precision.FP32, Precision.INT8, Precision.INT4):
        out.append(Problem("quantize.lm_head", f"{q.lm_head.value!r} is not available for onnx; choose fp32, int8 "
                                               f"or int4"))
    if q.embedding not in (Precision.FP32, q.lm_head):
        out.append(Problem("quantize.embedding", f"{q.embedding.value!r} with lm_head {q.lm_head.value!r}: the ONNX "
                                                 f"export either shares the output layer's quantized matrix with "
                                                 f"the embedding (set embedding: {q.lm_head.value}) or keeps it "
                                                 f"fp32 (embedding: fp32)"))
    if q.overrides:
        out.append(Problem("quantize.overrides", "per-layer overrides are not available for onnx yet"))
    return out


@dataclass(frozen=True)
class OnnxOptions:
    max_context: int = setting(2048, ge=16, le=131072, doc="KV-cache length a session pre-allocates")
    max_opset: int = setting(22, ge=17, le=24, doc="highest ai.onnx opset the deploying runtime runs")
    external_data: bool = setting(True, doc="weights in model.onnx.data beside model.onnx (false: one file)")
    deploy: OnnxDeploy = OnnxDeploy.DESKTOP
    quantize: QuantizeConfig | None = None  # MatMulNBits weight-only quantization; null: fp32
    allow_unquantized_matmuls: bool = setting(False, doc="let the export succeed when a MatMul is skipped")

    def __post_init__(self) -> None:
        check_fields(self, onnx_quantize_problems(self.quantize))


def mlpackage_quantize_problems(q: QuantizeConfig | None, compute_units: ComputeUnits) -> list[Problem]:
    """What coremltools.optimize can express, and what the Neural Engine runs: checked before any conversion."""
    if q is None:
        return []
    out = stage_only_problems(q)
    if q.activations is not Activations.NONE:
        out.append(Problem("quantize.activations", f"{q.activations.value!r} is not supported for mlpackage "
                                                   f"(weight-only compression); use 'none'"))
    if q.algorithm is not QuantAlgorithm.RTN:
        out.append(Problem("quantize.algorithm", f"{q.algorithm.value!r} is not available for mlpackage; use 'rtn' "
                                                 f"(palettized weights are always k-means)"))
    if q.weight_format is WeightFormat.PALETTIZED and not q.symmetric:
        out.append(Problem("quantize.symmetric", "false has no meaning for palettized weights; use true"))
    if q.overrides:
        out.append(Problem("quantize.overrides", "per-layer overrides are not supported for mlpackage yet"))
    if (compute_units is ComputeUnits.CPU_AND_NE and q.weight_format is WeightFormat.AFFINE
            and q.group_size is not None):
        out.append(Problem("quantize.group_size", f"{q.group_size}: per-block scales do not run on the Neural Engine "
                                                  f"(compute_units: cpu_and_ne), which wants per-channel scales; use "
                                                  f"group_size: null, weight_format: palettized, or compute_units: "
                                                  f"cpu_and_gpu"))
    return out


@dataclass(frozen=True)
class MlpackageOptions:
    max_context: int = setting(512, ge=16, le=8192, doc="positions the Core ML states hold")
    compute_units: ComputeUnits = ComputeUnits.CPU_AND_NE
    minimum_deployment_target: str = setting("iOS18", choices=("iOS18", "macOS15"), doc="states need iOS18/macOS15")
    query_lengths: tuple[int, ...] = setting((1, 64), doc="the enumerated tokens-per-call shapes; 1 is decode")
    compute_precision: Dtype = setting(Dtype.FLOAT16, choices=(Dtype.FLOAT16, Dtype.FLOAT32))
    quantize: QuantizeConfig | None = setting(None, doc="coremltools.optimize weight compression; null: fp16")
    allow_unquantized_linears: bool = setting(False, doc="let the export succeed when a linear is not compressed")

    def __post_init__(self) -> None:
        extra = mlpackage_quantize_problems(self.quantize, self.compute_units)
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


@dataclass(frozen=True)
class GgufOptions:
    file_type: GgufType = GgufType.Q4_K_M
    max_context: int = setting(2048, ge=16, le=131072, doc="llama.cpp context (n_ctx) the runtime allocates")

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class SafetensorsOptions:
    dtype: Dtype = Dtype.FLOAT32
    max_context: int = setting(2048, ge=16, le=131072)

    def __post_init__(self) -> None:
        check_fields(self)
