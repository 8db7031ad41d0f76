"""Quantize once, lower everywhere: the quantize stage's codes run the same model on ONNX Runtime and ExecuTorch.

With fp32 activations the lowered graph must compute exactly what eager PyTorch computes on the stage's
dequantized weights (float tolerance), for codes with integer zero points and for float offsets (the exact
per-group correction) alike. With int8 dynamic activations the two runtimes must agree on the KL they cost.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("torchao")

from compress.exporters.executorch import PteOptions
from compress.exporters.onnx import OnnxOptions

from compress.metrics import position_kl
from compress.models.tiny import byte_tokenizer, tiny_llama
from compress.progress import Console
from compress.quantized import Activations, Precision, QuantAlgorithm, QuantizeConfig, ZeroPoint
from compress.stages import STAGES, StageContext

QUIET = Console(quiet=True)
TOKENS = list(range(10, 50))


def _stage(model, tmp_path, **kw):
    gen = torch.Generator().manual_seed(1)
    windows = [torch.randint(0, 256, (48,), generator=gen).tolist() for _ in range(2)]
    ctx = StageContext(seed=0, work_dir=tmp_path, reference=model, console=QUIET,
                       calibration=lambda count, length: windows[:count])
    config = QuantizeConfig(**{**dict(weight_bits=4, group_size=32, symmetric=False, activations=Activations.NONE,
                                      embedding=Precision.INT8, lm_head=Precision.INT8, calibration_windows=2,
                                      calibration_len=48), **kw})
    return STAGES.get("quantize").run(model, config, ctx)  # StageResult: .model and its codes, .quantized


def _eager(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([TOKENS])).logits[0].numpy()  # (40, vocab)


def _run(session) -> np.ndarray:
    return np.concatenate([session.prefill(TOKENS[:25])] + [session.decode(t)[None] for t in TOKENS[25:]])


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=0)


@pytest.mark.parametrize("algorithm, bits, corrected, scale_bits, zero_point", [
    (QuantAlgorithm.RTN, 4, 0, 16, ZeroPoint.FLOAT), (QuantAlgorithm.HQQ, 4, 10, 16, ZeroPoint.FLOAT),
    (QuantAlgorithm.HQQ, 4, 10, 8, ZeroPoint.FLOAT), (QuantAlgorithm.RTN, 8, 0, 16, ZeroPoint.FLOAT),
    (QuantAlgorithm.HQQ, 4, 0, 8, ZeroPoint.INTEGER), (QuantAlgorithm.HQQ, 4, 0, 16, ZeroPoint.INTEGER)])
def test_onnx_runs_the_stage_codes_exactly(model, tmp_path, algorithm, bits, corrected, scale_bits, zero_point):
    pytest.importorskip("onnxruntime_genai")
    from compress.exporters.onnx import OnnxExporter
    from compress.exporters.onnx_codes import CORRECTION_SUFFIX
    from compress.runtimes.onnxruntime import OnnxRuntimeRuntime as OnnxRuntime

    staged = _stage(model, tmp_path, algorithm=algorithm, weight_bits=bits, scale_bits=scale_bits,
                    zero_point=zero_point)
    art = OnnxExporter().export(staged.model, byte_tokenizer(), OnnxOptions(max_context=96), tmp_path / "onnx", QUIET, staged.quantized)
    coverage = art.record["coverage"]
    assert coverage["matmuls_quantized"] == coverage["matmuls_total"] == 11  # 2 x (qkv, o, gate, up, down) + head
    # HQQ's float zero points: every body matmul; its integer ones (zero_point: integer) none, like rtn's
    assert coverage["with_offset_correction"] == corrected
    assert coverage["stage_tensors_not_in_graph"] == []
    # The stage's scales and residual offsets are fp16 values, so they are stored in fp16, exactly (below); with
    # scale_bits 8, as 8-bit codes and a factor per row (the lm_head's, rounded to nearest, stay fp16).
    eight = 10 if scale_bits == 8 else 0
    eight_residuals = eight if corrected else 0
    assert coverage["scales_stored_8bit"] == eight and coverage["scales_stored_fp16"] == 11 - eight
    assert coverage["residuals_stored_8bit"] == eight_residuals
    assert coverage.get("residuals_stored_fp16", 0) == corrected - eight_residuals
    import onnx

    graph = onnx.load(str(art.path / art.main), load_external_data=False).graph
    halves = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT16}
    assert sum(n.endswith("_fp16") for n in halves) == 11 + corrected - eight - eight_residuals
    bytes8 = {i.name for i in graph.initializer if i.data_type in (onnx.TensorProto.UINT8, onnx.TensorProto.INT8)
              and i.name.endswith("_q8")}
    assert len(bytes8) == eight + eight_residuals
    factors = [i.data_type for i in graph.initializer if i.name.endswith("_factor")]  # powers of two: fp16 holds them
    assert factors == [onnx.TensorProto.FLOAT16] * (eight + eight_residuals)
    # Default zero points are not stored: only the lm_head shared with the embedding's gather, and integer zero
    # points (asymmetric round-to-nearest, zero_point: integer).
    with_zero = [n.name for n in graph.node if n.op_type == "MatMulNBits" and len(n.input) > 3 and n.input[3]]
    assert len(with_zero) == (1 if corrected else 11)
    assert sum(n.name.endswith(CORRECTION_SUFFIX) for n in graph.node) == corrected  # one correction per corrected
    got = _run(OnnxRuntime().load(art, threads=2))
    np.testing.assert_allclose(got, _eager(staged.model), atol=2e-4, rtol=1e-4)
    assert np.abs(got - _eager(model)).max() > 1e-2  # it really is the staged model, not the fp32 one


def test_the_export_module_computes_the_stage_model_with_the_offset_correction(model, tmp_path):
    """Weight-only int8 per channel, asymmetric: signed codes + the exact per-group correction, in eager."""
    from compress.exporters.llama import ExportLlama
    from compress.exporters.xnnpack_codes import OffsetLinear, apply_codes

    staged = _stage(model, tmp_path, weight_bits=8, group_size=None, symmetric=False)
    module = ExportLlama.from_hf(staged.model, 96)
    notes = apply_codes(module, staged.quantized, tied=True)
    assert notes["linears_with_offset_correction"] == 15 and isinstance(module.layers[0].mlp.up_proj, OffsetLinear)
    with torch.no_grad():
        got = module(torch.tensor([TOKENS]), torch.tensor([0]))[0].numpy()
    np.testing.assert_allclose(got, _eager(staged.model), atol=2e-4, rtol=1e-4)


def test_an_8_bit_per_group_lm_head_is_rounded_per_channel_row_block_by_row_block_as_a_whole():
    """XNNPACK's int8 linears are per channel, so 8-bit per-group codes are rounded again; by row blocks (a 128k
    lm_head's dequantized matrix is 1 GB at 1B) the codes and scales are those of the whole matrix."""
    from compress.exporters.xnnpack_codes import per_channel_int8

    from compress.quantized import rtn

    t = rtn(torch.randn(37, 96, generator=torch.Generator().manual_seed(4)) * 0.05, 8, 32, symmetric=False)
    whole = rtn(t.dequantize(), 8, 96, symmetric=True)
    blocks = per_channel_int8(t, block_elements=5 * 96)  # 8 blocks, the last of 2 rows
    assert (blocks.bits, blocks.group) == (8, 96)
    assert torch.equal(blocks.codes, whole.codes) and torch.equal(blocks.scale, whole.scale)
    assert torch.equal(blocks.offset, whole.offset)


