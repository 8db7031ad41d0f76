"""Real ONNX folders from tiny Llamas, executed in ONNX Runtime and loaded by onnxruntime-genai."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime_genai")

from compress.exporters.onnx import OnnxDeploy, OnnxExporter, OnnxOptions, _check_graph
from compress.runtimes.onnxruntime import KvMode, OnnxRuntimeRuntime

from compress.errors import ExportError, InputError
from compress.metrics import position_kl
from compress.models.tiny import byte_tokenizer, tiny_llama
from compress.progress import Console
from compress.quantized import Activations, Precision, QuantizeConfig
from compress.stages.quant_plan import quantize_model

QUIET = Console(quiet=True)
INT4 = QuantizeConfig(weight_bits=4, group_size=32, symmetric=False, activations=Activations.INT8_DYNAMIC,
                      embedding=Precision.INT8, lm_head=Precision.INT8)
INT8 = QuantizeConfig(weight_bits=8, group_size=32, activations=Activations.INT8_DYNAMIC,
                      embedding=Precision.INT8, lm_head=Precision.INT8)
TOKENS = list(range(10, 50))


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=0)


@pytest.fixture(scope="module")
def expected(model):
    with torch.no_grad():
        return model(torch.tensor([TOKENS])).logits[0].numpy()  # (40, vocab)


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    fp32 = _export(model, None, OnnxOptions(max_context=96), root / "fp32")
    int4 = _export(model, INT4, OnnxOptions(max_context=96, deploy=OnnxDeploy.WEB), root / "int4")
    int8 = _export(model, INT8, OnnxOptions(max_context=96), root / "int8")
    return {"fp32": fp32, "int4": int4, "int8": int8}


def _export(model, q: QuantizeConfig | None, options: OnnxOptions, path: Path):
    """The folder for `model`, with the quantize stage's codes for `q` lowered into it (fp32 without)."""
    staged, codes = quantize_model(model, q) if q is not None else (model, None)
    return OnnxExporter().export(staged, byte_tokenizer(), options, path, QUIET, codes)


def _logits(artifact, kv_mode=None, chunks=(25,)):
    """Prefill in the given chunk boundaries, then decode the rest one token at a time."""
    session = OnnxRuntimeRuntime().load(artifact, threads=2, kv_mode=kv_mode or KvMode.SHARED)
    parts, start = [], 0
    for end in chunks:
        parts.append(session.prefill(TOKENS[start:end]))
        start = end
    parts += [session.decode(t)[None] for t in TOKENS[start:]]
    return np.concatenate(parts), session


@pytest.mark.parametrize("kv_mode", list(KvMode))
@pytest.mark.parametrize("chunks", [(25,), (10, 25)])
def test_fp32_graph_matches_eager_for_prefill_chunks_and_decode(exported, expected, kv_mode, chunks):
    got, session = _logits(exported["fp32"], kv_mode, chunks)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
    session.reset()  # a second sequence sees nothing of the first
    np.testing.assert_allclose(session.prefill(TOKENS[:5]), expected[:5], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["fp32", "int4", "int8"])
