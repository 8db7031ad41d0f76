"""The Core ML runtime on Linux: prefill chunking, the harness over the MIL interpreter, latency not measured."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import yaml
from compress.runtimes.coreml import LINUX_LATENCY, CoreMLRuntime, plan_chunks


@pytest.mark.parametrize("n,start,expected", [
    (1, 0, [(1, 1)]),
    (64, 0, [(64, 64)]),
    (256, 0, [(64, 64)] * 4),
    (21, 0, [(21, 64)]),  # one padded call instead of 21 single-token calls
    (70, 0, [(64, 64), (6, 64)]),
    (5, 500, [(1, 1)] * 5),  # padding to 64 would write past the end of the cache
])
def test_prefill_is_cut_into_the_enumerated_query_lengths(n, start, expected):
    assert plan_chunks(n, start, (1, 64), max_context=512) == expected


def test_a_ranged_package_prefills_in_one_call():
    assert plan_chunks(300, 7, (), max_context=512) == [(300, 300)]


def test_linux_reports_latency_as_not_measured_instead_of_estimating_it():
    pytest.importorskip("coremltools")
    available = CoreMLRuntime().availability()
    assert available.ok and available.latency_unmeasured == LINUX_LATENCY
    assert LINUX_LATENCY.startswith("not measured: needs macOS")


def _corrupt_weight(package: Path, const_name: str) -> None:
    """Overwrite one weight's bytes in weight.bin, found through the program's blob offset."""
    import coremltools as ct

    spec = ct.utils.load_spec(str(package))
    block = next(iter(spec.mlProgram.functions["main"].block_specializations.values()))
    op = next(o for o in block.operations if o.type == "const" and o.outputs[0].name == const_name)
    meta = op.attributes["val"].blobFileValue.offset
    weights = package / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    with open(weights, "r+b") as f:
        f.seek(meta + 8)  # blob metadata: sentinel u32, dtype u32, size u64, data offset u64
        size, offset = struct.unpack("<QQ", f.read(16))
        noise = np.random.default_rng(0).normal(0, 0.5, size // 2).astype(np.float16)
        f.seek(offset)
        f.write(noise.tobytes())


def test_the_build_gates_on_the_package_and_the_harness_sees_one_corrupted_weight(tiny_dir: Path, tmp_path: Path,
                                                                                  cli):
    pytest.importorskip("coremltools")
    targets = tmp_path / "targets.yaml"
    targets.write_text(yaml.safe_dump({"version": 1, "targets": {"ios": {
        "export": {"format": "mlpackage", "max_context": 96, "compute_units": "cpu_and_gpu"},
        "runtime": "coreml",
        "eval": {"windows": 2, "window_len": 64, "greedy_tokens": 8, "prefill_len": 32, "decode_tokens": 8,
                 "arithmetic_bound": "fp16_accumulation", "bound_windows": 1},
        "budgets": {"max_mean_kl": 0.01, "min_top1_agreement": 0.95, "min_decode_tok_s": 1.0}}}}))
    out = tmp_path / "out"
    result = cli("build", "--target", "ios", "--model", str(tiny_dir), "--targets", str(targets), "--out", str(out))
    assert result.code == 0, result.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    budgets = {b["name"]: b for b in manifest["verification"]["budgets"]}
    assert budgets["max_mean_kl"]["passed"] and budgets["max_mean_kl"]["value"] < 1e-3
    assert budgets["min_decode_tok_s"]["passed"] is None and budgets["min_decode_tok_s"]["note"] == LINUX_LATENCY
    assert manifest["artifact"]["compute_units"] == "cpu_and_gpu"
    assert "not measured" in (out / "report.md").read_text()
    # The fp16-accumulation bound: the first window again in Apple's interpreter's arithmetic, gated alike.
    bound = manifest["verification"]["bound"]
    assert bound["name"] == "fp16_accumulation" and bound["windows"] == 1 and bound["metrics"]["positions"] == 64
    assert budgets["max_mean_kl (fp16_accumulation bound)"]["value"] == bound["metrics"]["mean_kl"]
    assert budgets["min_top1_agreement (fp16_accumulation bound)"]["passed"]
    assert "min_decode_tok_s (fp16_accumulation bound)" not in budgets  # accuracy budgets only
    report = (out / "report.md").read_text()
    section = report.split("### Bound: fp16_accumulation", 1)[1]
    assert f"| mean KL (ref || candidate) | {bound['metrics']['mean_kl']:.3g} |" in section.split("###")[0]
    # A budget the default arithmetic meets (measured 7e-6) and the bound does not (4e-5) fails the gate.
    spec = yaml.safe_load(targets.read_text())
    spec["targets"]["ios"]["budgets"]["max_mean_kl"] = 2e-5
    tighter = tmp_path / "tighter.yaml"
    tighter.write_text(yaml.safe_dump(spec))
    gated = cli("verify", str(out), "--targets", str(tighter))
    assert gated.code == 4, gated.stderr[-2000:]
    last = gated.stderr.strip().splitlines()[-1]
    assert "max_mean_kl (fp16_accumulation bound)" in last and "max_mean_kl: mean_kl" not in last

    _corrupt_weight(out / "coreml" / "model.mlpackage", "layers_1_mlp_down_proj_weight_to_fp16")
    tampered = cli("verify", str(out))
    assert tampered.code == 2 and "changed" in tampered.stderr  # the manifest's hashes catch it first
    # Re-hash the artifact so verification runs: the harness itself must see the damage.
    from compress.hashing import sha256_file

    for entry in manifest["artifact"]["file_hashes"]:
        path = out / "coreml" / entry["path"]
        entry.update(sha256=sha256_file(path), bytes=path.stat().st_size)
    (out / "manifest.json").write_text(json.dumps(manifest))
    broken = cli("verify", str(out))
    assert broken.code == 4, broken.stderr[-2000:]
    assert "max_mean_kl" in broken.stderr.strip().splitlines()[-1]


def test_the_fp16_accumulation_bound_changes_fp16_programs_only(tmp_path: Path):
    """The bound re-sums fp16 linears and matmuls; an fp32 program's arithmetic is left as it is."""
    pytest.importorskip("coremltools")
    from compress.exporters.coreml import ComputeUnits, CoreMLExporter, MlpackageOptions

    from compress.artifact import Dtype
    from compress.models.tiny import byte_tokenizer, tiny_llama
    from compress.progress import Console

    tokens = list(range(10, 42))
    for precision in (Dtype.FLOAT16, Dtype.FLOAT32):
        artifact = CoreMLExporter().export(tiny_llama(seed=0), byte_tokenizer(), MlpackageOptions(
            max_context=64, compute_units=ComputeUnits.CPU_AND_GPU, compute_precision=precision),
            tmp_path / precision.value, Console(quiet=True))
        default = CoreMLRuntime().load(artifact, threads=2).prefill(tokens)
        bound = CoreMLRuntime().load(artifact, threads=2, bound="fp16_accumulation").prefill(tokens)
        if precision is Dtype.FLOAT32:
            np.testing.assert_array_equal(bound, default)
        else:
            assert np.any(bound != default) and np.abs(bound - default).max() < 0.1
            assert np.mean(bound.argmax(1) == default.argmax(1)) >= 0.9
    with pytest.raises(ValueError, match="unknown arithmetic bound"):
        CoreMLRuntime().load(artifact, threads=2, bound="bf16")
