"""`compress bench`: built artifacts and peers measured by one protocol in one run, written as one table.

Every entry (a build directory's artifact, or a peer made here from the same fp32 reference) runs the SAME
evaluation windows and prompts (the harness's default `EvalSpec`) on its own runtime, compared with the same
reference logits; then latency is measured in a child process per entry (`runtimes/latency.py`), entries
alternating round by round so a noisy machine hits them all alike, and each metric is the median of the rounds.

Peers: `eager` (the fp32 checkpoint on eager PyTorch), `llamacpp-<type>` (the reference written as a GGUF by
exporters/gguf.py, quantized by llama.cpp's own quantizer for q4_0/q4_k_m/q5_k_m), `llamacpp-source` (the
catalog model's own GGUF, or the .gguf file the model was converted from), `ortgenai-int4|int8`
(onnxruntime-genai's model builder with its CPU defaults) and `executorch-8da4w` (ExecuTorch's own LLM export,
its documented Llama XNNPACK config). Each peer runs with its tool's defaults; deviations are in its record.

Inputs are all checked before anything is measured (exit 2 or 5). After that, an entry that fails keeps its
row, with the error, and the others are still measured and written; the command then exits 5.
"""

from __future__ import annotations

import os
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compress import models
from compress.artifact import Artifact
from compress.errors import InputError, RuntimeUnavailable
from compress.exporters.executorch_llm import config_problem, export_llm_peer
from compress.exporters.gguf import GgufExporter, GgufOptions, GgufType
from compress.exporters.onnx import BUILDER_DEFAULT_PRECISIONS, OnnxExporter, export_builder_defaults
from compress.exporters.safetensors import SafetensorsExporter
from compress.home import native_logs_in
from compress.manifest import Manifest
from compress.quantized import Activations
from compress.registry import Registry
from compress.runtimes import RUNTIMES
from compress.runtimes.base import Runtime
from compress.stages.configs import StageKind
from compress.targets import EvalSpec, TargetSpec, parse_target
from compress.threads import torch_threads
from compress.verification import stop_ids

EAGER = "eager"
SOURCE = "llamacpp-source"
LLAMACPP_PREFIX = "llamacpp-"
ORTGENAI_PREFIX = "ortgenai-"  # onnxruntime-genai's model builder with its CPU defaults (exporters/onnx.py)
EXECUTORCH_PEER = "executorch-8da4w"  # ExecuTorch's own LLM export, its Llama XNNPACK config (exporters/executorch_llm.py)
BASELINE = "llamacpp-q4_0"  # speed ratios are stated against this peer, measured in the same run
DEFAULT_PEERS = (EAGER, "llamacpp-q8_0", BASELINE, "llamacpp-q4_k_m", SOURCE, "ortgenai-int4", EXECUTORCH_PEER)
# A peer that is the alternative to one format only joins the default peers when a build of that format is benched
# (or when no build is): ExecuTorch's own export costs ~13 minutes at 135M, for nothing when only ONNX is measured.
FORMAT_PEERS = {"ortgenai-int4": "onnx", EXECUTORCH_PEER: "pte"}
LATENCY_KEYS = ("load_s", "ttft_s", "prefill_tok_s", "decode_tok_s", "itl_p50_ms", "itl_p95_ms", "peak_rss_mb")


def valid_peers() -> list[str]:
    return ([EAGER, SOURCE] + [LLAMACPP_PREFIX + t.value for t in GgufType]
            + [ORTGENAI_PREFIX + p for p in BUILDER_DEFAULT_PRECISIONS] + [EXECUTORCH_PEER])


def peer_runtime(peer: str) -> str:
    """The runtime a peer is measured on."""
    if peer == EAGER:
        return "torch_eager"
    if peer == EXECUTORCH_PEER:
        return "executorch"
    return "onnxruntime" if peer.startswith(ORTGENAI_PREFIX) else "llamacpp"


def default_peers(formats: set[str]) -> tuple[str, ...]:
    """The peers a bench measures when `--peers` is not given, for builds of these formats (none: every peer)."""
    return tuple(p for p in DEFAULT_PEERS if p not in FORMAT_PEERS or not formats or FORMAT_PEERS[p] in formats)