def test_a_prompt_computes_only_its_last_positions_logits_and_they_equal_every_positions_last(exported, kind):
    session = OnnxRuntimeRuntime().load(exported[kind], threads=2)
    every = session.prefill(TOKENS)
    session.reset()
    assert session._run(TOKENS, keep=1).shape == (1, every.shape[1])  # the lm_head ran on one row
    session.reset()
    np.testing.assert_allclose(session.prefill_last(TOKENS), every[-1], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(session.decode(7), OnnxRuntimeRuntime().load(exported[kind], threads=2)
                               .prefill([*TOKENS, 7])[-1], atol=1e-4, rtol=1e-4)


def test_quantized_graphs_cover_every_matmul_and_share_the_tied_embedding(exported):
    cov4, cov8 = exported["int4"].record["coverage"], exported["int8"].record["coverage"]
    assert cov4["matmuls_quantized"] == cov4["matmuls_total"] == 11  # 2 x (qkv, o, gate, up, down) + lm_head
    assert cov4["matmulnbits_bits"] == {"4": 10, "8": 1}  # int8 output layer
    assert cov8["matmulnbits_bits"] == {"8": 11}
    for name in ("int4", "int8"):
        cov = exported[name].record["coverage"]
        assert cov["embedding_op"] == "GatherBlockQuantized" and not cov["unquantized_matmuls"]
        assert "com.microsoft::GroupQueryAttention" in cov["ops"] and not cov["missing_io"]
    sidecar = json.loads((exported["int8"].path / "compress-onnx.json").read_text())
    assert sidecar["builder_options"]["precision"] == "int8" and sidecar["max_context"] == 96
    genai = json.loads((exported["int8"].path / "genai_config.json").read_text())
    assert genai["search"]["max_length"] == 96
    import onnx

    graph = onnx.load(str(exported["int8"].path / exported["int8"].main), load_external_data=False).graph
    names = {t.name for t in graph.initializer}
    assert "model.embed_tokens.weight" not in names  # one quantized copy of the tied matrix, no fp32 one


def test_quantized_graphs_stay_close_to_eager_and_int8_closer_than_int4(exported, expected):
    kl4 = float(np.mean(position_kl(expected, _logits(exported["int4"])[0])))
    kl8 = float(np.mean(position_kl(expected, _logits(exported["int8"])[0])))
    assert kl8 < kl4 < 0.5
    assert kl8 < 0.02


def test_the_shared_int8_embedding_decodes_like_the_fp32_one(model, exported, tmp_path):
    """The embedding pass reads the output layer's int8 codes: same logits as an fp32 embedding, within int8. The
    fp32-embedding twin is the same weights untied (a tied matrix is quantized once, for both uses)."""
    twin = tiny_llama(seed=0, tie_word_embeddings=False)
    with torch.no_grad():
        twin.model.embed_tokens.weight.copy_(model.model.embed_tokens.weight)
        twin.lm_head.weight.copy_(model.model.embed_tokens.weight)
        for (name, p), (_, q) in zip(twin.model.named_parameters(), model.model.named_parameters()):
            p.copy_(q)
    fp32_embedding = QuantizeConfig(weight_bits=8, group_size=32, activations=Activations.INT8_DYNAMIC,
                                    embedding=Precision.FP32, lm_head=Precision.INT8)
    plain = _export(twin, fp32_embedding, OnnxOptions(max_context=96), tmp_path / "plain")
    assert plain.record["coverage"]["embedding_op"] == "Gather"
    assert exported["int8"].record["coverage"]["embedding_op"] == "GatherBlockQuantized"
    a, b = _logits(plain)[0], _logits(exported["int8"])[0]
    assert float(np.mean(position_kl(a, b))) < 0.01


def test_onnxruntime_genai_loads_the_folder_and_generates_what_our_session_generates(exported):
    import onnxruntime_genai as og

    artifact = exported["int8"]
    session = OnnxRuntimeRuntime().load(artifact, threads=2)
    ours, logits = [], session.prefill(TOKENS[:12])[-1]
    for _ in range(12):
        ours.append(int(logits.argmax()))
        logits = session.decode(ours[-1])
    model = og.Model(str(artifact.path))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=24)
    generator = og.Generator(model, params)
    generator.append_tokens(TOKENS[:12])
    while not generator.is_done():
        generator.generate_next_token()
    assert list(generator.get_sequence(0))[12:] == ours


def test_an_opset_the_deploying_runtime_cannot_run_fails_and_leaves_nothing(model, tmp_path):
    with pytest.raises(ExportError, match="needs ai.onnx opset 22; export.max_opset is 21"):
        OnnxExporter().export(model, byte_tokenizer(), OnnxOptions(max_context=64, max_opset=21),
                              tmp_path / "x", QUIET)
    assert list(tmp_path.iterdir()) == []


