"""`compress build` / `verify` / `report` end to end through the real CLI, on a tiny Llama."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest
import yaml

from compress.hashing import sha256_file

# Latency is exercised by its own tests; these keep the end-to-end runs short.
FAST_EVAL = {"windows": 4, "window_len": 64, "greedy_tokens": 8, "prefill_len": 32, "decode_tokens": 8,
             "warmup": 0, "repeats": 2}


def _targets(tmp_path: Path, dtype: str = "float32", budgets: dict | None = None, name: str = "ref") -> Path:
    path = tmp_path / f"targets-{name}-{dtype}.yaml"
    budgets = budgets if budgets is not None else {"max_mean_kl": 1e-6, "min_top1_agreement": 0.999,
                                                   "max_perplexity_ratio": 1.0001, "min_greedy_match": 8}
    path.write_text(yaml.safe_dump({"version": 1, "targets": {name: {
        "export": {"format": "safetensors", "dtype": dtype}, "runtime": {"name": "torch_eager", "threads": 1},
        "eval": FAST_EVAL, "budgets": budgets}}}))
    return path


@pytest.fixture
def built(tiny_dir: Path, tmp_path: Path, cli):
    out = tmp_path / "out"
    result = cli("build", "--target", "ref", "--model", str(tiny_dir), "--targets", str(_targets(tmp_path)),
                 "--out", str(out))
    assert result.code == 0, result.stderr
    return out, result


def test_reference_build_passes_with_kl_zero_and_a_complete_manifest(built):
    out, result = built
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["verdict"] == "pass"
    metrics = manifest["verification"]["metrics"]
    assert metrics["mean_kl"] == 0.0 and metrics["top1_agreement"] == 1.0 and metrics["perplexity_ratio"] == 1.0
    assert metrics["greedy_match_mean"] == 8
    assert manifest["model"]["kind"] == "hf_dir" and len(manifest["model"]["sha256"]) == 64
    assert manifest["target"]["spec"]["export"]["format"] == "safetensors"
    assert {"torch", "transformers", "python", "compress"} <= set(manifest["tools"])
    assert manifest["verification"]["measured_on"]["logical_cores"] >= 1
    # Every artifact file is listed with the hash and size of what is on disk.
    files = manifest["artifact"]["file_hashes"]
    assert {f["path"] for f in files} >= {"model.safetensors", "config.json", "tokenizer.json"}
    for f in files:
        path = out / manifest["artifact"]["path"] / f["path"]
        assert sha256_file(path) == f["sha256"] and path.stat().st_size == f["bytes"]
    junit = ET.parse(out / "junit.xml").getroot().find("testsuite")
    assert junit.get("tests") == "4" and junit.get("failures") == "0"
    assert "## compress ref: PASS" in (out / "report.md").read_text()
    assert "Built" in result.stderr and "Traceback" not in result.stderr


def test_a_rebuild_reuses_the_cached_export(built, tiny_dir: Path, tmp_path: Path, cli):
    out, _ = built
    again = cli("build", "--target", "ref", "--model", str(tiny_dir), "--targets", str(_targets(tmp_path)),
                "--out", str(out))
    assert again.code == 0, again.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["export"]["cached"] is True
    assert "Export to safetensors (cached)" in again.stderr
    # The versions that wrote the reused artifact come from its cache entry, not from what verified it.
    cache = Path(os.environ["COMPRESS_HOME"]) / "cache"
    key = manifest["export"]["cache_key"]
    info = json.loads((cache / key[:2] / key / "entry.json").read_text())
    assert manifest["export"]["tools"] == info["tools"] and "torch" in info["tools"]


def test_verify_reruns_on_an_existing_build_and_catches_tampering(built, tmp_path: Path, cli):
    out, _ = built
    ok = cli("verify", str(out))
    assert ok.code == 0, ok.stderr
    report = cli("report", str(out), "--json")
    assert json.loads(report.stdout)["metrics"]["mean_kl"] == 0.0
    stricter = _targets(tmp_path, budgets={"max_size_mb": 0.01})
    broken = cli("verify", str(out), "--targets", str(stricter))
    assert broken.code == 4
    assert "max_size_mb" in broken.stderr
    weights = out / "checkpoint" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    tampered = cli("verify", str(out))
    assert tampered.code == 2
    assert "changed since the build" in tampered.stderr


def test_an_artifact_its_runtime_refuses_is_a_failed_verification(built, cli):
    """Damaged and re-hashed into the manifest, so the file check passes: the runtime's refusal is gated like a
    broken budget (exit 4, the runtime's message), not an internal error."""
    out, _ = built
    weights = out / "checkpoint" / "model.safetensors"
    weights.write_bytes(b"\xff" * 8 + weights.read_bytes()[8:])  # a header length no file can have
    manifest = json.loads((out / "manifest.json").read_text())
    for entry in manifest["artifact"]["file_hashes"]:
        if entry["path"] == weights.name:
            entry["sha256"] = sha256_file(weights)
    (out / "manifest.json").write_text(json.dumps(manifest))
    result = cli("verify", str(out))
    assert result.code == 4, result.stderr
    assert "torch_eager refused to load the artifact" in result.stderr and "Traceback" not in result.stderr


def test_strict_turns_a_budget_this_machine_cannot_measure_into_a_failure(tiny_dir: Path, tmp_path: Path, cli):
    targets = _targets(tmp_path, budgets={"max_mean_kl": 1e-6, "min_decode_tok_s": 1.0})
    spec = yaml.safe_load(targets.read_text())
    spec["targets"]["ref"]["eval"] = {**FAST_EVAL, "latency": False}
    targets.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    result = cli("build", "--target", "ref", "--model", str(tiny_dir), "--targets", str(targets), "--out", str(out),
                 "--strict")
    assert result.code == 4, result.stderr
    assert "min_decode_tok_s: not measured here" in result.stderr and "--strict" in result.stderr
    assert json.loads((out / "manifest.json").read_text())["verdict"] == "fail"
    assert cli("verify", str(out)).code == 0  # without --strict the same build passes


def test_a_damaged_artifact_breaks_the_budget_gate_with_exit_4(tiny_dir: Path, tmp_path: Path, cli):
    # bfloat16 weights are a real, small degradation; the reference budgets refuse it.
    out = tmp_path / "bf16"
    summary = tmp_path / "summary.md"
    result = cli("build", "--target", "ref", "--model", str(tiny_dir), "--out", str(out),
                 "--targets", str(_targets(tmp_path, dtype="bfloat16")), env={"GITHUB_STEP_SUMMARY": str(summary)})
    assert result.code == 4, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: target 'ref': budget broken (max_mean_kl: mean_kl = ")
    manifest = json.loads((out / "manifest.json").read_text())  # written even when the gate fails
    assert manifest["verdict"] == "fail"
    assert 0 < manifest["verification"]["metrics"]["mean_kl"]
    cases = {c.get("name"): c for c in ET.parse(out / "junit.xml").getroot().iter("testcase")}
    assert cases["max_mean_kl"].find("failure") is not None
    assert "| max_mean_kl |" in (out / "report.md").read_text() and "**FAIL**" in (out / "report.md").read_text()
    assert "compress ref: FAIL" in summary.read_text()
    report = cli("report", str(out))  # the same gate when CI reads the report alone
    assert report.code == 4 and "| max_mean_kl |" in report.stdout, report.stderr


def test_a_budget_this_machine_cannot_measure_is_not_called_met(tiny_dir: Path, tmp_path: Path, cli):
    budgets = {"max_mean_kl": 1e-6, "min_decode_tok_s": 1.0}
    targets = _targets(tmp_path, budgets=budgets)
    spec = yaml.safe_load(targets.read_text())
    spec["targets"]["ref"]["eval"] = {**FAST_EVAL, "latency": False}  # as ios on Linux: speed not measured
    targets.write_text(yaml.safe_dump(spec))
    result = cli("build", "--target", "ref", "--model", str(tiny_dir), "--targets", str(targets),
                 "--out", str(tmp_path / "out"))
    assert result.code == 0, result.stderr
    assert "all budgets met" not in result.stderr
    assert "every measured budget met; not measured here: min_decode_tok_s" in result.stderr
    suite = ET.parse(tmp_path / "out" / "junit.xml").getroot().find("testsuite")
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert cases["min_decode_tok_s"].find("skipped") is not None and cases["max_mean_kl"].find("skipped") is None
    assert (suite.get("skipped"), suite.get("failures")) == ("1", "0")


def test_targets_without_their_components_fail_before_any_work(monkeypatch: pytest.MonkeyPatch):
    """A stage, exporter or runtime missing from the registries stops the build before any work (exit 3)."""
    from compress.build import check_available
    from compress.errors import NotAvailableYet
    from compress.stages import STAGES
    from compress.targets import parse_target

    target = parse_target({"stages": [{"quantize": {"weight_bits": 4}}], "export": {"format": "safetensors"},
                           "runtime": "torch_eager"}, "quantized")
    monkeypatch.delitem(STAGES._items, "quantize")
    with pytest.raises(NotAvailableYet, match="needs stage 'quantize': not available yet") as err:
        check_available(target, verify=False)
    assert err.value.exit_code == 3 and "stages distill, prune" in str(err.value)


@pytest.mark.parametrize("args,code,fragment", [
    (["build", "--target", "andriod"], 2, "unknown target 'andriod'; valid: android"),
    (["build", "--target", "reference", "--model", "/no/such/model"], 2, "is not a catalog name"),
    (["build", "--target", "reference", "--threads", "0"], 2, "Invalid value for '--threads'"),
    (["verify", "/no/such/build"], 2, "no manifest.json; not a completed compress build"),
])
def test_bad_input_is_one_line_and_exit_2(args, code, fragment, cli):
    result = cli(*args)
    assert result.code == code, result.stderr
    assert fragment in result.stderr and "Traceback" not in result.stderr


def test_an_occupied_output_directory_is_not_overwritten(tiny_dir: Path, tmp_path: Path, cli):
    occupied = tmp_path / "mine"
    occupied.mkdir()
    (occupied / "thesis.tex").write_text("precious")
    result = cli("build", "--target", "ref", "--model", str(tiny_dir), "--targets", str(_targets(tmp_path)),
                 "--out", str(occupied))
    assert result.code == 2 and "is not a compress build directory" in result.stderr
    assert (occupied / "thesis.tex").read_text() == "precious"


def _quantized_targets(tmp_path: Path) -> Path:
    """A target whose first stage would take real time: bad input must stop before it."""
    path = tmp_path / "targets-q.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "targets": {"q": {
        "stages": [{"quantize": {"algorithm": "rtn", "weight_bits": 8, "group_size": 32, "symmetric": True}}],
        "export": {"format": "safetensors"}, "runtime": {"name": "torch_eager", "threads": 1}, "eval": FAST_EVAL}}}))
    return path