def parse_peers(raw: str) -> tuple[str, ...]:
    """`--peers a,b,c` (or `none`): each name checked, order kept, duplicates dropped."""
    names = [p.strip().lower() for p in raw.split(",") if p.strip()]
    if names == ["none"]:
        return ()
    unknown = [p for p in names if p not in valid_peers()]
    if unknown:
        raise InputError(f"unknown peer {unknown[0]!r}; valid: {', '.join(valid_peers())} (or 'none')")
    return tuple(dict.fromkeys(names))


MAX_DEPTH = 1 << 20


def parse_depths(raw: str) -> tuple[int, ...]:
    """`--depths 512,2048`: context depths (tokens in the cache) at which decode is also timed; sorted, unique."""
    depths = []
    for part in (p.strip() for p in raw.split(",") if p.strip()):
        if not part.isdigit() or not 1 <= int(part) <= MAX_DEPTH:
            raise InputError(f"--depths: {part!r} is not a depth (a whole number of tokens, 1..{MAX_DEPTH})")
        depths.append(int(part))
    return tuple(sorted(set(depths)))


@dataclass(frozen=True)
class BenchRequest:
    builds: tuple[Path, ...]
    peers: tuple[str, ...] | None = None  # None: default_peers() for the builds' formats
    threads: int = 2
    rounds: int = 3  # alternating latency rounds; 0 measures accuracy only
    repeats: int = 5
    out_dir: Path = Path("out/bench")
    model: str | None = None  # the reference when no build directory is given
    eval_data: str | None = None
    depths: tuple[int, ...] = ()  # decode also timed with this many tokens in the cache (compress.bench.parse_depths)

    def __post_init__(self) -> None:
        cores = os.cpu_count() or 1
        if not 1 <= self.threads <= cores:
            raise InputError(f"--threads {self.threads}: must be 1..{cores} (this machine's logical cores)")
        if not 0 <= self.rounds <= 50:
            raise InputError(f"--rounds {self.rounds}: must be 0..50 (0 measures accuracy only)")
        if not 1 <= self.repeats <= 1000:
            raise InputError(f"--repeats {self.repeats}: must be 1..1000")
        if not self.builds and self.peers == ():
            raise InputError("nothing to measure: give at least one build directory or peer")
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise InputError(f"--out {self.out_dir}: exists and is not a directory")


@dataclass
class Entry:
    """One row: an artifact to measure (None for a peer made during the run), and everything measured on it."""

    name: str
    kind: str  # "build" or "peer"
    format: str
    runtime: str
    detail: str  # what the artifact is: quantization scheme, file type
    artifact: Artifact | None = None
    gguf_type: GgufType | None = None  # a llama.cpp peer exported during the run
    builder_precision: str = ""  # an onnxruntime-genai builder peer exported during the run (int4, int8)
    metrics: dict[str, float] = field(default_factory=dict)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    error: str = ""  # why this entry has no (or incomplete) numbers
    latency_note: str = ""  # why latency is not measured here (not an error: e.g. Core ML on Linux)
    peer: str = ""  # the --peers name, for a peer
    runtime_settings: dict[str, Any] = field(default_factory=dict)  # the runtime's deviations from its defaults

    def latency(self) -> dict[str, float]:
        """Median over the rounds of each latency metric, and the decode speed's spread over the rounds
        ((max - min) / median, from two rounds on)."""
        if not self.rounds:
            return {}
        medians = {k: statistics.median(r[k] for r in self.rounds) for k in LATENCY_KEYS}
        decode = [r["decode_tok_s"] for r in self.rounds]
        if len(decode) > 1:
            medians["decode_spread"] = (max(decode) - min(decode)) / medians["decode_tok_s"]
        for depth in self.rounds[0].get("decode_tok_s_at_depth", {}):
            medians[depth_key(depth)] = statistics.median(r["decode_tok_s_at_depth"][depth] for r in self.rounds)
        return medians

    def depth_notes(self) -> dict[str, str]:
        """Depths this entry's context cannot hold, and why."""
        return self.rounds[0].get("depths_not_measured", {}) if self.rounds else {}


def depth_key(depth: int | str) -> str:
    return f"decode_tok_s_at_{depth}"


def quant_detail(target: TargetSpec) -> str:
    """A short description of a build's weights: `int4 g32 hqq (stage), int8 act` / `q8_0` / `float32` / `fp32`."""
    options = target.export.options
    if isinstance(options, GgufOptions):
        return options.file_type.value
    q = next((s.config for s in target.stages if s.kind is StageKind.QUANTIZE), None)
    if q is None:
        return str(getattr(options, "dtype", "fp32"))
    group = f"g{q.group_size}" if q.group_size else "per-channel"
    text = f"int{q.weight_bits} {group} {q.algorithm.value} (stage)"  # the stage's codes, lowered as they are
    if q.activations is Activations.INT8_DYNAMIC:
        text += ", int8 act"
    return text


