"""Real .pte files from tiny Llamas, executed in the ExecuTorch runtime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("executorch")

from compress.exporters.executorch import ExecuTorchExporter, PteAttention, PteLogits, PteOptions  # noqa: E402
from compress.exporters.llama import AttentionBackend, ExportLlama
from compress.runtimes.executorch import ExecuTorchRuntime
from compress.runtimes.harness import measure_accuracy, run_reference
from compress.runtimes.torch_eager import TorchEagerRuntime

from compress.errors import InputError  # noqa: E402
from compress.models.tiny import byte_tokenizer, tiny_llama  # noqa: E402
from compress.progress import Console  # noqa: E402
from compress.quantized import Activations, Precision, QuantizeConfig
from compress.stages.quant_plan import quantize_model

QUIET = Console(quiet=True)
Q8DA4W = QuantizeConfig(weight_bits=4, group_size=32, activations=Activations.INT8_DYNAMIC,
                        embedding=Precision.INT8, lm_head=Precision.INT8)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = tiny_llama(seed=0)
    root = tmp_path_factory.mktemp("pte")
    exporter = ExecuTorchExporter()
    # Every position's logits from the fp32 program, so its multi-token calls are compared position by position
    fp32 = exporter.export(model, byte_tokenizer(), PteOptions(max_context=96, logits=PteLogits.ALL), root / "fp32",
                           QUIET)
    # The shipped default (XNNPACK attention) gets the strict float test; the 8da4w program uses ExecuTorch's
    # custom SDPA kernel, so both attention paths run in the real runtime.
    staged, codes = quantize_model(model, Q8DA4W)  # what the quantize stage hands the exporter
    q = exporter.export(staged, byte_tokenizer(), PteOptions(max_context=96, attention=PteAttention.CUSTOM_SDPA),
                        root / "q", QUIET, codes)
    return model, fp32, q


def test_fp32_program_matches_eager_for_prefill_and_decode(exported):
    model, fp32, _ = exported
    session = ExecuTorchRuntime().load(fp32, threads=2)
    tokens = list(range(10, 50))
    with torch.no_grad():
        expected = model(torch.tensor([tokens])).logits[0].numpy()  # (40, vocab)
    got = np.concatenate([session.prefill(tokens[:25])] + [session.decode(t)[None] for t in tokens[25:]])
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
    session.reset()  # a second sequence after reset sees none of the first
    np.testing.assert_allclose(session.prefill(tokens[:5]), expected[:5], atol=1e-4, rtol=1e-4)


def test_attention_reads_the_cache_prefix_in_xnnpack_up_to_the_last_slot(exported):
    """Attention runs inside XNNPACK over the written prefix of the cache (a size known only at run time), one
    partition before and one after each layer's cache update, and stays exact when the cache is full."""
    model, fp32, _ = exported
    cov = fp32.record["coverage"]
    assert not {"bmm", "_softmax", "linear"} & set(cov["non_delegated_ops"]), cov["non_delegated_ops"]
    assert cov["delegate_calls"] <= 2 * model.config.num_hidden_layers + 1
    tokens = [(7 * i) % 250 + 3 for i in range(96)]  # fills all 96 slots
    with torch.no_grad():
        expected = model(torch.tensor([tokens])).logits[0].numpy()
    session = ExecuTorchRuntime().load(fp32, threads=2)
    got = np.concatenate([session.prefill(tokens[:70])] + [session.decode(t)[None] for t in tokens[70:]])
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_the_program_carries_what_the_stock_runner_reads(exported):
    from executorch.runtime import Runtime

    _, fp32, _ = exported
    program = Runtime.get().load_program(fp32.path / "model.pte")
    meta = {name: program.load_method(name).execute([])[0] for name in
            ("get_max_context_len", "get_vocab_size", "get_bos_id", "use_kv_cache", "enable_dynamic_shape")}
    assert meta == {"get_max_context_len": 96, "get_vocab_size": 259, "get_bos_id": 256, "use_kv_cache": True,
                    "enable_dynamic_shape": True}
    assert {"model.pte", "tokenizer.json", "compress-pte.json"} <= set(fp32.files)
    sidecar = json.loads((fp32.path / "compress-pte.json").read_text())
    assert sidecar["eos_ids"] == [257] and sidecar["max_context"] == 96