def test_context_beyond_the_model_is_refused(model, tmp_path):
    with pytest.raises(InputError, match="max_context: 4096 exceeds the model's max_position_embeddings 2048"):
        OnnxExporter().export(model, byte_tokenizer(), OnnxOptions(max_context=4096), tmp_path / "x", QUIET)


def test_a_web_graph_with_an_op_onnxruntime_web_lacks_fails(exported):
    graph = {**exported["int4"].record["coverage"], "ops": {"com.microsoft::MatMulNBits": 1, "com.microsoft::MoE": 1}}
    with pytest.raises(ExportError, match="ops not in onnxruntime-web's set: \\['com.microsoft::MoE'\\]"):
        _check_graph(graph, OnnxOptions(deploy=OnnxDeploy.WEB), INT4)
    _check_graph(graph, OnnxOptions(deploy=OnnxDeploy.DESKTOP), INT4)  # desktop runs anything ORT runs


WEB_RUNTIME = Path(__file__).resolve().parents[2] / ".web"


@pytest.mark.skipif(shutil.which("node") is None or not (WEB_RUNTIME / "node_modules" / "onnxruntime-web").exists(),
                    reason="needs node and onnxruntime-web in .web/ (make setup installs it)")
def test_the_web_folder_runs_under_onnxruntime_web_wasm_like_in_a_browser(exported):
    """onnxruntime-web's WASM build has every op of the web graph, and computes what desktop ORT computes."""
    artifact = exported["int4"]
    script = Path(__file__).resolve().parents[2] / "scripts" / "ort_web_run.mjs"
    proc = subprocess.run(["node", str(script), str(artifact.path), json.dumps(TOKENS)], capture_output=True,
                          text=True, cwd=WEB_RUNTIME, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    web = np.asarray(json.loads(proc.stdout)["logits"], dtype=np.float32)
    ours = OnnxRuntimeRuntime().load(artifact, threads=2, kv_mode=KvMode.CONCAT).prefill(TOKENS)
    # WASM's MatMulNBits quantizes activations slightly differently; a wrong op would be off by far more.
    assert float(np.mean(position_kl(ours, web))) < 0.01
    assert float(np.mean(web.argmax(1) == ours.argmax(1))) >= 0.95


TRANSFORMERS_JS = WEB_RUNTIME / "node_modules" / "@huggingface" / "transformers"


@pytest.mark.skipif(shutil.which("node") is None or not TRANSFORMERS_JS.exists(),
                    reason="needs node and @huggingface/transformers in .web/ (make setup installs it)")
@pytest.mark.parametrize("kind, dtype, graph_file", [("int4", "q4", "onnx/model_q4.onnx"),
                                                     ("int8", "q8", "onnx/model_quantized.onnx"),
                                                     ("fp32", "fp32", "onnx/model.onnx")])
def test_transformers_js_loads_the_folder_as_is_and_generates_what_onnx_runtime_does(exported, kind, dtype,
                                                                                     graph_file):
    """`AutoModelForCausalLM.from_pretrained(folder)` with no options (transformers.js 4.3 in Node, its `cpu` device:
    onnxruntime-node) finds the graph and its external data by the folder's layout and config.json, allocates its
    empty KV cache from the graph's input shapes, and its greedy tokens are ONNX Runtime's."""
    artifact = exported[kind]
    assert artifact.main == graph_file and f"{graph_file}_data" in artifact.files
    script = Path(__file__).resolve().parents[2] / "scripts" / "transformers_js_generate.mjs"
    steps = 12
    proc = subprocess.run(["node", str(script), str(artifact.path), json.dumps(TOKENS), str(steps)],
                          capture_output=True, text=True, cwd=WEB_RUNTIME, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout)
    assert got["dtype"] == dtype
    session = OnnxRuntimeRuntime().load(artifact, threads=2)
    prompt = session.prefill(TOKENS)[-1]
    # The same graph in onnxruntime-node 1.30 and onnxruntime 1.32: the same kernels, to float rounding.
    np.testing.assert_allclose(np.asarray(got["last_logits"], dtype=np.float32), prompt, atol=1e-3, rtol=1e-3)
    ours = [int(prompt.argmax())]
    while len(ours) < steps:
        ours.append(int(session.decode(ours[-1]).argmax()))
    eos = json.loads((artifact.path / "generation_config.json").read_text()).get("eos_token_id")
    # transformers.js stops at the end-of-sequence token; otherwise it runs all the steps.
    assert got["tokens"] == ours[:len(got["tokens"])] and (len(got["tokens"]) == steps or got["tokens"][-1] == eos)


def test_an_onnx_build_with_one_norm_flipped_and_re_hashed_fails_verify_with_exit_4(tiny_dir: Path, tmp_path: Path,
                                                                                      cli):
    """The manifest's hashes pass (the damage was re-hashed into it), so only the measurement can catch it: one
    RMSNorm gain negated breaks the KL budget, and `verify` exits 4 like any broken budget."""
    import onnx
    import yaml

    from compress.hashing import sha256_file

    targets = tmp_path / "targets.yaml"
    targets.write_text(yaml.safe_dump({"version": 1, "targets": {"w": {
        "export": {"format": "onnx", "max_context": 128}, "runtime": "onnxruntime",
        "eval": {"window_len": 32, "prefill_len": 16, "decode_tokens": 8, "latency": False},
        "budgets": {"max_mean_kl": 0.01}}}}))
    out = tmp_path / "out"
    built = cli("build", "--target", "w", "--model", str(tiny_dir), "--targets", str(targets), "--out", str(out))
    assert built.code == 0, built.stderr
    folder = out / "onnx"
    graph_file = folder / "onnx" / "model.onnx"  # an unquantized target: transformers.js's fp32 file name
    graph = onnx.load(str(graph_file))
    norm = next(t for t in graph.graph.initializer if t.name.endswith("layers.1.input_layernorm.weight"))
    norm.CopyFrom(onnx.numpy_helper.from_array(-onnx.numpy_helper.to_array(norm), norm.name))
    (folder / "onnx" / "model.onnx_data").unlink()
    onnx.save(graph, str(graph_file), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx_data", size_threshold=1024)
    manifest = json.loads((out / "manifest.json").read_text())
    for entry in manifest["artifact"]["file_hashes"]:
        entry["sha256"], entry["bytes"] = sha256_file(folder / entry["path"]), (folder / entry["path"]).stat().st_size
    (out / "manifest.json").write_text(json.dumps(manifest))
    result = cli("verify", str(out))
    assert result.code == 4, result.stderr
    assert "budget broken (max_mean_kl" in result.stderr.strip().splitlines()[-1] and "Traceback" not in result.stderr


def test_a_model_handed_over_is_freed_before_the_builder_loads_its_own_copy(tmp_path, monkeypatch):
    """The build hands the exporter the only reference to the stages' model: the fp32 weights are let go once
    written for the builder, so the parent and the builder's child never both hold them (at 1B, 4.9 GB)."""
    import gc
    import weakref

    from compress.exporters import onnx as onnx_exporter

    box = [tiny_llama(seed=0)]
    alive = weakref.ref(box[0])
    real = onnx_exporter._run_builder
    seen = {}

    def run_builder(*args, **kwargs):
        gc.collect()
        seen["model_alive"] = alive() is not None
        return real(*args, **kwargs)

    monkeypatch.setattr(onnx_exporter, "_run_builder", run_builder)
    art = OnnxExporter().export(box.pop(), byte_tokenizer(), OnnxOptions(max_context=96), tmp_path / "a", QUIET)
    assert seen == {"model_alive": False}
    config = json.loads((art.path / "config.json").read_text())
    assert config["vocab_size"] == tiny_llama(seed=0).config.vocab_size
    session = OnnxRuntimeRuntime().load(art, threads=2)
    assert session.prefill(TOKENS[:4]).shape[0] == 4