def _check_runtime(runtime: Runtime, what: str) -> Any:
    available = runtime.availability()
    if not available.ok:
        raise RuntimeUnavailable(f"{what} runs on {runtime.name}, which is unavailable here: {available.reason}")
    return available


def collect_builds(req: BenchRequest, runtimes: Registry[Runtime]) -> tuple[list[Entry], dict[str, Any] | None]:
    """Every build directory checked (manifest, file hashes, one reference model, runtime installed)."""
    entries: list[Entry] = []
    model: dict[str, Any] | None = None
    names: set[str] = set()
    for out_dir in req.builds:
        if not out_dir.is_dir():
            raise InputError(f"{out_dir}: no such build directory")
        manifest = Manifest.read(out_dir)
        manifest.check_files(out_dir)
        if model is None:
            model = manifest.model
        elif manifest.model["sha256"] != model["sha256"]:
            raise InputError(f"{out_dir} was built from {manifest.model['spec']!r}, not {model['spec']!r} like the "
                             f"first build: one bench compares one model")
        target = parse_target(manifest.target["spec"], manifest.target["name"])
        artifact = manifest.artifact_obj(out_dir)
        runtime = runtimes.get(target.runtime.name)
        available = _check_runtime(runtime, f"build {out_dir}")
        name = target.name if target.name not in names else f"{target.name} ({out_dir.name})"
        names.add(name)
        entries.append(Entry(name, "build", artifact.format, runtime.name, quant_detail(target),
                             artifact, latency_note=available.latency_unmeasured))
    return entries, model


def source_gguf(source: models.ModelSource) -> Path | None:
    from compress.models.default import CATALOG

    if source.kind is models.SourceKind.CATALOG and source.spec in CATALOG:  # a shape-true model has none
        entry = CATALOG[source.spec]
        return entry.model_dir() / Path(entry.member).name
    if source.kind is models.SourceKind.GGUF:
        return Path(source.reopen)
    return None


PEER_CONTEXT = 2048  # positions a peer's cache holds unless --depths needs more


def peer_context(req: BenchRequest, max_positions: int) -> int:
    """Positions a peer is made with: PEER_CONTEXT, or what the deepest --depths decode needs (depth + the decoded
    tokens), so every peer is measured at every depth a build is; never beyond the model's own positions."""
    return min(max([PEER_CONTEXT] + [d + EvalSpec().decode_tokens for d in req.depths]), max_positions)


def _max_positions(checkpoint: Path) -> int:
    import json

    config = json.loads((checkpoint / "config.json").read_text())
    return int(config.get("max_position_embeddings") or PEER_CONTEXT)


def collect_peers(req: BenchRequest, peers: tuple[str, ...], source: models.ModelSource,
                  runtimes: Registry[Runtime]) -> list[Entry]:
    from compress.exporters.gguf import describe_gguf

    context = peer_context(req, _max_positions(source.checkpoint))
    entries = []
    for peer in peers:
        if peer == EAGER:
            ckpt = source.checkpoint
            files = tuple(str(p.relative_to(ckpt)) for p in sorted(ckpt.rglob("*")) if p.is_file())
            art = Artifact(ckpt, SafetensorsExporter.format, files, max_context=context)
            entries.append(Entry("eager fp32 (peer)", "peer", art.format, "torch_eager", "fp32", art, peer=peer))
            continue
        runtime = runtimes.get(peer_runtime(peer))
        _check_runtime(runtime, f"peer {peer!r} (leave it out of --peers to skip it)")
        if peer.startswith(ORTGENAI_PREFIX):
            precision = peer[len(ORTGENAI_PREFIX):]
            entries.append(Entry(f"onnxruntime-genai builder {precision} (peer)", "peer", "onnx", runtime.name,
                                 f"builder defaults (-p {precision} -e cpu)", builder_precision=precision, peer=peer))
        elif peer == EXECUTORCH_PEER:
            entries.append(Entry("ExecuTorch export_llm 8da4w (peer)", "peer", "pte", runtime.name,
                                 "export_llm, llama_xnnpack.yaml: 8da4w group 32, embedding 4,32, custom SDPA + KV "
                                 "cache, XNNPACK", peer=peer))
        elif peer == SOURCE:
            path = source_gguf(source)
            if path is None or not path.is_file():
                raise InputError(f"peer {SOURCE!r}: model {source.spec!r} has no source GGUF (only a catalog model "
                                 f"or a .gguf file has one); leave it out of --peers")
            info = describe_gguf(path)
            art = Artifact(path, GgufExporter.format, (path.name,), max_context=context, record=info)
            counts = {k: n for k, n in info["tensor_type_counts"].items() if k not in ("F32", "F16")}
            ftype = max(counts, key=counts.get).lower() if counts else "f32"  # the type most tensors have
            entries.append(Entry(f"llama.cpp source {ftype} (peer)", "peer", "gguf", "llamacpp", ftype, art, peer=peer))
        else:
            gtype = GgufType(peer[len(LLAMACPP_PREFIX):])
            entries.append(Entry(f"llama.cpp {gtype.value} (peer)", "peer", "gguf", "llamacpp", gtype.value,
                                 gguf_type=gtype, peer=peer))
    return entries