def test_linears_reading_one_input_share_one_group_sum_after_export(model, tmp_path):
    """q/k/v (and gate/up) read the same input: after the exporter's CSE, one group sum serves them all, and the
    program still computes the same thing."""
    pytest.importorskip("executorch")
    from compress.exporters.executorch import _merge_common_subexpressions
    from compress.exporters.llama import ExportLlama
    from compress.exporters.xnnpack_codes import apply_codes

    staged = _stage(model, tmp_path, weight_bits=8, group_size=None, symmetric=False)
    module = ExportLlama.from_hf(staged.model, 96)
    apply_codes(module, staged.quantized, tied=True)
    exported = torch.export.export(module, (torch.tensor([TOKENS]), torch.tensor([0])), strict=False)

    def group_sums() -> int:  # linears whose weight is a row of ones
        sig = exported.graph_signature.inputs_to_parameters
        return sum(1 for n in exported.graph_module.graph.nodes if n.op == "call_function"
                   and "linear" in str(n.target) and sig.get(n.args[1].name, "").endswith("ones"))

    assert group_sums() == 2 * 7 + 1  # one per corrected linear: 7 per layer and the lm_head
    _merge_common_subexpressions(exported)
    assert group_sums() == 2 * 4 + 1  # per layer: q/k/v, o, gate/up, down
    with torch.no_grad():
        got = exported.module()(torch.tensor([TOKENS]), torch.tensor([0]))[0].numpy()
    np.testing.assert_allclose(got, _eager(staged.model), atol=2e-4, rtol=1e-4)


