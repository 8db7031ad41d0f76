"""`compress bench`: the table files, the Pareto front, ratios to llama.cpp Q4_0, bad input, a failing entry."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import yaml

from compress.artifact import Availability
from compress.bench import BASELINE, BenchRequest, Entry, parse_depths, parse_peers, run_bench
from compress.bench_report import pareto_front, plot_points, render_markdown, rows, write_outputs
from compress.errors import ExitCode, InputError, RuntimeUnavailable
from compress.models.tiny import GPT2_MERGES
from compress.progress import Console
from compress.registry import Registry

QUIET = Console(quiet=True)
INT8 = {"weight_bits": 8, "group_size": 32, "symmetric": True, "activations": "int8_dynamic", "embedding": "int8",
        "lm_head": "int8"}


def _entry(name: str, size: float, kl: float, decode: float | None, peer: str = "", note: str = "") -> Entry:
    e = Entry(name, "peer" if peer else "build", "gguf", "llamacpp", "q", peer=peer, latency_note=note)
    e.metrics = {"size_mb": size, "mean_kl": kl, "top1_agreement": 0.9, "perplexity_ratio": 1.1}
    if decode is not None:  # three rounds: the table holds their median
        e.rounds = [{"load_s": 0.1, "ttft_s": 0.1 / f, "prefill_tok_s": 2 * decode * f, "decode_tok_s": decode * f,
                     "itl_p50_ms": 1000 / (decode * f), "itl_p95_ms": 1500 / (decode * f), "peak_rss_mb": 100.0}
                    for f in (0.5, 1.0, 3.0)]
    return e


PROTOCOL = {"model": "tiny", "threads": 2, "rounds": 3, "repeats": 5, "warmup": 1, "prefill_tokens": 128,
            "decode_tokens": 64, "date": "2026-01-01", "eval_set": {"windows": 8, "window_len": 256, "prompts": 4},
            "measured_on": {"cpu": "cpu", "logical_cores": 2, "os": "linux"}}


# ---- pure logic --------------------------------------------------------------------------------

def test_pareto_front_keeps_exactly_the_undominated_points():
    points = [("a", 1, 5), ("b", 2, 2), ("c", 3, 3), ("d", 5, 1), ("e", 2, 2.5), ("f", 1, 6)]
    assert pareto_front(points) == {"a", "b", "d"}  # c and e lose to b, f to a
    assert pareto_front([("x", 1, 1), ("y", 1, 1)]) == {"x", "y"}  # equal points dominate neither
    assert pareto_front([]) == set()


def test_speed_points_are_negated_so_faster_is_better():
    table = rows([_entry("slow", 10, 0.1, 10), _entry("fast", 10, 0.1, 50), _entry("coreml", 5, 0.2, None)])
    assert plot_points(table, "decode") == [("slow", -10, 0.1), ("fast", -50, 0.1)]
    assert pareto_front(plot_points(table, "decode")) == {"fast"}
    assert pareto_front(plot_points(table, "size")) == {"slow", "fast", "coreml"}


def test_ratios_are_to_the_q4_0_peer_of_the_same_run_from_round_medians():
    table = rows([_entry("ours", 100, 0.3, 60), _entry("q4_0", 90, 0.28, 40, peer=BASELINE)])
    ours, base = table
    assert ours["decode_tok_s"] == 60 and ours["prefill_tok_s"] == 120  # medians of the rounds
    assert ours["ttft_ms"] == pytest.approx(100) and ours["itl_p50_ms"] == pytest.approx(1000 / 60)
    assert ours["itl_p95_ms"] == pytest.approx(25) and ours["decode_spread"] == pytest.approx(2.5)  # (180 - 30) / 60
    assert ours["implied_gbs"] == pytest.approx(6.0)  # 100 MB read per token x 60 tok/s
    assert ours["decode_vs_q4_0"] == pytest.approx(1.5) and ours["prefill_vs_q4_0"] == pytest.approx(1.5)
    assert base["decode_vs_q4_0"] == 1.0
    alone = rows([_entry("ours", 100, 0.3, 60)])  # no Q4_0 peer: no ratio, never a made-up one
    assert alone[0]["decode_vs_q4_0"] is None


def test_unmeasured_latency_reads_not_measured_and_the_files_parse(tmp_path: Path):
    entries = [_entry("ios", 80, 0.25, None, note="Core ML prediction needs macOS"),
               _entry("q4_0", 90, 0.28, 40, peer=BASELINE)]
    broken = _entry("android", 120, 0.4, None)
    broken.error = "RuntimeError: boom"
    table = rows(entries + [broken])
    written = write_outputs(tmp_path, table, PROTOCOL)
    md = written["bench.md"].read_text()
    ios_line = next(line for line in md.splitlines() if line.startswith("| ios"))
    assert ios_line.count("not measured") == 9 and "Core ML prediction needs macOS" in md
    q4_line = next(line for line in md.splitlines() if line.startswith("| q4_0"))
    assert "| 40.0 | 250% | 25.0 | 37.5 | 3.6 |" in q4_line  # decode tok/s, spread, ITL p50 / p95 ms, GB/s
    assert "| android ⚠ |" in md and "FAILED: RuntimeError: boom" in md
    assert "1 warm-up + 5 repeats" in md and "median of 3 alternating rounds" in md
    data = json.loads(written["bench.json"].read_text())
    assert [r["name"] for r in data["rows"]] == ["ios", "q4_0", "android"] and data["protocol"]["threads"] == 2
    parsed = list(csv.DictReader(io.StringIO(written["bench.csv"].read_text())))
    assert parsed[1]["decode_tok_s"] == "40.0" and parsed[0]["decode_tok_s"] == "" and parsed[2]["error"]
    assert render_markdown(table, PROTOCOL) == md
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temporaries


def test_plots_are_written_with_matplotlib(tmp_path: Path):
    pytest.importorskip("matplotlib")
    from compress.bench_report import write_plots

    table = rows([_entry("a", 100, 0.3, 60), _entry("b", 90, 0.0, 40, peer=BASELINE),
                  _entry("c", 50, 0.5, None, note="needs macOS")])
    paths = write_plots(tmp_path, table, PROTOCOL)
    assert [p.name for p in paths] == ["bench_size_vs_kl.png", "bench_decode_vs_kl.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


# ---- bad input ---------------------------------------------------------------------------------

def test_peers_hold_the_deepest_depth_asked_for(tmp_path):
    """A peer made in the run gets a cache deep enough for every --depths decode (depth + 64 tokens), within the
    model's max_position_embeddings."""
    from compress.bench import PEER_CONTEXT, peer_context

    assert peer_context(BenchRequest(builds=(), peers=("eager",), out_dir=tmp_path), 8192) == PEER_CONTEXT == 2048
    deep = BenchRequest(builds=(), peers=("eager",), out_dir=tmp_path, depths=(512, 2048))
    assert peer_context(deep, 8192) == 2048 + 64 and peer_context(deep, 1024) == 1024  # the model's own limit


