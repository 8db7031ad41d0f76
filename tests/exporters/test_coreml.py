"""Real .mlpackage files from tiny Llamas, executed op by op by the MIL interpreter (Linux has no Core ML)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("coremltools")

from compress.exporters import coreml
from compress.exporters.coreml import ComputeUnits, CoreMLExporter, MlpackageOptions  # noqa: E402
from compress.exporters.base import source_card
from compress.exporters.llama import AttentionBackend, ExportLlama
from compress.runtimes.coreml import CoreMLRuntime
from compress.runtimes.mil_interpreter import load_program

from compress.artifact import Dtype  # noqa: E402
from compress.config import parse  # noqa: E402
from compress.coreml_io import CoreMLIO, causal_mask
from compress.errors import ConfigError, ExportError, InputError  # noqa: E402
from compress.models.tiny import byte_tokenizer, tiny_llama  # noqa: E402
from compress.progress import Console  # noqa: E402
from compress.quantized import Precision, QuantizeConfig
from compress.stages.quant_plan import quantize_model

QUIET = Console(quiet=True)
GPU = ComputeUnits.CPU_AND_GPU
INT4 = QuantizeConfig(weight_bits=4, group_size=32, embedding=Precision.INT8, lm_head=Precision.INT8)
TOKENS = list(range(10, 50))


HUB_SNAPSHOT = "/hub/models--HuggingFaceTB--SmolLM2-135M-Instruct/snapshots/12fd25f"  # huggingface_hub's cache layout


def _export(root: Path, name: str, quantize: QuantizeConfig | None = None, hub: str = "", **options) -> object:
    """A tiny Llama exported as a package; with `quantize`, the quantize stage's codes lowered into it."""
    options = {"max_context": 64, "compute_units": GPU, **options}
    model, codes = quantize_model(tiny_llama(seed=0), quantize) if quantize else (tiny_llama(seed=0), None)
    if hub:
        model.config._name_or_path = hub
    return CoreMLExporter().export(model, byte_tokenizer(), MlpackageOptions(**options), root / name, QUIET, codes)


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    root = tmp_path_factory.mktemp("coreml")
    return {"fp32": _export(root, "fp32", compute_precision=Dtype.FLOAT32), "fp16": _export(root, "fp16", hub=HUB_SNAPSHOT),
            "int4": _export(root, "int4", quantize=INT4),
            "fixed": _export(root, "fixed", io=CoreMLIO.FIXED_SHAPE, query_lengths=(1, 8),
                             compute_precision=Dtype.FLOAT32)}


def _run(artifact, tokens: list[int], split: int) -> np.ndarray:
    """Prefill tokens[:split] (apple_llama: one call; fixed_shape (1, 8): 8, 8, then a padded call), decode the
    rest one by one."""
    session = CoreMLRuntime().load(artifact, threads=2)
    return np.concatenate([session.prefill(tokens[:split])] + [session.decode(t)[None] for t in tokens[split:]])


@pytest.mark.parametrize("name", ["fp32", "fixed"])
def test_an_fp32_package_matches_the_pytorch_module_to_float_tolerance(packages, name):
    if name == "fixed":
        module = ExportLlama.from_hf(tiny_llama(seed=0), 64, AttentionBackend.COREML, fp16_safe_norm=True)
        second = torch.tensor([0], dtype=torch.int32)
    else:
        module = ExportLlama.from_hf(tiny_llama(seed=0), 64, AttentionBackend.COREML_STACKED, fp16_safe_norm=True)
        second = torch.zeros(1, 1, len(TOKENS), len(TOKENS))
    with torch.no_grad():
        expected = module(torch.tensor([TOKENS], dtype=torch.int32), second)[0]
    got = _run(packages[name], TOKENS, split=21)  # a prefill of 21 (fixed: 8 + 8 + a padded 5), 19 decode steps
    np.testing.assert_allclose(got, expected.numpy(), atol=2e-4, rtol=2e-4)


