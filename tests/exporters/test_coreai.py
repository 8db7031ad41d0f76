"""Core AI: a tiny Llama through exporters/coreai.py, run by Apple's Core AI runtime (coreai-core's interpreter on
Linux), against eager PyTorch; the CLI build gated on its budgets; damaged weights caught."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("coreai_torch")
pytest.importorskip("coreai")

from compress.exporters.coreai import AimodelOptions, CoreAIExporter, state_names
from compress.exporters.coreai_codes import place_codes
from compress.exporters.llama import AttentionBackend, ExportLlama
from compress.runtimes.base import ContextOverflow
from compress.runtimes.coreai import CoreAIRuntime

from compress.artifact import AppleComputeUnit, Dtype
from compress.errors import InputError
from compress.metrics import position_kl
from compress.models.tiny import byte_tokenizer, tiny_llama
from compress.progress import Console
from compress.quantized import Precision, QuantizeConfig, QuantizedWeights
from compress.stages.quant_plan import quantize_model

QUIET = Console(quiet=True)
TOKENS = list(range(10, 50))
INT4 = QuantizeConfig(weight_bits=4, group_size=32, embedding=Precision.INT8, lm_head=Precision.INT8)


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=0)


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("coreai")
    return {p: CoreAIExporter().export(model, byte_tokenizer(), AimodelOptions(max_context=64, compute_precision=p),
                                       root / p.value, QUIET) for p in (Dtype.FLOAT32, Dtype.FLOAT16)}


def _eager(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


@pytest.mark.parametrize("precision, atol", [(Dtype.FLOAT32, 2e-2), (Dtype.FLOAT16, 0.15)])
def test_apples_runtime_computes_what_eager_pytorch_does_in_chunks_and_single_steps(model, exported, precision, atol):
    """Prefill in two chunks, then decode steps, through the states; fp32 differs from eager only by the fp16 KV
    cache, fp16 by its weights and arithmetic too."""
    artifact = exported[precision]
    session = CoreAIRuntime().load(artifact, threads=2)
    got = np.concatenate([session.prefill(TOKENS[:25]), session.prefill(TOKENS[25:38]),
                          session.decode(TOKENS[38])[None], session.decode(TOKENS[39])[None]])
    want = _eager(model, TOKENS)
    assert got.shape == want.shape == (40, 259)
    np.testing.assert_allclose(got, want, atol=atol, rtol=0)  # logits up to ~10 in size
    assert float(np.mean(position_kl(want, got))) < 1e-3 and np.mean(got.argmax(1) == want.argmax(1)) >= 0.95
    session.reset()  # a new sequence sees nothing of the old one
    np.testing.assert_allclose(session.prefill(TOKENS[:25]), got[:25], atol=1e-6, rtol=0)


def test_the_asset_declares_its_function_inputs_and_states(exported):
    artifact = exported[Dtype.FLOAT16]
    assert artifact.main == "model.aimodel" and (artifact.path / "model.aimodel").is_dir()
    sidecar = json.loads((artifact.path / "compress-aimodel.json").read_text())
    assert list(sidecar["states"]) == state_names(2) and sidecar["compute_precision"] == "float16"
    session = CoreAIRuntime().load(artifact, threads=1)
    assert session._names == state_names(2)  # what Apple's runtime reports for the function
    assert artifact.size_bytes() < exported[Dtype.FLOAT32].size_bytes() * 0.6  # fp16 weights


def test_the_asset_carries_its_metadata_and_described_io_read_back_by_coreai(exported):
    """Read back with coreai-core's own asset reader: author, license, description, compress's custom entries
    (one description per input, output and state, matching the function's real names), the OS release."""
    from coreai.authoring import AIModelAsset

    asset = AIModelAsset.load(exported[Dtype.FLOAT16].path / "model.aimodel")
    meta = asset.metadata
    assert meta.author and meta.license and meta.model_description.startswith("llama: a Llama causal LM")
    assert "2 layers" in meta.model_description and "float16 weights" in meta.model_description
    custom = meta.creator_defined_metadata  # `custom_metadata` in the stub; the binary names it so
    assert custom["compress.max_context"] == 64 and custom["compress.function"] == "main"
    summary = asset.summary(include_statistics=False)
    assert sorted(custom["compress.inputs"]) == sorted(name for name, _ in summary.function_inputs("main"))
    assert list(custom["compress.outputs"]) == [name for name, _ in summary.function_outputs("main")]
    assert sorted(custom["compress.states"]) == sorted(state_names(2))  # stored as an unordered JSON object
    assert all("(64 positions" in text for text in custom["compress.states"].values())
    assert summary._compatibility_version.startswith("27")


def test_the_session_refuses_to_run_past_max_context(exported):
    session = CoreAIRuntime().load(exported[Dtype.FLOAT16], threads=1)
    session.prefill(list(range(60)))
    session.decode(1)
    with pytest.raises(ContextOverflow, match="position 65 exceeds max_context 64"):
        session.prefill([2, 3, 4, 5])


def _run(artifact) -> np.ndarray:
    session = CoreAIRuntime().load(artifact, threads=2)
    return np.concatenate([session.prefill(TOKENS[:25]), session.prefill(TOKENS[25:38]),
                           session.decode(TOKENS[38])[None], session.decode(TOKENS[39])[None]])


def test_the_stages_codes_go_in_as_they_are_and_shrink_the_asset(tmp_path):
    """The stage's 4-bit codes (and the tied 8-bit lm_head / embedding) as Core AI's compressed weights: Apple's
    runtime computes exactly what an fp32 asset of the dequantized weights does (nothing re-rounded), from one
    stored copy of the tied matrix, in a third of the size."""
    staged, codes = quantize_model(tiny_llama(seed=0), INT4)
    fp32 = AimodelOptions(max_context=64, compute_precision=Dtype.FLOAT32)
    coded = CoreAIExporter().export(staged, byte_tokenizer(), fp32, tmp_path / "codes", QUIET, codes)
    plain = CoreAIExporter().export(staged, byte_tokenizer(), fp32, tmp_path / "plain", QUIET)
    cov = coded.record["coverage"]
    assert (cov["linears_quantized"], cov["linears_total"], cov["bits_histogram"]) == (15, 15, {"4": 14, "8": 1})
    assert cov["embedding"].startswith("int8, the lm_head's codes") and cov["offsets_rounded_to_fp16"] == 0
    assert coded.size_bytes() < plain.size_bytes() / 3
    np.testing.assert_array_equal(_run(coded), _run(plain))
    extra = QuantizedWeights({**codes.tensors, "layers.9.mlp.up_proj": codes.tensors["lm_head"]}, codes.config,
                             codes.promoted_to_8bit)
    with pytest.raises(ValueError, match="does not have"):  # codes for a linear the module lacks: never dropped
        place_codes(ExportLlama.from_hf(staged, 64, AttentionBackend.COREAI), extra, True, torch.float32)


def test_an_fp16_asset_with_codes_stays_close_to_eager(tmp_path):
    staged, codes = quantize_model(tiny_llama(seed=0), INT4)
    coded = CoreAIExporter().export(staged, byte_tokenizer(), AimodelOptions(max_context=64), tmp_path / "c", QUIET,
                                    codes)
    got, want = _run(coded), _eager(staged, TOKENS)
    np.testing.assert_allclose(got, want, atol=0.15, rtol=0)
    assert float(np.mean(position_kl(want, got))) < 1e-3


def test_what_core_ai_cannot_hold_is_refused_when_the_target_is_read(model, tmp_path):
    assert AimodelOptions().codes_problems(QuantizeConfig(weight_bits=4, group_size=32)) == []
    from compress.targets import load_targets

    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "targets": {"c": {
        "stages": [{"quantize": {"weight_bits": 4, "group_size": 32, "activations": "int8_dynamic"}}],
        "export": {"format": "aimodel"}, "runtime": "coreai"}}}))
    with pytest.raises(Exception, match="'int8_dynamic' is not supported for aimodel"):
        load_targets(path)
    path.write_text(yaml.safe_dump({"version": 1, "targets": {"c": {
        "export": {"format": "aimodel", "minimum_os": "v26"}, "runtime": "coreai"}}}))
    with pytest.raises(Exception, match=r"export.minimum_os: 'v26' is not allowed; choose one of 'v27'"):
        load_targets(path)
    with pytest.raises(InputError, match="max_context: 4096 exceeds"):
        CoreAIExporter().export(model, byte_tokenizer(), AimodelOptions(max_context=4096), tmp_path / "x", QUIET)
    assert not (tmp_path / "x").exists()