def test_8da4w_quantizes_every_linear_delegates_them_and_stays_close(exported):
    model, fp32, q = exported
    cov = q.record["coverage"]
    assert (cov["linears_quantized"], cov["linears_total"]) == (15, 15)
    assert not any("linear" in op or "mm" in op for op in cov["non_delegated_ops"])
    assert cov["delegated_nodes"] > cov["non_delegated_nodes"]
    assert q.size_bytes() < fp32.size_bytes() / 2
    from compress.data.corpus import build_eval_set
    from compress.targets import EvalSpec

    tok = byte_tokenizer()
    spec = EvalSpec(windows=2, window_len=64, greedy_tokens=8)
    eval_set = build_eval_set(tok, spec)
    ref = run_reference(TorchEagerRuntime.session_for(model), eval_set, 8, {tok.eos_token_id}, QUIET)
    metrics, _ = measure_accuracy(ExecuTorchRuntime().load(q, 2), ref, eval_set, 8, {tok.eos_token_id},
                                  tok.decode, QUIET)
    assert 1e-4 < metrics["mean_kl"] < 0.5  # really quantized, still the same model
    assert metrics["top1_agreement"] > 0.7


def test_partitions_merge_in_graph_order_unless_a_node_outside_would_sit_between_them():
    """XNNPACK proposes partitions out of graph order and unmerged (91 for SmolLM2); merging them in graph order
    must join neighbours and must never join two partitions that a node outside both feeds from and into."""
    from compress.exporters.executorch import _merge_in_graph_order
    from torch.fx import Graph
    from torch.fx.passes.infra.partitioner import Partition

    graph = Graph()
    a = graph.call_function(torch.neg, (graph.placeholder("x"),))
    b = graph.call_function(torch.relu, (a,))  # stays outside: reads a, feeds c
    c = graph.call_function(torch.neg, (b,))
    d = graph.call_function(torch.sin, (c,))
    graph.output(d)

    def names(parts):
        return [sorted(n.name for n in p.nodes) for p in parts]

    proposed = [Partition(id=0, nodes=[d]), Partition(id=1, nodes=[c]), Partition(id=2, nodes=[a])]
    assert names(_merge_in_graph_order(proposed, graph)) == [[a.name], sorted([c.name, d.name])]
    chain = [Partition(id=i, nodes=[n]) for i, n in enumerate((c, a, b))]
    assert names(_merge_in_graph_order(chain, graph)) == [sorted([a.name, b.name, c.name])]


def test_a_program_without_its_weights_file_is_refused_in_one_line(exported, tmp_path: Path):
    import shutil


    _, fp32, _ = exported
    assert fp32.data == "model.ptd"  # external data is the default
    shutil.copytree(fp32.path, tmp_path / "copy")
    (tmp_path / "copy" / "model.ptd").unlink()
    moved = fp32.at(tmp_path / "copy")
    with pytest.raises(InputError, match=r"copy/model.ptd is missing: the program keeps its weights there; copy it "
                                         r"beside model.pte"):
        ExecuTorchRuntime().load(moved, threads=2)


def test_the_latency_child_runs_mkl_single_threaded(exported):
    """The pip runtime's custom SDPA calls MKL from inside ExecuTorch's thread pool; nested, MKL's own threads fight
    the pool for the cores (measured on SmolLM2: 230-250 us per call instead of 45). The child that times the program
    must start with MKL pinned to one thread, and it says what it ran under."""
    from compress.runtimes.latency import measure_latency

    _, _, q = exported
    result = measure_latency("executorch", q, threads=2, prompt_ids=list(range(10, 30)), decode_tokens=4, warmup=0,
                             repeats=1)
    assert result["process_env"] == {"MKL_NUM_THREADS": "1"}
    assert result["decode_tok_s"] > 0