def test_executorch_and_onnx_lower_the_same_8da4w_codes_to_the_same_accuracy(model, tmp_path):
    pytest.importorskip("executorch")
    pytest.importorskip("onnxruntime_genai")
    from compress.exporters.executorch import ExecuTorchExporter
    from compress.exporters.onnx import OnnxExporter
    from compress.runtimes.executorch import ExecuTorchRuntime
    from compress.runtimes.onnxruntime import OnnxRuntimeRuntime as OnnxRuntime

    staged = _stage(model, tmp_path, algorithm=QuantAlgorithm.HQQ, activations=Activations.INT8_DYNAMIC)
    pte = ExecuTorchExporter().export(staged.model, byte_tokenizer(), PteOptions(max_context=96), tmp_path / "pte", QUIET, staged.quantized)
    onnx = OnnxExporter().export(staged.model, byte_tokenizer(), OnnxOptions(max_context=96), tmp_path / "onnx", QUIET, staged.quantized)
    coverage = pte.record["coverage"]
    assert coverage["linears_with_offset_correction"] == 14  # every body linear; the int8 lm_head is symmetric
    assert coverage["offset_terms"] == "int8 per channel, int8 dynamic activations"  # like every other linear
    assert set(coverage["requantized"]) == {"lm_head"}  # int8 per group: XNNPACK's int8 kernels are per channel
    assert coverage["non_delegated_ops"].get("linear", 0) == 0  # the correction's small linears run on XNNPACK
    reference = _eager(model)
    stage_kl = position_kl(reference, _eager(staged.model)).mean()
    kl = {name: position_kl(reference, _run(runtime.load(art, threads=2))).mean()
          for name, runtime, art in (("pte", ExecuTorchRuntime(), pte), ("onnx", OnnxRuntime(), onnx))}
    # Both add only their own int8 activation rounding to the stage's weights.
    assert abs(kl["pte"] - stage_kl) < 0.25 * stage_kl and abs(kl["onnx"] - stage_kl) < 0.25 * stage_kl


def test_middle_zero_points_reach_xnnpack_without_offset_terms_and_run_the_stage_codes(model, tmp_path):
    """zero_point: middle (symmetric hqq/gptq grids): the .pte carries no offset term (HQQ's float offsets need
    one per body linear, above) and adds only its int8 activation rounding to the stage's weights."""
    pytest.importorskip("executorch")
    from compress.exporters.executorch import ExecuTorchExporter
    from compress.runtimes.executorch import ExecuTorchRuntime

    staged = _stage(model, tmp_path, algorithm=QuantAlgorithm.HQQ, zero_point=ZeroPoint.MIDDLE, symmetric=True,
                    activations=Activations.INT8_DYNAMIC)
    assert all(t.symmetric for t in staged.quantized.tensors.values())
    pte = ExecuTorchExporter().export(staged.model, byte_tokenizer(), PteOptions(max_context=96), tmp_path / "pte",
                                      QUIET, staged.quantized)
    assert pte.record["coverage"]["linears_with_offset_correction"] == 0
    reference = _eager(model)
    stage_kl = position_kl(reference, _eager(staged.model)).mean()
    kl = position_kl(reference, _run(ExecuTorchRuntime().load(pte, threads=2))).mean()
    assert stage_kl > 1e-3 and abs(kl - stage_kl) < 0.25 * stage_kl