def test_a_cli_build_passes_its_budgets_and_damaged_weights_fail_verify(tiny_dir: Path, tmp_path: Path, cli):
    """`compress build` of an aimodel target, verified by Apple's runtime; then the program damaged and re-hashed
    into the manifest: Apple's loader aborts on it (SIGABRT), which the child-process probe turns into a refusal
    gated like a broken budget (exit 4, one line), never a crash of the command."""
    from compress.hashing import sha256_file

    targets = tmp_path / "targets.yaml"
    targets.write_text(yaml.safe_dump({"version": 1, "targets": {"c": {
        "export": {"format": "aimodel", "max_context": 128}, "runtime": "coreai",
        "eval": {"window_len": 32, "prefill_len": 16, "decode_tokens": 8, "greedy_tokens": 4},
        "budgets": {"max_mean_kl": 0.01, "min_top1_agreement": 0.9}}}}))
    out = tmp_path / "out"
    built = cli("build", "--target", "c", "--model", str(tiny_dir), "--targets", str(targets), "--out", str(out))
    assert built.code == 0, built.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["verification"]["latency"] == {}  # the interpreter is not device speed: never timed
    assert manifest["verification"]["metrics"]["mean_kl"] < 1e-3  # fp16 weights and arithmetic
    # The runtime's native line stays out of the console, in the build's logs/.
    assert "ODIE" not in built.stderr and "Loading function" in (out / "logs" / "coreai.log").read_text()
    assert "program(s) to Core AI" not in built.stdout + built.stderr  # the converter's banner: not in the console
    blob = out / "coreai" / "model.aimodel" / "main.mlirb"
    data = bytearray(blob.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = bytes(4096)  # zeros over weights in the middle of the program
    blob.write_bytes(bytes(data))
    for entry in manifest["artifact"]["file_hashes"]:
        path = out / "coreai" / entry["path"]
        entry["sha256"], entry["bytes"] = sha256_file(path), path.stat().st_size
    (out / "manifest.json").write_text(json.dumps(manifest))
    result = cli("verify", str(out))
    assert result.code == 4, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "coreai refused to load the artifact" in last and "Traceback" not in result.stderr, result.stderr


def test_a_probe_killed_once_is_tried_again_and_a_second_death_is_a_refusal(tmp_path, monkeypatch):
    """Apple's loader once aborted on a good asset; a damaged one aborts every time (the test above)."""
    import subprocess

    from compress.runtimes import coreai as runtime

    monkeypatch.setenv("COMPRESS_NATIVE_LOGS", str(tmp_path / "logs"))
    codes = iter([-6, 0, -6, -6])
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, next(codes), "", "abort"))
    assert runtime._child_cannot_run("a", "model.aimodel", 64, 1, 8, "", (("x", 1, 1),)) == ""
    assert "SIGABRT loading model.aimodel in a probe process; trying once more" in (
        tmp_path / "logs" / "coreai.log").read_text()
    assert runtime._child_cannot_run("a", "model.aimodel", 64, 1, 8, "", (("x", 1, 2),)) == \
        "Core AI's runtime died with SIGABRT loading model.aimodel"