@pytest.mark.parametrize("content,fragment", [
    (bytes(range(256)) * 8, "not UTF-8 text"),
    (b"", "no text in it"),
    (b"too short to hold the evaluation windows", "evaluation split"),
])
def test_bad_eval_data_is_refused_before_any_stage_and_writes_nothing(content, fragment, tiny_dir: Path,
                                                                      tmp_path: Path, cli):
    data = tmp_path / "data.txt"
    data.write_bytes(content)
    out = tmp_path / "out"
    result = cli("build", "--target", "q", "--model", str(tiny_dir), "--targets", str(_quantized_targets(tmp_path)),
                 "--out", str(out), "--eval-data", str(data))
    assert result.code == 2, result.stderr
    assert fragment in result.stderr and "Traceback" not in result.stderr and "Stage 1/1" not in result.stderr
    assert not out.exists()


def _gguf_of_another_architecture(path: Path) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_name("a gpt2")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _with_config(tiny_dir: Path, dest: Path, **changes) -> Path:
    shutil.copytree(tiny_dir, dest)
    config = json.loads((dest / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({**config, **changes}))
    return dest


def _pickle_only(tiny_dir: Path, dest: Path) -> Path:
    shutil.copytree(tiny_dir, dest)
    (dest / "model.safetensors").unlink()
    (dest / "pytorch_model.bin").write_bytes(b"never unpickled")
    return dest


def test_a_model_that_cannot_be_resolved_writes_nothing(tiny_dir: Path, tmp_path: Path, cli):
    """Every model source the resolver refuses: one line, exit 2, and `--out` never created."""
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF" + b"\0" * 12)
    cases = {
        str(truncated): "GGUF",
        str(_gguf_of_another_architecture(tmp_path / "gpt2.gguf")): "architecture 'gpt2'",
        str(_with_config(tiny_dir, tmp_path / "gpt2", model_type="gpt2", architectures=["GPT2LMHeadModel"])):
            "architecture 'gpt2'",
        str(_pickle_only(tiny_dir, tmp_path / "pickled")): "unpickles",
        str(tmp_path / "missing"): "missing",
    }
    for model, fragment in cases.items():
        out = tmp_path / "out"
        result = cli("build", "--target", "q", "--model", model, "--targets", str(_quantized_targets(tmp_path)),
                     "--out", str(out))
        assert result.code == 2 and "Traceback" not in result.stderr, (model, result.stderr)
        assert fragment in result.stderr.strip().splitlines()[-1], (model, result.stderr)  # the one error line
        assert not out.exists(), model


def test_a_targets_file_nested_without_end_is_one_line_exit_2(tmp_path: Path, cli):
    deep = tmp_path / "deep.yaml"
    deep.write_text("version: 1\ntargets: " + "[" * 100_000 + "]" * 100_000 + "\n")
    result = cli("targets", "check", str(deep))
    assert result.code == 2, result.stderr
    assert "nested too deeply" in result.stderr and "Traceback" not in result.stderr


def test_verify_hashes_a_converted_checkpoint_again(tmp_path: Path, isolated_home: Path, cli):
    """A GGUF source is converted once into the cache; a change to that conversion after the build is caught by
    `verify` (which hashes its files again), not trusted from the hash recorded at conversion."""
    from compress.exporters.gguf import GgufExporter, GgufOptions, GgufType

    from compress.models.tiny import GPT2_MERGES, byte_tokenizer, tiny_llama
    from compress.progress import Console

    gguf = GgufExporter().export(tiny_llama(0, vocab_size=259 + len(GPT2_MERGES)), byte_tokenizer(GPT2_MERGES),
                                 GgufOptions(file_type=GgufType.F32), tmp_path / "tiny.gguf", Console(quiet=True))
    out = tmp_path / "out"
    assert cli("build", "--target", "ref", "--model", str(gguf.path), "--targets", str(_targets(tmp_path)),
               "--out", str(out)).code == 0
    assert cli("verify", str(out)).code == 0
    weights = next(isolated_home.glob("models/gguf-*/hf/model.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-8:] = bytes(8)  # the last weight values
    weights.write_bytes(bytes(data))
    result = cli("verify", str(out))
    assert result.code == 2 and "changed since the build" in result.stderr, result.stderr


def _pte_targets(tmp_path: Path) -> Path:
    path = tmp_path / "targets-pte.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "targets": {"p": {
        "stages": [{"quantize": {"algorithm": "rtn", "weight_bits": 8, "group_size": 32, "symmetric": True}}],
        "export": {"format": "pte", "max_context": 64}, "runtime": {"name": "executorch", "threads": 1},
        "eval": FAST_EVAL}}}))
    return path