def test_apple_llama_takes_the_masks_of_apples_example_and_of_swift_transformers(packages):
    """The same logits whether the caller sends Apple's causal mask (-inf above the diagonal), swift-transformers'
    all-zero (1, 1, 1, end) one, or prefills in uneven chunks: the program masks causally itself and takes its
    position from the mask's length."""
    from compress.runtimes.mil_interpreter import MilInterpreter

    program, _ = load_program(packages["fp32"].path / "model.mlpackage")
    interpreter = MilInterpreter(program)

    def run(chunks: list[int], zeros: bool) -> np.ndarray:
        interpreter.reset()
        rows, past = [], 0
        for n in chunks:
            ids = np.array([TOKENS[past:past + n]], dtype=np.int32)
            mask = np.zeros((1, 1, 1, past + n), np.float16) if zeros else causal_mask(n, past)
            rows.append(interpreter.run({"inputIds": ids, "causalMask": mask})["logits"][0])
            past += n
        return np.concatenate(rows)

    apple = run([21] + [1] * 19, zeros=False)
    np.testing.assert_allclose(run([21] + [1] * 19, zeros=True), apple, atol=1e-5)
    np.testing.assert_allclose(run([5, 16, 3, 1, 15], zeros=False), apple, atol=1e-4)
    assert causal_mask(2, 3).shape == (1, 1, 2, 5) and np.isinf(causal_mask(2, 3)[0, 0, 0, 4])


def test_an_fp16_package_stays_close_to_the_reference_and_carries_its_state(packages):
    hf = tiny_llama(seed=0)
    with torch.no_grad():
        expected = hf(torch.tensor([TOKENS])).logits[0].numpy()  # (40, vocab)
    got = _run(packages["fp16"], TOKENS, split=17)
    np.testing.assert_allclose(got, expected, atol=0.15, rtol=0.05)  # fp16 rounding, op by op
    assert (got.argmax(-1) == expected.argmax(-1)).mean() > 0.95
    # Decode depends on what prefill left in the states: the same token after another history differs.
    session = CoreMLRuntime().load(packages["fp16"], threads=2)
    session.prefill(TOKENS[:5])
    after_other = session.decode(TOKENS[17])
    session.reset()
    np.testing.assert_allclose(session.prefill(TOKENS[:3]), got[:3], atol=1e-6)  # reset forgets everything
    assert np.abs(after_other - got[17]).max() > 0.1


def _ranges(feature) -> list[tuple[int, int]]:
    return [(r.lowerBound, r.upperBound) for r in feature.type.multiArrayType.shapeRange.sizeRanges]