def test_the_recorded_compute_unit_picks_apples_specialization_where_the_platform_has_one(exported, monkeypatch):
    """Linux's interpreter has no specialization: the session loads the asset as it is. Where coreai-core says it
    specializes (macOS 27 with the OS runtime; simulated here, never run: no Mac), each compute unit maps onto its
    SpecializationOptions constructor."""
    from compress.runtimes import coreai as runtime
    from coreai.runtime import SpecializationOptions

    assert exported[Dtype.FLOAT16].compute_units == "default"
    assert not SpecializationOptions.is_supported() and runtime._specialization("gpu") is None
    monkeypatch.setattr(SpecializationOptions, "is_supported", staticmethod(lambda: True))
    monkeypatch.setattr(SpecializationOptions, "default", classmethod(lambda cls: "default"))
    monkeypatch.setattr(SpecializationOptions, "cpu_only", classmethod(lambda cls: "cpu_only"))
    monkeypatch.setattr(SpecializationOptions, "from_preferred_compute_unit_kind",
                        classmethod(lambda cls, kind: f"preferred {kind}"))

    class Kinds:
        gpu = staticmethod(lambda: "gpu")
        neural_engine = staticmethod(lambda: "neural engine")

    import coreai.runtime

    monkeypatch.setattr(coreai.runtime, "ComputeUnitKind", Kinds, raising=False)
    got = {unit.value: runtime._specialization(unit.value) for unit in AppleComputeUnit}
    assert got == {"default": "default", "cpu": "cpu_only", "gpu": "preferred gpu",
                   "neural_engine": "preferred neural engine"}
    assert runtime._specialization("") is None  # an artifact recorded before the option existed