def test_peer_names_and_ranges_are_checked():
    assert parse_depths("2048, 512,512") == (512, 2048) and parse_depths("") == ()
    for bad in ("0", "-5", "1k", str(2**21)):
        with pytest.raises(InputError, match=f"--depths: '{bad}' is not a depth"):
            parse_depths(bad)
    assert parse_peers("eager, llamacpp-Q4_0,eager") == ("eager", "llamacpp-q4_0")
    assert parse_peers("none") == ()
    with pytest.raises(InputError, match=r"unknown peer 'llamacpp-q3'; valid: eager, llamacpp-source, .*q4_k_m"):
        parse_peers("llamacpp-q3")
    with pytest.raises(InputError, match=r"--threads 0: must be 1\.\."):
        BenchRequest((Path("x"),), threads=0)
    with pytest.raises(InputError, match=r"--threads 100000: must be 1\.\.\d+"):
        BenchRequest((Path("x"),), threads=100000)
    with pytest.raises(InputError, match="nothing to measure"):
        BenchRequest((), peers=())


@pytest.mark.parametrize("args, message", [
    (["{missing}"], "no such build directory"),
    (["{empty}"], "no manifest.json; not a completed compress build"),
    (["{empty}", "--threads", "999"], "--threads 999: must be 1.."),
    (["{empty}", "--peers", "eager,llama"], "unknown peer 'llama'; valid:"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path: Path, cli, args, message):
    (tmp_path / "empty").mkdir()
    args = [a.format(missing=tmp_path / "missing", empty=tmp_path / "empty") for a in args]
    result = cli("bench", *args, "--out", str(tmp_path / "bench"))
    assert result.code == ExitCode.BAD_INPUT, result.stderr
    assert result.stderr.startswith("error: ") and message in result.stderr and len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "bench").exists()


class _Unavailable:
    name = "llamacpp"

    def availability(self) -> Availability:
        return Availability(False, "llama-cpp-python is not installed; pip install 'compress[llamacpp]'")


def test_a_missing_runtime_stops_before_measuring_and_says_how_to_install(tiny_built, tmp_path: Path):
    registry = Registry("runtime")
    from compress.runtimes import RUNTIMES

    for name in RUNTIMES:
        registry.register(name, _Unavailable() if name == "llamacpp" else RUNTIMES.get(name))
    req = BenchRequest((tiny_built["ref"],), peers=("eager", "llamacpp-q4_0"), rounds=0, out_dir=tmp_path / "b")
    with pytest.raises(RuntimeUnavailable, match=r"peer 'llamacpp-q4_0'.*pip install 'compress\[llamacpp\]'") as err:
        run_bench(req, QUIET, registry)
    assert err.value.exit_code == ExitCode.RUNTIME_UNAVAILABLE


# ---- end to end on tiny builds -----------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_built(tmp_path_factory) -> dict[str, Path]:
    """A tiny model (with merges, so llama.cpp can load its GGUF) built as fp32 safetensors and int8 ONNX."""
    from compress.models.tiny import save_tiny_llama
    from tests.conftest import run_cli

    root = tmp_path_factory.mktemp("bench")
    model = save_tiny_llama(root / "tiny", seed=0, merges=GPT2_MERGES)
    targets = {"ref": {"export": {"format": "safetensors"}, "runtime": "torch_eager"}}
    try:
        import onnxruntime_genai  # noqa: F401

        targets["onnx8"] = {"stages": [{"quantize": INT8}], "export": {"format": "onnx", "max_context": 512},
                            "runtime": "onnxruntime"}
    except ImportError:
        pass
    (root / "t.yaml").write_text(yaml.safe_dump({"version": 1, "targets": targets}))
    out = {}
    for name in targets:
        result = run_cli("build", "--target", name, "--model", str(model), "--targets", str(root / "t.yaml"),
                         "--out", str(root / name), "--no-verify", env={"COMPRESS_HOME": str(root / "home")})
        assert result.code == 0, result.stderr
        out[name] = root / name
    return out


def test_bench_measures_builds_and_peers_and_a_failing_build_keeps_the_others(tiny_built, tmp_path: Path, cli):
    import shutil

    broken = tmp_path / "broken"  # a valid build whose artifact cannot hold the 256-token eval windows
    shutil.copytree(tiny_built["ref"], broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["artifact"]["max_context"] = 64
    manifest["target"]["name"] = "short"
    (broken / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "bench"
    builds = [str(p) for p in tiny_built.values()] + [str(broken)]
    result = cli("bench", *builds, "--peers", "eager", "--rounds", "1", "--repeats", "1", "--threads", "1",
                 "--out", str(out), "--depths", "300,100000")
    assert result.code == ExitCode.RUNTIME_UNAVAILABLE, result.stderr
    assert "1 of" in result.stderr and "short: ContextOverflow" in result.stderr
    data = json.loads((out / "bench.json").read_text())
    by_name = {r["name"]: r for r in data["rows"]}
    assert set(by_name) == set(tiny_built) | {"short", "eager fp32 (peer)"}
    assert by_name["short"]["error"].startswith("ContextOverflow") and by_name["short"]["decode_tok_s"] is None
    for name in [*tiny_built, "eager fp32 (peer)"]:
        row = by_name[name]
        assert not row["error"] and row["decode_tok_s"] > 0 and row["prefill_tok_s"] > 0 and row["size_mb"] > 0
        assert len(row["latency_rounds"]) == 1 and row["decode_vs_q4_0"] is None  # no Q4_0 peer asked for
        assert row["ttft_ms"] > 0 and 0 < row["itl_p50_ms"] <= row["itl_p95_ms"]
        # decode after 300 tokens in the cache is timed; no artifact holds 100,000 positions
        assert row["decode_tok_s_at_300"] > 0 and "decode_tok_s_at_100000" not in row
        assert row["depths_not_measured"]["100000"].startswith("needs 100064 positions; the artifact holds")
    assert by_name["ref"]["mean_kl"] == 0.0 and by_name["eager fp32 (peer)"]["mean_kl"] == 0.0
    if "onnx8" in by_name:
        assert 0 < by_name["onnx8"]["mean_kl"] < 0.05 and by_name["onnx8"]["runtime"] == "onnxruntime"
    assert data["protocol"]["threads"] == 1 and data["protocol"]["eval_set"]["window_len"] == 256
    assert data["protocol"]["copy_bandwidth_gbs"] > 0.1 and "copy bandwidth at --threads 1:" in result.stdout
    assert by_name["ref"]["implied_gbs"] == pytest.approx(by_name["ref"]["size_mb"] * by_name["ref"]["decode_tok_s"] / 1e3)
    assert result.stdout == (out / "bench.md").read_text()  # the table is printed too
    header = next(line for line in result.stdout.splitlines() if line.startswith("| artifact"))
    assert "| decode tok/s @300 | decode tok/s @100000 |" in header and "| TTFT ms |" in header
    assert "ref: decode @100000 not measured: needs 100064 positions" in result.stdout
    assert len(list(csv.DictReader((out / "bench.csv").open()))) == len(by_name)


def test_llamacpp_peers_are_quantized_from_the_reference_and_give_the_ratio_baseline(tiny_built, tmp_path: Path):
    pytest.importorskip("llama_cpp")
    req = BenchRequest((tiny_built["ref"],), peers=("llamacpp-q8_0", BASELINE), rounds=1, repeats=1,
                       out_dir=tmp_path / "b")
    result = run_bench(req, QUIET)
    table = {r["name"]: r for r in rows(result["entries"])}
    q8, q4 = table["llama.cpp q8_0 (peer)"], table["llama.cpp q4_0 (peer)"]
    assert q4["decode_vs_q4_0"] == 1.0 and q4["prefill_vs_q4_0"] == 1.0
    assert table["ref"]["decode_vs_q4_0"] == pytest.approx(table["ref"]["decode_tok_s"] / q4["decode_tok_s"])
    assert 0 < q8["mean_kl"] < q4["mean_kl"] and q8["size_mb"] > q4["size_mb"]


def test_onnxruntime_genai_builder_peers_are_its_defaults_on_the_reference_weights(tiny_built, tmp_path: Path):
    """What a web/desktop user would otherwise run: the builder with only `-p int4|int8 -e cpu`, from the same fp32
    weights, measured by the same harness on ONNX Runtime; what the builder chose is read back from its graph."""
    pytest.importorskip("onnxruntime_genai")
    req = BenchRequest((tiny_built["ref"],), peers=("ortgenai-int4", "ortgenai-int8"), rounds=1, repeats=1,
                       out_dir=tmp_path / "b")
    result = run_bench(req, QUIET)
    table = {r["name"]: r for r in rows(result["entries"])}
    int4, int8 = table["onnxruntime-genai builder int4 (peer)"], table["onnxruntime-genai builder int8 (peer)"]
    for row in (int4, int8):
        assert not row["error"] and row["runtime"] == "onnxruntime" and row["decode_tok_s"] > 0
        assert row["detail"].startswith("builder defaults: int") and "accuracy_level" in row["detail"]
    assert 0 < int8["mean_kl"] < int4["mean_kl"] and int4["size_mb"] < int8["size_mb"] < table["ref"]["size_mb"]
    record = next(e for e in result["entries"] if e.peer == "ortgenai-int4").artifact.record
    assert record["builder"] == "-p int4 -e cpu" and 4 in record["chosen"]["bits"]
    assert record["coverage"]["matmuls_quantized"] > 0


@pytest.mark.slow
def test_executorch_export_llm_peer_is_measured_on_the_executorch_runtime(tiny_built, tmp_path: Path):
    """What an Android developer would otherwise run: ExecuTorch's export_llm with its Llama XNNPACK config on the
    same fp32 weights, measured by the same harness and latency child; its deviations recorded."""
    pytest.importorskip("executorch")
    req = BenchRequest((tiny_built["ref"],), peers=("executorch-8da4w",), rounds=1, repeats=1, out_dir=tmp_path / "b")
    result = run_bench(req, QUIET)
    table = {r["name"]: r for r in rows(result["entries"])}
    peer = table["ExecuTorch export_llm 8da4w (peer)"]
    assert not peer["error"] and peer["runtime"] == "executorch" and peer["format"] == "pte"
    # 8da4w with a 4-bit embedding on this random 64-wide model measured 0.144 (the exporter's own test bounds a
    # wider model more tightly, per position)
    assert peer["decode_tok_s"] > 0 and peer["prefill_tok_s"] > 0 and 0 < peer["mean_kl"] < 0.3
    assert peer["size_mb"] < table["ref"]["size_mb"]
    record = next(e for e in result["entries"] if e.peer == "executorch-8da4w").artifact.record
    assert record["settings"]["qmode"] == "8da4w" and "group_size" in record["deviations"]
    assert set(peer["deviations"]) == set(record["deviations"]) and peer["deviations"]["group_size"]
    md = render_markdown(rows(result["entries"]), {**result["protocol"], "date": "today"})
    assert "ExecuTorch export_llm 8da4w (peer): group_size: 32, not the config's 128" in md
    assert (tmp_path / "b" / "logs" / "export_llm.log").is_file()


@pytest.mark.slow
def test_real_model_peers_eager_and_the_source_gguf(real_home: Path, tmp_path: Path, cli):
    pytest.importorskip("llama_cpp")
    out = tmp_path / "bench"
    result = cli("bench", "--model", "smollm2-135m", "--peers", "eager,llamacpp-source", "--rounds", "1",
                 "--repeats", "1", "--out", str(out), env={"COMPRESS_HOME": str(real_home)})
    assert result.code == 0, result.stderr
    by_peer = {r["peer"]: r for r in json.loads((out / "bench.json").read_text())["rows"]}
    assert by_peer["eager"]["mean_kl"] == 0.0 and by_peer["eager"]["size_mb"] > 500
    source = by_peer["llamacpp-source"]
    assert source["detail"] == "q4_1" and 0 < source["mean_kl"] < 0.01  # measured: 0.0034
    assert source["decode_tok_s"] > 5 and source["decode_vs_q4_0"] is None
    assert (out / "bench_size_vs_kl.png").is_file() and (out / "bench_decode_vs_kl.png").is_file()


def test_the_table_names_the_stage_quantized_weights():
    from compress.bench import quant_detail
    from compress.targets import parse_target

    def target(**raw):
        return parse_target({"runtime": {"name": "onnxruntime"}, **raw}, "t")

    stage = target(stages=[{"quantize": {"weight_bits": 4, "group_size": 32, "algorithm": "hqq",
                                         "activations": "int8_dynamic"}}], export={"format": "onnx"})
    eight = target(stages=[{"quantize": {"weight_bits": 8, "group_size": 32}}], export={"format": "onnx"})
    assert quant_detail(stage) == "int4 g32 hqq (stage), int8 act"
    assert quant_detail(eight) == "int8 g32 rtn (stage)"
    assert quant_detail(target(export={"format": "onnx"})) == "fp32"
    assert quant_detail(parse_target({"export": {"format": "safetensors"}, "runtime": "torch_eager"}, "r")) == \
        "float32"
    assert quant_detail(parse_target({"export": {"format": "gguf", "file_type": "q8_0"}, "runtime": "llamacpp"},
                                     "g")) == "q8_0"


def test_the_bench_table_goes_to_the_ci_job_summary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    entries = [_entry("android", 96, 0.02, 200), _entry("q4_0", 90, 0.28, 40, peer=BASELINE)]
    md = write_outputs(tmp_path / "bench", rows(entries), PROTOCOL)["bench.md"].read_text()
    assert summary.read_text() == md + "\n"


def test_the_cli_states_the_default_peers_it_uses():
    from click.testing import CliRunner

    from compress.bench import DEFAULT_PEERS
    from compress.cli import cli

    shown = CliRunner().invoke(cli, ["bench", "--help"], terminal_width=400).output
    assert f"(default: {', '.join(DEFAULT_PEERS)};" in " ".join(shown.split())


def test_a_formats_own_alternative_is_a_default_peer_only_when_that_format_is_benched():
    from compress.bench import DEFAULT_PEERS, EXECUTORCH_PEER, default_peers

    general = tuple(p for p in DEFAULT_PEERS if p not in ("ortgenai-int4", EXECUTORCH_PEER))
    assert default_peers(set()) == DEFAULT_PEERS  # peers alone: all of them
    assert default_peers({"onnx"}) == (*general, "ortgenai-int4")
    assert default_peers({"pte"}) == (*general, EXECUTORCH_PEER)
    assert default_peers({"gguf", "mlpackage"}) == general
    assert default_peers({"pte", "onnx", "gguf"}) == DEFAULT_PEERS


@pytest.mark.parametrize("rope, message", [
    ({"rope_type": "linear", "factor": 2.0}, "RoPE scaling 'linear' has no export_llm equivalent"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 8192}, "export_llm's llama3 RoPE fixes"),
])
def test_a_model_export_llm_cannot_hold_is_refused_before_any_work(tmp_path: Path, cli, rope, message):
    pytest.importorskip("executorch")
    from compress.models.tiny import save_tiny_llama

    model = save_tiny_llama(tmp_path / "tiny", rope_scaling=rope)
    result = cli("bench", "--model", str(model), "--peers", "eager,executorch-8da4w", "--rounds", "0",
                 "--out", str(tmp_path / "bench"))
    assert result.code == ExitCode.BAD_INPUT, result.stderr
    error = result.stderr.splitlines()[-1]  # after the model-resolving step's lines: one line, then nothing runs
    assert error.startswith("error: ") and message in error and "leave it out of --peers" in error
    assert "Running the fp32 reference" not in result.stderr
    assert not (tmp_path / "bench").exists()