def test_a_rope_scaling_no_format_can_lower_is_refused_before_any_stage(tmp_path: Path, cli):
    pytest.importorskip("executorch")
    from compress.models.tiny import save_tiny_llama

    model = save_tiny_llama(tmp_path / "dynamic", rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    out = tmp_path / "out"
    result = cli("build", "--target", "p", "--model", str(model), "--targets", str(_pte_targets(tmp_path)),
                 "--out", str(out))
    assert result.code == 2, result.stderr
    assert ("target 'p' (export.format pte): model: RoPE scaling 'dynamic' is not supported by the pte exporter; "
            "supported: default, linear, llama3") in result.stderr
    assert "Traceback" not in result.stderr and "Loading the fp32 reference" not in result.stderr
    assert not out.exists()


def test_a_model_larger_than_memory_is_refused_before_loading(tmp_path: Path, tiny_dir: Path, cli):
    """A Llama 3.1 405B config beside tiny weights: the estimate alone refuses it (no machine here has ~5.7 TB)."""
    import shutil

    model = tmp_path / "huge"
    shutil.copytree(tiny_dir, model)
    config = json.loads((model / "config.json").read_text())
    config.update(hidden_size=16384, num_hidden_layers=126, num_attention_heads=128, num_key_value_heads=8,
                  intermediate_size=53248, vocab_size=128256, tie_word_embeddings=False, head_dim=128)
    (model / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    result = cli("build", "--target", "q", "--model", str(model), "--targets", str(_quantized_targets(tmp_path)),
                 "--out", str(out))
    assert result.code == 2, result.stderr
    assert "needs ~5" in result.stderr and "405.85B parameters" in result.stderr
    assert "GB available (--no-memory-check to try anyway)" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


def test_the_parameter_count_behind_the_memory_estimate_is_the_models():
    from compress.memory import Work, estimate, parameter_count

    from compress.models.tiny import tiny_llama

    for tied in (True, False):
        model = tiny_llama(0, tie_word_embeddings=tied, num_attention_heads=6, num_key_value_heads=2, hidden_size=96)
        counted = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        assert parameter_count(model.config) == counted
    small = estimate(model.config, Work.QUANTIZE)
    assert small.peak_bytes == 2e9 + 3.5 * 4 * small.parameters + 3 * 8 * 256 * model.config.vocab_size * 4
    assert estimate(model.config, Work.EXPORT).peak_bytes < small.peak_bytes < \
        estimate(model.config, Work.TRAIN).peak_bytes


def _greedy(model_dir: Path, prompt_ids: list[int], n: int) -> list[int]:
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt_ids):]