def test_the_package_follows_apples_llama_convention_and_records_what_an_app_needs(packages):
    """What swift-transformers' LanguageModel checks before it takes the stateful path (inputIds with a ranged
    length, both keyCache and valueCache states), read back from the saved package, plus Xcode's model page."""
    art = packages["fp16"]
    assert {"model.mlpackage/Manifest.json", "tokenizer.json", "compress-mlpackage.json"} <= set(art.files)
    sidecar = json.loads((art.path / "compress-mlpackage.json").read_text())
    assert sidecar["io"] == "apple_llama" and sidecar["query_lengths"] == [] and art.query_lengths == ()
    assert sidecar["max_context"] == 64 and sidecar["eos_ids"] == [257]
    assert sidecar["compute_units"] == "cpu_and_gpu" and art.compute_units == "cpu_and_gpu"
    assert sidecar["states"] == ["keyCache", "valueCache"] and list(sidecar["inputs"]) == ["inputIds", "causalMask"]
    _, spec = load_program(art.path / "model.mlpackage")
    assert spec.specificationVersion >= 9  # iOS 18 / macOS 15: states
    inputs = {f.name: f for f in spec.description.input}
    assert list(inputs) == ["inputIds", "causalMask"] and [o.name for o in spec.description.output] == ["logits"]
    assert _ranges(inputs["inputIds"]) == [(1, 1), (1, 64)]  # ranged: swift-transformers needs max - min > 1
    assert _ranges(inputs["causalMask"]) == [(1, 1), (1, 1), (1, 64), (1, 64)]
    assert inputs["causalMask"].type.multiArrayType.dataType == ct_fp16()
    states = {s.name: list(s.type.stateType.arrayType.shape) for s in spec.description.state}
    assert states == {"keyCache": [2, 1, 2, 64, 16], "valueCache": [2, 1, 2, 64, 16]}  # (layers, 1, kv, ctx, d)
    # What Xcode's model page and swift-transformers read, from the saved package.
    meta = spec.description.metadata
    assert "a Llama causal LM (2 layers, vocabulary 259" in meta.shortDescription
    assert "a 64-position KV cache as states" in meta.shortDescription and meta.versionString == "0.1.0"
    assert meta.author and meta.license and meta.userDefined["compress.io"] == "apple_llama"
    assert meta.userDefined["co.huggingface.exporters.name"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "compress.query_lengths" not in meta.userDefined
    described = {d.name: d.shortDescription for d in [*spec.description.input, *spec.description.output,
                                                       *spec.description.state]}
    assert len(described) == 2 + 1 + 2 and all(described.values())
    assert described["valueCache"].startswith("Every layer's cached values")
    assert "end - q" in described["causalMask"]


def ct_fp16() -> int:
    from coremltools.proto import FeatureTypes_pb2

    return FeatureTypes_pb2.ArrayFeatureType.FLOAT16


def test_fixed_shape_keeps_enumerated_lengths_and_a_state_per_layer(packages):
    art = packages["fixed"]
    sidecar = json.loads((art.path / "compress-mlpackage.json").read_text())
    assert sidecar["io"] == "fixed_shape" and sidecar["query_lengths"] == [1, 8] and art.query_lengths == (1, 8)
    assert len(sidecar["states"]) == 4 and sidecar["states"][0] == "layers_0_self_attn_k_cache"
    program, spec = load_program(art.path / "model.mlpackage")
    inputs = program.functions["main"].inputs
    assert [n for n in inputs][:2] == ["tokens", "input_pos"] and len(inputs) == 2 + 4
    shapes = spec.description.input[0].type.multiArrayType.enumeratedShapes.shapes
    assert sorted(list(s.shape) for s in shapes) == [[1, 1], [1, 8]]
    meta = spec.description.metadata
    assert meta.userDefined["compress.query_lengths"] == "1,8" and "co.huggingface.exporters.name" not in meta.userDefined
    described = {d.name: d.shortDescription for d in [*spec.description.input, *spec.description.output,
                                                       *spec.description.state]}
    assert len(described) == 2 + 1 + 4 and all(described.values())
    assert described["layers_1_self_attn_v_cache"].startswith("Layer 1's cached values")


def test_the_hub_id_comes_from_huggingface_hubs_cache_layout_only():
    model = tiny_llama(seed=0)
    model.config._name_or_path = HUB_SNAPSHOT
    assert (source_card(model).hub_id, source_card(model).name) == ("HuggingFaceTB/SmolLM2-135M-Instruct",
                                                                     "SmolLM2-135M-Instruct")
    for path in ("/data/models/smollm2", "/x/snapshots/abc", "org/name"):
        model.config._name_or_path = path
        assert source_card(model).hub_id == ""


def test_int4_per_block_compresses_every_linear_and_shares_the_tied_matrix(packages):
    cov = packages["int4"].record["coverage"]
    assert (cov["linears_quantized"], cov["linears_total"], cov["linears_not_compressed"]) == (15, 15, [])
    assert cov["tied_storage"] == "one shared compressed copy" and cov["embedding_compressed"]
    ops = {op.op_type for op in load_program(packages["int4"].path / "model.mlpackage")[0]
           .functions["main"].operations}
    assert "constexpr_blockwise_shift_scale" in ops
    weight_bytes = lambda a: (a.path / "model.mlpackage/Data/com.apple.CoreML/weights/weight.bin").stat().st_size
    assert weight_bytes(packages["int4"]) < weight_bytes(packages["fp16"]) / 2.4  # tiny: fp16 scales weigh (2.6x)
    got = _run(packages["int4"], TOKENS[:20], split=12)
    with torch.no_grad():
        expected = tiny_llama(seed=0)(torch.tensor([TOKENS[:20]])).logits[0].numpy()
    assert (got.argmax(-1) == expected.argmax(-1)).mean() > 0.6  # compressed, still the same model


def test_an_untied_lm_head_gets_its_own_codes(tmp_path: Path):
    model = tiny_llama(seed=0, tie_word_embeddings=False)
    staged, codes = quantize_model(model, QuantizeConfig(weight_bits=8, group_size=None, lm_head=Precision.INT4))
    art = CoreMLExporter().export(staged, byte_tokenizer(), MlpackageOptions(max_context=64, compute_units=GPU),
                                  tmp_path / "untied", QUIET, codes)
    cov = art.record["coverage"]
    assert cov["tied_storage"] == "untied" and cov["linears_quantized"] == 15 and cov["linears_not_compressed"] == []


def test_a_context_beyond_the_model_fails_before_conversion_and_writes_nothing(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(CoreMLExporter, "_convert", lambda *a, **k: pytest.fail("converted anyway"))
    with pytest.raises(InputError, match="max_context 128 exceeds the model's max_position_embeddings 64"):
        CoreMLExporter().export(tiny_llama(seed=0, max_position_embeddings=64), byte_tokenizer(),
                                MlpackageOptions(max_context=128, compute_units=GPU), tmp_path / "x", QUIET)
    assert list(tmp_path.iterdir()) == []


def test_a_failure_after_conversion_leaves_no_half_written_package(tmp_path: Path, monkeypatch):
    def broken(*_):
        raise ExportError("compression failed")

    monkeypatch.setattr(coreml, "lower_codes", broken)
    with pytest.raises(ExportError, match="compression failed"):
        _export(tmp_path, "x", quantize=INT4)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("raw,fragment", [
    ({"io": "fixed_shape", "compute_units": "cpu_and_ne", "compute_precision": "float32"},
     "float32 cannot run on the Neural Engine"),
    ({"io": "fixed_shape", "max_context": 32, "query_lengths": [1, 64]}, "each must be in 1..max_context (32)"),
    ({"io": "fixed_shape", "query_lengths": [8, 64]}, "must contain 1 (decode)"),
    ({"query_lengths": [1, 64]}, "enumerated lengths are for io: fixed_shape"),
    ({"compute_units": "cpu_and_ne"}, "ranged shapes run on the Neural Engine at their default shape only"),
    ({"io": "dynamic"}, "choose one of 'apple_llama', 'fixed_shape'"),
    ({"max_context": 100000}, "max_context: 100000 is out of range"),
    ({"minimum_deployment_target": "iOS17"}, "choose one of 'iOS18', 'macOS15'"),
    ({"compute_precision": "bfloat16"}, "choose one of 'float16', 'float32'"),
])
def test_configs_apple_backends_cannot_honour_are_refused_naming_the_choices(raw, fragment):
    with pytest.raises(ConfigError, match=None) as err:
        parse(MlpackageOptions, {"compute_units": "cpu_and_gpu", **raw}, "export")
    assert fragment in str(err.value)


def test_per_channel_codes_are_fine_on_the_neural_engine():
    assert MlpackageOptions(io=CoreMLIO.FIXED_SHAPE, compute_units=ComputeUnits.CPU_AND_NE).codes_problems(
        QuantizeConfig(weight_bits=8, group_size=None)) == []


def test_without_coremltools_the_build_stops_with_exit_5_naming_the_extra(monkeypatch):
    import importlib.util

    from compress.build import check_available
    from compress.errors import RuntimeUnavailable
    from compress.targets import load_targets

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "coremltools" else real(name, *a))
    with pytest.raises(RuntimeUnavailable, match=r"pip install 'compress\[coreml\]'") as err:
        check_available(load_targets().get("ios"), verify=True)
    assert err.value.exit_code == 5