def test_an_int8_kv_cache_program_prefills_in_chunks_and_runs_what_the_export_module_runs(exported, tmp_path: Path):
    """`kv_cache: int8` stores keys and values as int8 with a scale and zero point per position and head, attended
    by ExecuTorch's quantized SDPA kernel; `max_seq_len` bounds one call, so the runtime feeds a longer prompt in
    chunks, and the stock runner reads that bound from get_max_seq_len."""
    from compress.exporters.kv_cache import KvCachePrecision
    from executorch.runtime import Runtime

    from compress.metrics import position_kl

    model = exported[0]
    options = PteOptions(max_context=96, max_seq_len=16, attention=PteAttention.CUSTOM_SDPA,
                         kv_cache=KvCachePrecision.INT8)
    art = ExecuTorchExporter().export(model, byte_tokenizer(), options, tmp_path / "kv8", QUIET)
    assert art.record["coverage"]["kv_cache"] == "int8"
    assert "llama.custom_quantized_sdpa" in art.record["coverage"]["non_delegated_ops"]
    program = Runtime.get().load_program(art.path / "model.pte", data_path=art.path / "model.ptd")
    assert program.load_method("get_max_seq_len").execute([])[0] == 16
    tokens = [(7 * i) % 250 + 3 for i in range(96)]  # fills every slot: a 40-token prompt is 3 calls
    session = ExecuTorchRuntime().load(art, threads=2)
    got = np.concatenate([session.prefill(tokens[:40])] + [session.decode(t)[None] for t in tokens[40:]])
    module = ExportLlama.from_hf(model, 96, AttentionBackend.CUSTOM, kv_precision=KvCachePrecision.INT8)
    with torch.no_grad():
        expected = model(torch.tensor([tokens])).logits[0].numpy()
        same_ops = torch.cat([module(torch.tensor([tokens[i:i + 16]]), torch.tensor([i]))[0]
                              for i in range(0, 96, 16)]).numpy()
    # The program computes what the export module computes (fp32 matmuls in XNNPACK: float-close), and both sit a
    # little off the fp32-cache model.
    assert position_kl(same_ops, got).max() < 1e-5
    assert 1e-7 < position_kl(expected, got).mean() < 1e-3


def test_a_last_logits_program_gives_the_last_row_of_every_call_and_every_row_one_token_at_a_time(exported,
                                                                                                  tmp_path: Path):
    """The default program returns (1, 1, vocab) per call, as an app needs: its prompt logits equal the all-logits
    program's last row, and the session still gives every position's logits by feeding one token per call."""
    from executorch.runtime import Runtime

    model, fp32, _ = exported
    last = ExecuTorchExporter().export(model, byte_tokenizer(), PteOptions(max_context=96, max_seq_len=32),
                                       tmp_path / "last", QUIET)
    assert last.last_logits_only and not fp32.last_logits_only and last.record["coverage"]["logits"] == "last"
    tokens = list(range(10, 50))
    full = ExecuTorchRuntime().load(fp32, threads=2).prefill(tokens)  # (40, vocab)
    session = ExecuTorchRuntime().load(last, threads=2)
    np.testing.assert_allclose(session.prefill_last(tokens), full[-1], atol=1e-4, rtol=1e-4)  # calls of 32 and 8
    session.reset()
    np.testing.assert_allclose(session.prefill(tokens), full, atol=1e-4, rtol=1e-4)
    program = Runtime.get().load_program(last.path / "model.pte", data_path=last.path / "model.ptd")
    out = program.load_method("forward").execute([torch.tensor([tokens[:5]]), torch.tensor([0])])[0]
    assert tuple(out.shape) == (1, 1, 259)


def test_reduced_kv_cache_precision_needs_custom_sdpa_and_a_call_fits_the_context():
    from compress.exporters.kv_cache import KvCachePrecision

    from compress.errors import ConfigError

    with pytest.raises(ConfigError, match="'int8' needs attention: custom_sdpa"):
        PteOptions(kv_cache=KvCachePrecision.INT8)
    with pytest.raises(ConfigError, match="max_seq_len: 600 exceeds max_context 512"):
        PteOptions(max_seq_len=600)
    assert PteOptions().seq_len == 256 and PteOptions(max_context=96).seq_len == 96