def test_generate_streams_the_artifact_s_greedy_tokens_with_and_without_the_chat_template(built, tiny_dir: Path,
                                                                                           cli):
    from transformers import AutoTokenizer

    out, _ = built
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    raw = cli("generate", str(out), "--prompt", "the cat", "--raw", "--max-tokens", "6")
    assert raw.code == 0, raw.stderr
    expected = _greedy(tiny_dir, tokenizer("the cat").input_ids, 6)
    stop = expected.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in expected else len(expected)
    assert raw.stdout == tokenizer.decode(expected[:stop], skip_special_tokens=True) + "\n"
    assert f"torch_eager: {len(tokenizer('the cat').input_ids)} prompt tokens" in raw.stderr and "tok/s" in raw.stderr
    chat_ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                             tokenize=False)
    templated = cli("generate", str(out), "--prompt", "hi", "--max-tokens", "6")
    expected = _greedy(tiny_dir, tokenizer(chat_ids).input_ids, 6)
    stop = expected.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in expected else len(expected)
    assert templated.code == 0 and templated.stdout == tokenizer.decode(expected[:stop], skip_special_tokens=True) + "\n"
    bad = cli("generate", str(out), "--prompt", "hi", "--top-p", "0")
    assert bad.code == 2 and "--top-p 0.0: must be in (0, 1]" in bad.stderr and "Traceback" not in bad.stderr