def copy_bandwidth_gbs(threads: int, mib: int = 256, repeats: int = 5) -> float:
    """This machine's memory copy bandwidth with `threads` threads: the best of `repeats` copies of a `mib` MiB
    fp32 tensor, counting the bytes read and the bytes written (STREAM's Copy). A decode step that reads every
    weight once cannot go faster than this allows."""
    import time

    import torch

    src = torch.ones(mib << 18)  # mib MiB of fp32
    dst = torch.empty_like(src)
    best = float("inf")
    with torch_threads(threads):
        for _ in range(repeats):
            start = time.perf_counter()
            dst.copy_(src)
            best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / best / 1e9


def _error(err: BaseException) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())[:300]


def run_bench(req: BenchRequest, console: Any, runtimes: Registry[Runtime] = RUNTIMES) -> dict[str, Any]:
    """Measure every entry; return the results (see compress/bench_report.py for the files)."""
    from compress.data.corpus import build_eval_set
    from compress.exporters.gguf import GgufExporter
    from compress.progress import Console
    from compress.runtimes.harness import measure_accuracy, measured_on, run_reference
    from compress.runtimes.latency import measure_latency
    from compress.runtimes.torch_eager import TorchEagerRuntime

    entries, model_record = collect_builds(req, runtimes)
    peers = req.peers if req.peers is not None else default_peers({e.format for e in entries})
    for peer in peers:  # before the model is resolved (a first fetch takes ~30 s)
        if peer != EAGER:
            _check_runtime(runtimes.get(peer_runtime(peer)), f"peer {peer!r} (leave it out of --peers to skip it)")
        if peer.startswith(ORTGENAI_PREFIX) and not (builder := OnnxExporter().availability()).ok:
            raise RuntimeUnavailable(f"peer {peer!r} is made by onnxruntime-genai's builder: {builder.reason}")
    with console.step("Resolving the reference model") as step:
        source = models.resolve(model_record["reopen"] if model_record else (req.model or "smollm2-135m"), console)
        if model_record and source.sha256 != model_record["sha256"]:
            raise InputError(f"reference model {model_record['spec']!r} changed since the builds (sha256 "
                             f"{source.sha256[:12]} != {model_record['sha256'][:12]}); rebuild them")
        step["detail"] = f"{source.spec}, sha256 {source.sha256[:12]}"
    if EXECUTORCH_PEER in peers:  # a model export_llm cannot hold is refused here, not after the reference run
        from transformers import AutoConfig

        if problem := config_problem(AutoConfig.from_pretrained(source.checkpoint)):
            raise InputError(f"{problem}; leave it out of --peers")
    entries += collect_peers(req, peers, source, runtimes)
    loaded = models.load(source)
    peer_ctx = peer_context(req, _max_positions(source.checkpoint))
    spec = EvalSpec(repeats=req.repeats)
    eval_set = build_eval_set(loaded.tokenizer, spec, req.eval_data)
    stops = stop_ids(loaded.tokenizer)

    def decode(ids: list[int]) -> str:
        return loaded.tokenizer.decode(ids, skip_special_tokens=False)

    prompt = list(eval_set.latency_prompt)
    quiet = Console(quiet=True)
    with tempfile.TemporaryDirectory(prefix="compress-bench-") as work, native_logs_in(req.out_dir / "logs"):
        with torch_threads(req.threads):
            with console.step("Running the fp32 reference (eager PyTorch)"):
                ref = run_reference(TorchEagerRuntime.session_for(loaded.model), eval_set, spec.greedy_tokens,
                                    stops, quiet)
            for e in entries:
                with console.step(f"Accuracy: {e.name} on {e.runtime}") as step:
                    try:
                        if e.gguf_type is not None:  # a peer quantized by llama.cpp from the same fp32 weights
                            e.artifact = GgufExporter().export(loaded.model, loaded.tokenizer,
                                                               GgufOptions(file_type=e.gguf_type,
                                                                           max_context=peer_ctx),
                                                               Path(work) / f"{e.gguf_type.value}.gguf", quiet)
                        elif e.builder_precision:  # onnxruntime-genai's builder, its defaults, the same weights
                            e.artifact = export_builder_defaults(loaded.model, loaded.tokenizer, e.builder_precision,
                                                                 Path(work) / f"ortgenai-{e.builder_precision}")
                            chosen = e.artifact.record["chosen"]
                            e.detail = (f"builder defaults: int{'/'.join(map(str, chosen['bits']))} block "
                                        f"{'/'.join(map(str, chosen['block_size']))}, accuracy_level "
                                        f"{'/'.join(map(str, chosen['accuracy_level']))}, "
                                        f"{chosen['with_zero_points']} with zero points")
                        elif e.peer == EXECUTORCH_PEER:  # ExecuTorch's own LLM export of the same weights
                            e.artifact = export_llm_peer(loaded.model, loaded.tokenizer, Path(work) / "executorch-peer",
                                                         peer_ctx, req.out_dir / "logs" / "export_llm.log")
                        session = runtimes.get(e.runtime).load(e.artifact, req.threads)
                        e.runtime_settings = dict(getattr(session, "settings", {}))
                        e.metrics, _ = measure_accuracy(session, ref, eval_set, spec.greedy_tokens, stops, decode,
                                                        quiet)
                        del session
                        e.metrics["size_mb"] = e.artifact.size_bytes() / 1e6
                        step["detail"] = f"mean KL {e.metrics['mean_kl']:.4g}, top-1 {e.metrics['top1_agreement']:.3f}"
                    except Exception as err:  # noqa: BLE001  one entry failing must not lose the others
                        e.error = _error(err)
                        if e.artifact is not None and e.artifact.path.exists():
                            e.metrics["size_mb"] = e.artifact.size_bytes() / 1e6
                        step["detail"] = f"FAILED: {e.error}"
        timed = [e for e in entries if not e.error and not e.latency_note]
        bandwidth = None
        if req.rounds and timed:
            with console.step(f"Measuring this machine's copy bandwidth ({req.threads} threads)") as step:
                bandwidth = copy_bandwidth_gbs(req.threads)
                step["detail"] = f"{bandwidth:.1f} GB/s"
        for r in range(req.rounds):
            for e in timed:
                if e.error:
                    continue
                with console.step(f"Latency round {r + 1}/{req.rounds}: {e.name}") as step:
                    try:
                        lat = measure_latency(e.runtime, e.artifact, req.threads, prompt, spec.decode_tokens,
                                              spec.warmup, req.repeats, depths=req.depths)
                        e.rounds.append({k: lat[k] for k in (*LATENCY_KEYS, "decode_tok_s_at_depth",
                                                             "depths_not_measured")})
                        step["detail"] = f"prefill {lat['prefill_tok_s']:.0f} tok/s, decode {lat['decode_tok_s']:.1f}"
                    except Exception as err:  # noqa: BLE001
                        e.error = f"latency: {_error(err)}"
                        step["detail"] = f"FAILED: {e.error}"
    if req.rounds == 0:
        for e in entries:
            e.latency_note = e.latency_note or "latency not measured (--rounds 0)"
    protocol = {
        "model": source.spec, "model_sha256": source.sha256, "threads": req.threads, "rounds": req.rounds,
        "repeats": req.repeats, "warmup": spec.warmup, "prefill_tokens": len(prompt),
        "decode_tokens": spec.decode_tokens, "depths": list(req.depths), "eval_set": eval_set.summary(),
        "baseline": BASELINE,
        "measured_on": measured_on(req.threads), "copy_bandwidth_gbs": bandwidth if req.rounds else None,
    }
    return {"protocol": protocol, "entries": entries}