def test_max_context_beyond_the_model_is_refused_before_work(tmp_path: Path):
    model = tiny_llama(seed=0, max_position_embeddings=64)
    with pytest.raises(InputError, match="max_context: 128 exceeds the model's max_position_embeddings 64"):
        ExecuTorchExporter().export(model, byte_tokenizer(), PteOptions(max_context=128), tmp_path / "x", QUIET)
    assert not (tmp_path / "x").exists()


def test_cli_refuses_bad_pte_configs_with_one_line(tiny_dir: Path, tmp_path: Path, cli):
    def targets(quantize: dict) -> Path:
        path = tmp_path / f"t{len(list(tmp_path.iterdir()))}.yaml"
        path.write_text(yaml.safe_dump({"version": 1, "targets": {"a": {
            "stages": [{"quantize": quantize}], "export": {"format": "pte", "max_context": 128},
            "runtime": "executorch", "eval": {"window_len": 32, "prefill_len": 16, "decode_tokens": 8}}}}))
        return path

    out = tmp_path / "out"
    result = cli("build", "--target", "a", "--model", str(tiny_dir), "--out", str(out),
                 "--targets", str(targets({"weight_bits": 4, "group_size": 128, "activations": "int8_dynamic"})))
    assert result.code == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: quantize.group_size 128 does not divide 12 linear(s): layers.0.self_attn.q_proj (in_features 64)")
    assert not (out / "executorch").exists() and not (out / "manifest.json").exists()
    bad = cli("build", "--target", "a", "--model", str(tiny_dir), "--out", str(out),
              "--targets", str(targets({"weight_bits": 4, "symmetric": False})))
    assert bad.code == 2
    assert bad.stderr.strip().splitlines()[-1] == (
        "error: t2.yaml: targets.a.stages[0].quantize.activations: 'none' with 4-bit codes: XNNPACK runs int4 "
        "weights only with int8 dynamic activations; use int8_dynamic (export.format pte)")


def test_export_module_weights_are_what_was_exported(exported):
    model, _, _ = exported
    module = ExportLlama.from_hf(model, 96)
    assert module.dims.num_kv_heads == 2 and module.dims.head_dim == 16


@pytest.mark.parametrize("ops,fails", [
    ({"mm": 1, "llama.update_cache": 60}, True),
    ({"linear": 2}, True),
    ({"addmm": 1}, True),
    ({"bmm": 60, "llama.custom_sdpa": 30, "view_copy": 216, "embedding": 1}, False),  # attention and bookkeeping
])
def test_a_weight_matmul_left_outside_xnnpack_fails_the_export_unless_allowed(ops, fails):
    from compress.errors import ExportError

    delegation = {"non_delegated_ops": ops}
    if fails:
        with pytest.raises(ExportError, match="linear ops left outside XNNPACK"):
            ExecuTorchExporter._check_delegation(delegation, PteOptions())
    else:
        ExecuTorchExporter._check_delegation(delegation, PteOptions())
    ExecuTorchExporter._check_delegation(delegation, PteOptions(allow_unquantized_linears=True))


def test_executorch_native_log_stays_out_of_the_console(exported, capfd, isolated_home):
    """ExecuTorch's C++ log lines ([threadpool.cpp] at every load) land in $COMPRESS_HOME/logs, not on stderr."""
    _, fp32, _ = exported
    capfd.readouterr()
    session = ExecuTorchRuntime().load(fp32, threads=2)
    assert session.prefill([1, 2, 3]).shape[0] == 3
    err = capfd.readouterr().err
    assert ".cpp:" not in err, err
    assert "threadpool.cpp" in (isolated_home / "logs" / "executorch.log").read_text()