def test_chat_answers_turn_after_turn_and_resets(built, tiny_dir: Path, cli):
    import os
    import subprocess
    import sys

    from transformers import AutoTokenizer

    out, _ = built
    proc = subprocess.run([sys.executable, "-m", "compress.cli", "chat", str(out), "--max-tokens", "4"],
                          input="hello\nand again\n/reset\nhello\n/exit\nnever read\n", capture_output=True,
                          text=True, env=dict(os.environ), timeout=600)
    assert proc.returncode == 0, proc.stderr
    # The tiny model's answers are arbitrary bytes (newlines included): compare with `generate` on one turn.
    first = cli("generate", str(out), "--prompt", "hello", "--max-tokens", "4").stdout
    assert proc.stdout.startswith(first) and proc.stdout.endswith(first)  # after /reset, the same answer again
    assert len(proc.stdout) > 2 * len(first)
    assert proc.stderr.count("prompt tokens at") == 3 and "(conversation reset)" in proc.stderr
    # The second turn prefilled only what the cache did not hold: the new user turn, not the whole conversation.
    turns = [int(line.split(" prompt tokens")[0].rsplit(" ", 1)[1]) for line in proc.stderr.splitlines()
             if "prompt tokens" in line]
    conversation = AutoTokenizer.from_pretrained(tiny_dir).apply_chat_template(
        [{"role": "user", "content": "hello"}, {"role": "assistant", "content": first[:-1]},
         {"role": "user", "content": "and again"}], add_generation_prompt=True, tokenize=False)
    whole = len(AutoTokenizer.from_pretrained(tiny_dir)(conversation).input_ids)
    assert turns[1] <= whole - turns[0] and turns[2] == turns[0]