def test_fused_qkv_codes_run_what_separate_projections_run(model, tmp_path):
    """custom_sdpa programs stack each layer's q/k/v codes into one matmul (rows, scales and offsets stacked: exact);
    mixed precision that gives q, k and v different bits keeps them apart."""
    pytest.importorskip("executorch")
    from compress.exporters.executorch import ExecuTorchExporter, PteAttention
    from compress.exporters.xnnpack_codes import fuse_qkv_codes
    from compress.runtimes.executorch import ExecuTorchRuntime

    staged = _stage(model, tmp_path, algorithm=QuantAlgorithm.HQQ, activations=Activations.INT8_DYNAMIC)
    arts = {attention: ExecuTorchExporter().export(staged.model, byte_tokenizer(), PteOptions(max_context=96,
                                                   attention=attention), tmp_path / attention.value, QUIET, staged.quantized)
            for attention in (PteAttention.CUSTOM_SDPA, PteAttention.XNNPACK)}
    fused, apart = arts[PteAttention.CUSTOM_SDPA].record["coverage"], arts[PteAttention.XNNPACK].record["coverage"]
    assert fused["qkv_fused"] and not apart["qkv_fused"]
    for key in ("linears_total", "linears_quantized", "linears_with_offset_correction", "bits_histogram"):
        assert fused[key] == apart[key], key  # counted in the source model's linears either way
    got = {a: _run(ExecuTorchRuntime().load(art, threads=2)) for a, art in arts.items()}
    # Two attention kernels and one vs three matmuls: the same model to well within the int8 activations' noise.
    reference = _eager(staged.model)
    assert position_kl(got[PteAttention.CUSTOM_SDPA], got[PteAttention.XNNPACK]).mean() < \
        0.1 * position_kl(reference, got[PteAttention.XNNPACK]).mean()
    codes = staged.quantized
    stacked = fuse_qkv_codes(codes, 2).tensors["layers.0.self_attn.qkv_proj"]
    torch.testing.assert_close(stacked.dequantize(), torch.cat([codes.tensors[f"layers.0.self_attn.{n}_proj"]
                                                                .dequantize() for n in "qkv"]))
    codes.tensors["layers.1.self_attn.k_proj"].bits = 8  # as mixed precision would leave it
    assert fuse_qkv_codes(codes, 2) is None


def test_onnx_fuses_a_qkv_of_mixed_bits_exactly_and_without_amplifying_int8_activation_error(model, tmp_path):
    """Mixed precision can leave q at 8 bits and k, v at 4 in the builder's fused QKV MatMulNBits: the 4-bit parts
    are centred in the 8-bit grid, so fp32 activations give the stage's model and int8 activations cost what
    they cost without mixed precision (left at the bottom of the grid they cost ~10x more)."""
    pytest.importorskip("onnxruntime_genai")
    from compress.exporters.onnx import OnnxExporter
    from compress.quantized import LayerOverride
    from compress.runtimes.onnxruntime import OnnxRuntimeRuntime as OnnxRuntime

    q8 = (LayerOverride("layers.0.self_attn.q_proj", 8, 32),)
    errors = {}
    for acts in (Activations.NONE, Activations.INT8_DYNAMIC):
        for overrides in ((), q8):
            staged = _stage(model, tmp_path, algorithm=QuantAlgorithm.HQQ, activations=acts, overrides=overrides)
            where = tmp_path / f"{acts.value}-{len(overrides)}"
            art = OnnxExporter().export(staged.model, byte_tokenizer(), OnnxOptions(max_context=96), where, QUIET,
                                        staged.quantized)
            errors[acts, bool(overrides)] = float(np.abs(_run(OnnxRuntime().load(art, threads=2))
                                                         - _eager(staged.model)).max())
    assert errors[Activations.NONE, True] < 5e-4 and errors[Activations.NONE, False] < 5e-4
    assert errors[Activations.INT8_DYNAMIC, True] < 1.5 * errors[Activations.INT8_DYNAMIC, False]


def test_the_tied_matrix_is_stored_once_when_the_weights_are_external_data(tmp_path):
    """The embedding gathers the very int8 matrix the lm_head multiplies by, so in model.ptd (one copy of identical
    bytes) the tied matrix is stored once; in a single-file program it is stored twice. Same numbers either way."""
    pytest.importorskip("executorch")
    from compress.exporters.executorch import ExecuTorchExporter
    from compress.runtimes.executorch import ExecuTorchRuntime

    vocab, hidden = 4096, 64  # the tied matrix (256 KiB in int8) outweighs the rest of this model
    staged = _stage(tiny_llama(seed=0, vocab_size=vocab), tmp_path, algorithm=QuantAlgorithm.HQQ,
                       activations=Activations.INT8_DYNAMIC)
    shared = ExecuTorchExporter().export(staged.model, byte_tokenizer(), PteOptions(max_context=96), tmp_path / "ptd",
                                         QUIET, staged.quantized)
    single = ExecuTorchExporter().export(staged.model, byte_tokenizer(), PteOptions(max_context=96, external_data=False),
                                         tmp_path / "pte", QUIET, staged.quantized)
    assert shared.data == "model.ptd" and (shared.path / "model.ptd").is_file()
    assert not single.data and not (single.path / "model.ptd").exists()
    assert shared.record["coverage"]["embedding"] == "int8 per row, the lm_head's codes"
    assert single.size_bytes() - shared.size_bytes() > 0.95 * vocab * hidden  # one copy of the matrix fewer
    assert (shared.path / "model.pte").stat().st_size < 0.2 * shared.size_bytes()  # the program; weights apart
    got = {art.path.name: _run(ExecuTorchRuntime().load(art, threads=2)) for art in (shared, single)}
    np.testing.assert_array_equal(got["ptd"], got["pte"])