def test_the_lowering_puts_no_deprecation_warning_in_the_console(tmp_path: Path, caplog):
    """The XNNPACK partitioner warns about the to_edge + to_backend route the exporter keeps on purpose; a user
    would see it on every android build."""
    import logging

    caplog.set_level(logging.WARNING)
    ExecuTorchExporter().export(tiny_llama(seed=0, num_hidden_layers=1), byte_tokenizer(), PteOptions(max_context=32),
                                tmp_path / "pte", QUIET)
    assert not [r.getMessage() for r in caplog.records if "DEPRECATION" in r.getMessage()]
    assert logging.getLogger("executorch.backends.xnnpack.partition.xnnpack_partitioner").level == logging.NOTSET


def test_a_damaged_weights_file_is_a_failed_verification_naming_the_runtime_s_refusal(tiny_dir: Path, tmp_path: Path,
                                                                                       cli):
    """model.ptd damaged and re-hashed into the manifest, so the file check passes: ExecuTorch's refusal to load
    the program is gated like a broken budget (exit 4, its message), never an internal error."""
    import json

    from compress.hashing import sha256_file

    targets = tmp_path / "targets.yaml"
    targets.write_text(yaml.safe_dump({"version": 1, "targets": {"a": {
        "export": {"format": "pte", "max_context": 128}, "runtime": "executorch",
        "eval": {"window_len": 32, "prefill_len": 16, "decode_tokens": 8, "latency": False}}}}))
    out = tmp_path / "out"
    built = cli("build", "--target", "a", "--model", str(tiny_dir), "--targets", str(targets), "--out", str(out))
    assert built.code == 0, built.stderr
    # ExecuTorch's C++ log lines went to the build's logs/, not the console; --verbose leaves them on the console.
    assert ".cpp:" not in built.stderr and "threadpool.cpp" in (out / "logs" / "executorch.log").read_text()
    (out / "logs" / "executorch.log").unlink()
    talk = cli("--verbose", "generate", str(out), "--prompt", "hi", "--max-tokens", "2")
    assert talk.code == 0 and "threadpool.cpp" in talk.stderr and not (out / "logs" / "executorch.log").exists()
    weights = out / "executorch" / "model.ptd"
    data = bytearray(weights.read_bytes())
    data[:64] = b"\xff" * 64  # the flatbuffer header: no reader can find the named tensors any more
    weights.write_bytes(bytes(data))
    manifest = json.loads((out / "manifest.json").read_text())
    for entry in manifest["artifact"]["file_hashes"]:
        if entry["path"].endswith("model.ptd"):
            entry["sha256"] = sha256_file(weights)
    (out / "manifest.json").write_text(json.dumps(manifest))
    result = cli("verify", str(out))
    assert result.code == 4, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "executorch refused to load the artifact" in last and "Traceback" not in result.stderr, result.stderr


def test_a_model_handed_over_is_freed_once_the_export_module_holds_its_weights(tmp_path, monkeypatch):
    """The build hands the exporter the only reference to the stages' model: the export module copies the weights
    it needs, so the HF model's fp32 weights are let go before the codes are lowered and the program is traced."""
    import gc
    import weakref

    box = [tiny_llama(seed=0)]
    alive = weakref.ref(box[0])
    real = ExecuTorchExporter._lower
    seen = {}

    def lower(self, *args, **kwargs):
        gc.collect()
        seen["model_alive"] = alive() is not None
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ExecuTorchExporter, "_lower", lower)
    staged, codes = quantize_model(box.pop(), QuantizeConfig(weight_bits=4, group_size=32, symmetric=True,
                                                              activations=Activations.INT8_DYNAMIC,
                                                              embedding=Precision.INT8, lm_head=Precision.INT8),
                                   in_place=True)
    box.append(staged)  # the model itself, quantized in place
    del staged  # what the build does: it holds no reference while the exporter runs
    art = ExecuTorchExporter().export(box.pop(), byte_tokenizer(), PteOptions(max_context=96), tmp_path / "a", QUIET,
                                      codes)
    assert seen == {"model_alive": False}
    assert art.record["coverage"]["linears_quantized"] == art.record["coverage"]["linears_total"]