def test_a_build_that_stops_after_its_inputs_were_checked_still_writes_a_failing_junit(tiny_dir: Path, tmp_path: Path,
                                                                                      isolated_home: Path,
                                                                                      monkeypatch: pytest.MonkeyPatch):
    from compress.build import BuildRequest, build
    from compress.errors import ExportError
    from compress.exporters.safetensors import SafetensorsExporter
    from compress.progress import Console
    from compress.targets import load_targets

    def refuse(*args, **kwargs):
        raise ExportError("the exporter gave up\nsecond line")

    monkeypatch.setattr(SafetensorsExporter, "export", refuse)
    targets = load_targets(_targets(tmp_path))
    out = tmp_path / "out"
    req = BuildRequest(targets.get("ref"), str(tiny_dir), out, targets.path)
    with pytest.raises(ExportError):
        build(req, Console(quiet=True))
    suite = ET.parse(out / "junit.xml").getroot().find("testsuite")
    assert suite.get("errors") == "1" and suite.get("name") == "compress ref"
    error = suite.find("testcase[@name='export']/error")
    assert error.get("type") == "ExportError" and error.get("message") == "the exporter gave up"
    assert not (out / "manifest.json").exists()


def test_several_targets_build_in_one_command_with_one_table_and_the_first_failure_s_exit_code(tiny_dir: Path,
                                                                                                tmp_path: Path, cli):
    spec = {"export": {"format": "safetensors"}, "runtime": {"name": "torch_eager", "threads": 1}, "eval": FAST_EVAL}
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "targets": {
        "a": {**spec, "budgets": {"max_mean_kl": 1e-6}},
        "b": {**spec, "budgets": {"max_size_mb": 0.001}}}}))  # b's checkpoint cannot be that small
    out = tmp_path / "out"
    result = cli("build", "--all", "--model", str(tiny_dir), "--targets", str(path), "--out", str(out))
    assert result.code == 4, result.stderr
    table = result.stdout.splitlines()
    assert table[0].startswith("a  ok  pass, KL 0") and table[1].startswith("b  exit 4  target 'b': budget broken")
    assert "1 of 2 targets failed; the first, b:" in result.stderr
    assert json.loads((out / "a" / "manifest.json").read_text())["verdict"] == "pass"
    assert json.loads((out / "b" / "manifest.json").read_text())["verdict"] == "fail"
    only_a = cli("build", "--target", "a,a", "--model", str(tiny_dir), "--targets", str(path))
    assert only_a.code == 2 and "a target is named twice" in only_a.stderr
    neither = cli("build", "--model", str(tiny_dir), "--targets", str(path))
    assert neither.code == 2 and "give --target NAME[,NAME...] or --all" in neither.stderr