@pytest.mark.parametrize("algorithm", [QuantAlgorithm.RTN, QuantAlgorithm.HQQ])
def test_core_ml_runs_the_stage_codes_exactly_in_an_fp32_program(model, tmp_path, algorithm):
    pytest.importorskip("coremltools")
    from compress.exporters.coreml import ComputeUnits, CoreMLExporter, MlpackageOptions
    from compress.exporters.llama import AttentionBackend, ExportLlama
    from compress.runtimes.coreml import CoreMLRuntime

    from compress.artifact import Dtype

    staged = _stage(model, tmp_path, algorithm=algorithm)
    options = MlpackageOptions(max_context=64, compute_units=ComputeUnits.CPU_AND_GPU, compute_precision=Dtype.FLOAT32)
    art = CoreMLExporter().export(staged.model, byte_tokenizer(), options, tmp_path / "coreml", QUIET, staged.quantized)
    coverage = art.record["coverage"]
    assert coverage["codes_lowered"] == 15 and coverage["linears_not_compressed"] == []
    assert coverage["with_float_offsets"] == (14 if algorithm is QuantAlgorithm.HQQ else 0)
    session = CoreMLRuntime().load(art, threads=2)
    got = np.concatenate([session.prefill(TOKENS[:17])] + [session.decode(t)[None] for t in TOKENS[17:]])
    # The export module Core ML traces (its fp16-safe RMSNorm rescales rows: ~1e-3 from HF's in fp32), in eager.
    module = ExportLlama.from_hf(staged.model, 64, AttentionBackend.COREML_STACKED, fp16_safe_norm=True)
    with torch.no_grad():
        expected = module(torch.tensor([TOKENS], dtype=torch.int32), torch.zeros(1, 1, len(TOKENS), len(TOKENS)))[0]
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-3, rtol=1e-3)  # quantization errors are ~1e-1


def test_formats_refuse_activations_their_kernels_cannot_run_before_converting(model, tmp_path):
    from compress.errors import ExportError, InputError

    int8_acts = _stage(model, tmp_path, activations=Activations.INT8_DYNAMIC)
    pytest.importorskip("coremltools")
    from compress.exporters.coreml import CoreMLExporter, MlpackageOptions

    with pytest.raises(InputError, match="Core ML programs compute with fp16 activations"):
        CoreMLExporter().export(int8_acts.model, byte_tokenizer(), MlpackageOptions(max_context=64), tmp_path / "c", QUIET, int8_acts.quantized)
    pytest.importorskip("executorch")
    from compress.exporters.executorch import ExecuTorchExporter

    fp_acts = _stage(model, tmp_path)  # int4 codes, activations: none
    with pytest.raises(ExportError, match="XNNPACK runs int4 weights only with int8 dynamic activations"):
        ExecuTorchExporter().export(fp_acts.model, byte_tokenizer(), PteOptions(max_context=96), tmp_path / "p", QUIET, fp_acts.quantized)
    assert not (tmp_path / "c").exists() and not (tmp_path / "p").exists()


def test_a_stage_tensor_without_a_node_to_carry_it_fails_the_onnx_export(tmp_path):
    """Coverage is a post-condition: a quantize-stage tensor the graph has no MatMulNBits for (a builder that named
    a node differently, say) fails the export instead of shipping the builder's own weights in its place."""
    import onnx
    from onnx import TensorProto, helper

    from compress.errors import ExportError
    from compress.exporters.onnx_codes import lower_codes
    from compress.quantized import QuantizedWeights, rtn

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"], name="/model/identity")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])])
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph), str(path))
    tensors = {"layers.0.mlp.down_proj": rtn(torch.randn(64, 64), 4, 32, False)}
    weights = QuantizedWeights(tensors, QuantizeConfig(weight_bits=4, group_size=32), ())
    with pytest.raises(ExportError, match=r"1 of the quantize stage's tensors have no MatMulNBits node .* "
                                          r"layers\.0\.mlp\.down_proj"):
        lower_codes(path, weights, 4)