def test_a_yaml_alias_bomb_is_one_line_and_exit_2(tmp_path: Path, cli):
    """Nine levels of nine aliases: 9^9 strings if expanded. Refused in one line, without expanding them."""
    levels = ["&a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    levels += [f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(f"version: 1\ntargets:\n  t: [{', '.join(levels)}]\n")
    result = cli("targets", "check", str(bomb))
    assert result.code == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr and len(lines) == 1 and len(lines[0]) < 300, result.stderr
    assert "targets.t: expected a mapping, got a list [[" in lines[0]


_RTN8 = {"algorithm": "rtn", "weight_bits": 8, "group_size": 32, "symmetric": True}


@pytest.mark.parametrize("stages", [[], [{"quantize": _RTN8}], [{"quantize": {**_RTN8, "smoothing": 0.5}}]],
                         ids=["no stage", "quantize in place", "a smoothing candidate in place"])
def test_the_export_holds_one_model_and_the_verification_reads_the_reference_again(
        stages: list, tiny_dir: Path, tmp_path: Path, isolated_home: Path, monkeypatch: pytest.MonkeyPatch):
    """What bounds a large build's peak: one fp32-sized model at a time. A quantize stage that is the only reader
    of the reference quantizes it in place, and where it needs the float weights again (the smoothing candidate)
    it reads them back from the checkpoint into the same model, so what is exported is the reference itself,
    changed. The verification then reads the reference again and lets it go before the artifact is measured, by
    which time the stage's codes are gone too.
    Where there is no stage the reference is what is exported, so it is kept and read once."""
    import copy
    import gc
    import weakref

    from compress.exporters.safetensors import SafetensorsExporter

    from compress import models, verification
    from compress.build import BuildRequest, build
    from compress.progress import Console
    from compress.targets import load_targets

    loads: list[weakref.ref] = []
    real_load, real_export = models.load, SafetensorsExporter.export
    seen: dict[str, bool] = {}
    codes_ref: list[weakref.ref] = []  # the quantize stage's codes, as handed to the exporter

    def load(source):
        loaded = real_load(source)
        loads.append(weakref.ref(loaded.model))
        return loaded

    def export(self, model, *args, **kwargs):
        gc.collect()
        seen["other_models_alive"] = any(r() is not None and r() is not model for r in loads)
        seen["exports_the_reference"] = model is loads[0]()
        kept, handed = copy.deepcopy(model), weakref.ref(model)
        del model
        gc.collect()
        seen["handed_over"] = handed() is None  # the exporter held the only reference: it may free the weights
        codes = args[-1] if len(args) == 5 else kwargs.get("quantized")
        codes_ref.extend([weakref.ref(codes)] if codes is not None else [])
        return real_export(self, kept, *args, **kwargs)

    real_measure = verification.measure_accuracy

    def measure_accuracy(*args, **kwargs):
        gc.collect()
        seen["reference_alive_while_measuring"] = any(r() is not None for r in loads)
        seen["codes_alive_while_measuring"] = any(r() is not None for r in codes_ref)
        return real_measure(*args, **kwargs)

    monkeypatch.setattr(models, "load", load)
    monkeypatch.setattr(SafetensorsExporter, "export", export)
    monkeypatch.setattr(verification, "measure_accuracy", measure_accuracy)
    path = tmp_path / "targets.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "targets": {"t": {
        "stages": stages, "export": {"format": "safetensors", "dtype": "float32"},
        "runtime": {"name": "torch_eager", "threads": 1}, "eval": FAST_EVAL, "budgets": {"max_mean_kl": 1.0}}}}))
    targets = load_targets(path)
    manifest = build(BuildRequest(targets.get("t"), str(tiny_dir), tmp_path / "out", targets.path),
                     Console(quiet=True))
    assert manifest is not None and seen["other_models_alive"] is False
    kl = manifest.verification["metrics"]["mean_kl"]
    if not stages:
        assert seen["exports_the_reference"] and len(loads) == 1 and kl < 1e-6
        assert seen["reference_alive_while_measuring"] and not seen["handed_over"]  # read once, held by the build
    else:  # measured against the fp32 reference, read again and let go once its outputs are known
        assert seen["exports_the_reference"]  # quantized (and smoothed) in place: no copy was made
        assert len(loads) == 2 and kl > 1e-8 and not seen["reference_alive_while_measuring"]
        assert seen["handed_over"]
        assert len(codes_ref) == 1 and not seen["codes_alive_while_measuring"]  # dropped after the export
