"""ONNX for ONNX Runtime, onnxruntime-genai and onnxruntime-web, built by onnxruntime-genai's model builder.

Why the builder and not `torch.onnx.export`: the builder writes the graph ONNX Runtime's own LLM stack runs
fastest, with fused ops (GroupQueryAttention with rotary inside and a KV cache that can be one pre-allocated
buffer, SkipSimplifiedLayerNormalization, MatMulNBits, GatherBlockQuantized), and it quantizes with ONNX
Runtime's own MatMulNBits quantizer. Measured here on SmolLM2-135M (2 threads, 128-token prompt): int4 block 32
decodes at ~130 tok/s with a shared KV buffer, against ~72 tok/s for a dynamo export of the HF model plus the
same quantizer (docs/architecture.md).

The builder writes `model.onnx` (+ `model.onnx.data`), `genai_config.json` and the tokenizer files (what
onnxruntime-genai loads); every pass here edits that graph, and the finished folder is then laid out the way
transformers.js loads it (`onnx/model_q4.onnx` + `onnx/model_q4.onnx_data`, `config.json`; exporters/onnx_layout.py).
Inputs `input_ids`, `attention_mask`, `past_key_values.N.key|value` and the optional `logits_to_keep` (0, its
default: every position; exporters/onnx_last_logits.py); outputs `logits`, `present.N.key|value`. Coverage is a post-condition: a MatMul left in fp32 that the config says to quantize fails
the export unless the target allows it; a `web` target fails when the graph uses an op onnxruntime-web lacks.
"""

from __future__ import annotations

import collections
import enum
import gc
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compress.exporters.base import atomic_dir, model_problems
from compress.exporters.onnx_codes import CORRECTION_SUFFIX, lower_codes
from compress.exporters.onnx_last_logits import add_logits_to_keep
from compress.exporters.onnx_layout import lay_out

from compress.artifact import Artifact, Availability, CacheShape
from compress.config import check_fields, setting
from compress.errors import ExportError, InputError, Problem
from compress.hashing import files_under
from compress.quantized import BITS_OF, Activations, Precision, QuantizeConfig, QuantizedWeights
from compress.rope import STATIC_ROPE

MODEL = "model.onnx"
DATA = "model.onnx.data"
GENAI_CONFIG = "genai_config.json"
SIDECAR = "compress-onnx.json"
_MS = "com.microsoft"
# Every op a builder graph for a Llama uses, each one in onnxruntime-web's WASM execution provider (CPU kernels,
# contrib ops included; checked by running the web artifact under onnxruntime-web in Node,
# tests/exporters/test_onnx.py). WebGPU is not run by any test. A `web` export fails if its graph holds anything else.
WEB_OPS = frozenset({
    (_MS, "MatMulNBits"), (_MS, "GroupQueryAttention"), (_MS, "SkipSimplifiedLayerNormalization"),
    (_MS, "GatherBlockQuantized"), ("", "SimplifiedLayerNormalization"), ("", "MatMul"), ("", "Gather"),
    ("", "Mul"), ("", "Sigmoid"), ("", "Add"), ("", "Sub"), ("", "Cast"), ("", "ReduceSum"), ("", "Shape"),
    ("", "Reshape"), ("", "Constant"), ("", "Transpose"), ("", "Slice"),
})
_IO_PATTERNS = ("input_ids", "attention_mask", "past_key_values.{}.key", "past_key_values.{}.value", "logits",
                "present.{}.key", "present.{}.value")


def _missing_modules() -> list[str]:
    wanted = {"onnx": "onnx", "onnxruntime": "onnxruntime", "onnxruntime_genai": "onnxruntime-genai"}
    return [pkg for mod, pkg in wanted.items() if importlib.util.find_spec(mod) is None]


class OnnxDeploy(enum.StrEnum):
    DESKTOP = "desktop"  # ONNX Runtime (CPU EP) / onnxruntime-genai
    WEB = "web"  # onnxruntime-web (WASM is tested): the graph must use only ops it ships


# MatMulNBits' block sizes (onnxruntime's CPU kernels and the onnxruntime-genai builder accept these).
ONNX_BLOCK_SIZES = (16, 32, 64, 128, 256)


@dataclass(frozen=True)
class OnnxOptions:
    max_context: int = setting(2048, ge=16, le=131072, doc="KV-cache length a session pre-allocates")
    max_opset: int = setting(22, ge=17, le=24, doc="highest ai.onnx opset the deploying runtime runs")
    external_data: bool = setting(True, doc="weights in a .onnx_data file beside the graph (false: one file)")
    deploy: OnnxDeploy = OnnxDeploy.DESKTOP
    allow_unquantized_matmuls: bool = setting(False, doc="let the export succeed when a MatMul is skipped")

    def __post_init__(self) -> None:
        check_fields(self)

    def codes_problems(self, q: QuantizeConfig) -> list[Problem]:
        """What MatMulNBits (block-wise int4/int8) and GatherBlockQuantized (the shared embedding) can hold."""
        out = []
        if q.group_size is None or q.group_size not in ONNX_BLOCK_SIZES:
            out.append(Problem("quantize.group_size", f"{q.group_size} is not a MatMulNBits block size (it is "
                                                      f"block-wise); choose one of {list(ONNX_BLOCK_SIZES)}"))
        if q.lm_head not in (Precision.FP32, Precision.INT8, Precision.INT4):
            out.append(Problem("quantize.lm_head", f"{q.lm_head.value!r} is not available for onnx; choose fp32, "
                                                   f"int8 or int4"))
        if q.embedding not in (Precision.FP32, q.lm_head):
            out.append(Problem("quantize.embedding", f"{q.embedding.value!r} with lm_head {q.lm_head.value!r}: the "
                                                     f"ONNX export either shares the output layer's quantized matrix "
                                                     f"with the embedding (set embedding: {q.lm_head.value}) or keeps "
                                                     f"it fp32 (embedding: fp32)"))
        odd = [o for o in q.overrides if o.weight_bits != 16 and o.group_size != q.group_size]
        if odd:
            out.append(Problem("quantize.overrides", f"{odd[0].pattern!r} sets group_size {odd[0].group_size}: the "
                                                     f"builder's fused QKV and gate/up MatMulNBits hold one block "
                                                     f"size; set group_size: {q.group_size} in the override"))
        return out

    def model_problems(self, config: Any, q: QuantizeConfig | None) -> list[Problem]:
        """What of the model (its HF config) the builder and our codes pass cannot hold: checked before any work."""
        out = model_problems(config, self.max_context, STATIC_ROPE, "the onnx exporter")
        if q is None:
            return out
        widths = {"hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size}
        bad = {name: w for name, w in widths.items() if w % q.group_size}
        if bad:
            fits = [b for b in ONNX_BLOCK_SIZES if all(w % b == 0 for w in widths.values())]
            out.append(Problem("quantize.group_size", f"{q.group_size} does not divide the model's "
                                                      f"{', '.join(f'{k} {v}' for k, v in bad.items())}; block "
                                                      f"sizes that fit: {fits}"))
        if q.embedding is not Precision.FP32 and not config.tie_word_embeddings:
            out.append(Problem("quantize.embedding", f"{q.embedding.value!r} needs tied embeddings (the ONNX export "
                                                     f"shares the output layer's quantized matrix); this model's are "
                                                     f"untied: use embedding: fp32"))
        return out


class OnnxExporter:
    format = "onnx"  # targets.yaml's export.format
    options = OnnxOptions
    runtimes = ("onnxruntime",)  # the runtimes that run this format
    artifact_name = "onnx"  # its name in the build directory
    version = "2"  # 2: the transformers.js layout (onnx/model_q4.onnx)

    def availability(self) -> Availability:
        missing = _missing_modules()
        if missing:
            return Availability(False, f"{', '.join(missing)} not installed; pip install 'compress[onnx]'")
        return Availability(True)

    def export(self, model: Any, tokenizer: Any, options: OnnxOptions, out_dir: Path, console: Any,
               quantized: QuantizedWeights | None = None) -> Artifact:
        config = model.config
        codes = quantized
        # With the quantize stage's codes the builder lays out the graph for their scheme (bits, block, lm_head,
        # shared embedding) and its own weights are then replaced by the codes; without them it writes fp32.
        q = codes.export_config() if codes is not None else None
        _check_model(config, options, q)
        builder_args = builder_arguments(q, config)
        with atomic_dir(out_dir) as tmp:
            work = tmp.with_name(f"{tmp.name}-work")
            shutil.rmtree(work, ignore_errors=True)
            try:
                with console.step("Writing the checkpoint the ONNX builder reads") as step:
                    model.save_pretrained(work / "source", safe_serialization=True)
                    tokenizer.save_pretrained(work / "source")
                generation = getattr(model, "generation_config", None)
                # The rest reads the config only, and the builder's child loads the weights again: where the caller
                # handed the model over (the build does), its fp32 weights are freed here (at 1B: 4.9 GB).
                del model
                gc.collect()
                with console.step(f"Building the ONNX graph (onnxruntime-genai builder, {_scheme(q)})") as step:
                    _run_builder(work / "source", tmp, work / "cache", builder_args, work / "builder.log")
                build_seconds = step["seconds"]
            finally:
                shutil.rmtree(work, ignore_errors=True)
            if q is not None and q.embedding is not Precision.FP32:
                _share_embedding(tmp)
            lowering = {}
            if codes is not None:
                with console.step("Lowering the quantize stage's codes into MatMulNBits") as step:
                    lowering = lower_codes(tmp / MODEL, codes, int(builder_args["accuracy_level"]))
                    step["detail"] = f"{lowering['with_integer_zero_points']} with zero points, " \
                                     f"{lowering['with_offset_correction']} with an offset correction"
            add_logits_to_keep(tmp / MODEL)  # a prompt may ask for its last position's logits only
            with console.step("Checking the graph") as step:
                graph = {**inspect_graph(tmp / MODEL, config.num_hidden_layers), **lowering}
                _check_graph(graph, options, q)
                step["detail"] = f"{graph['matmuls_quantized']}/{graph['matmuls_total']} MatMuls quantized, " \
                                 f"opset {graph['opset']}, {graph['nodes']} nodes"
            if not options.external_data:
                _inline_weights(tmp)
            _finish_folder(tmp, config, generation, tokenizer, options)
            main = lay_out(tmp, MODEL, DATA, q.weight_bits if q is not None else None, _head_dim(config))
            sidecar = {"model": main, "max_context": options.max_context, "vocab_size": config.vocab_size,
                       "num_layers": config.num_hidden_layers, "kv_heads": config.num_key_value_heads,
                       "head_dim": _head_dim(config), "deploy": options.deploy.value, "scheme": _scheme(q),
                       "builder_options": builder_args, "coverage": graph, "export_seconds": {"build": build_seconds}}
            (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=2))
        files = tuple(str(p) for p in files_under(out_dir))
        return Artifact(out_dir, self.format, files, main=main, max_context=options.max_context,
                        vocab_size=config.vocab_size,
                        cache=CacheShape(config.num_hidden_layers, config.num_key_value_heads, _head_dim(config)),
                        record={k: sidecar[k] for k in ("deploy", "scheme", "coverage", "export_seconds")})


# What `compress bench` compares against: the folder a user gets from onnxruntime-genai's builder run with its
# defaults for the CPU (`-p int4|int8 -e cpu`, nothing else), from the same fp32 checkpoint.
BUILDER_DEFAULT_PRECISIONS = ("int4", "int8")


def export_builder_defaults(model: Any, tokenizer: Any, precision: str, out_dir: Path, max_context: int = 2048
                            ) -> Artifact:
    """onnxruntime-genai's builder with nothing but `-p PRECISION -e cpu`: its own quantizer, block size,
    accuracy level and embedding handling, none of this exporter's passes. Its choices are read back from the
    graph into the artifact's record."""
    import onnx

    config = model.config
    with atomic_dir(out_dir) as tmp:
        work = tmp.with_name(f"{tmp.name}-work")
        shutil.rmtree(work, ignore_errors=True)
        try:
            model.save_pretrained(work / "source", safe_serialization=True)
            tokenizer.save_pretrained(work / "source")
            _run_builder(work / "source", tmp, work / "cache", {"precision": precision}, work / "builder.log")
        finally:
            shutil.rmtree(work, ignore_errors=True)
        graph = inspect_graph(tmp / MODEL, config.num_hidden_layers)
        nodes = [n for n in onnx.load(str(tmp / MODEL), load_external_data=False).graph.node
                 if n.op_type == "MatMulNBits"]
        chosen = {key: sorted({a.i for n in nodes for a in n.attribute if a.name == key})
                  for key in ("bits", "block_size", "accuracy_level")}
        chosen["with_zero_points"] = sum(len(n.input) > 3 and bool(n.input[3]) for n in nodes)
    files = tuple(str(p) for p in files_under(out_dir))
    return Artifact(out_dir, "onnx", files, main=MODEL, max_context=max_context, vocab_size=config.vocab_size,
                    cache=CacheShape(config.num_hidden_layers, config.num_key_value_heads, _head_dim(config)),
                    record={"builder": f"-p {precision} -e cpu", "chosen": chosen, "coverage": graph})


def _head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def _check_model(config: Any, options: OnnxOptions, q: QuantizeConfig | None) -> None:
    if problems := options.model_problems(config, q):
        raise InputError(str(problems[0]))


def builder_arguments(q: QuantizeConfig | None, config: Any) -> dict[str, str]:
    """Our quantization vocabulary in the builder's terms (`-p` precision plus KEY=VALUE extra options)."""
    if q is None:
        return {"precision": "fp32"}
    args = {"precision": f"int{q.weight_bits}", "block_size": str(q.group_size),
            "is_symmetric": str(q.symmetric).lower(), "algo_config": "rtn",
            # accuracy_level 4: int8 activations (dynamic, per block) inside MatMulNBits; 1: fp32 activations.
            "accuracy_level": "4" if q.activations is Activations.INT8_DYNAMIC else "1",
            # The tied embedding reads the output layer's quantized matrix (one copy) or stays fp32.
            "shared_embeddings": str(q.embedding is not Precision.FP32).lower()}
    if q.lm_head is Precision.FP32:
        args["nodes_to_exclude"] = "/lm_head/MatMul"
    elif BITS_OF[q.lm_head] != q.weight_bits:
        args["matmul_mixed_precision"] = f"last_matmul:{q.lm_head.value}"
    return args


def _scheme(q: QuantizeConfig | None) -> str:
    if q is None:
        return "fp32"
    act = ", int8 activations" if q.activations is Activations.INT8_DYNAMIC else ""
    sym = "sym" if q.symmetric else "asym"
    return f"int{q.weight_bits} block {q.group_size} {sym}{act}, lm_head {q.lm_head.value}, " \
           f"embedding {q.embedding.value}"


def _run_builder(source: Path, out: Path, cache: Path, args: dict[str, str], log: Path) -> None:
    """The builder runs in a child process: it prints a lot, appends to sys.path and holds the fp32 weights."""
    extra = [f"{k}={v}" for k, v in args.items() if k != "precision"]
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(source), "-o", str(out),
           "-p", args["precision"], "-e", "cpu", "-c", str(cache)]
    if extra:
        cmd += ["--extra_options", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as fh:
        proc = subprocess.run(cmd, check=False, stdout=fh, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        raise ExportError(f"onnxruntime-genai's builder failed (exit {proc.returncode}): "
                          f"{lines[-1] if lines else 'no output'}")


def inspect_graph(path: Path, num_layers: int) -> dict[str, Any]:
    """Ops, opset and quantization coverage of a builder graph (weights not loaded)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    ops = collections.Counter(f"{n.domain + '::' if n.domain else ''}{n.op_type}" for n in m.graph.node)
    opset = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
    plain = [n.name for n in m.graph.node if n.op_type == "MatMul" and n.domain == ""
             and not n.name.endswith(CORRECTION_SUFFIX)]  # a codes lowering's per-group offset term
    quantized = [n for n in m.graph.node if n.op_type == "MatMulNBits"]
    bits = collections.Counter(next((a.i for a in n.attribute if a.name == "bits"), 4) for n in quantized)
    embedding = next((n for n in m.graph.node if n.op_type in ("Gather", "GatherBlockQuantized")
                      and "input_ids" in n.input), None)
    names = {v.name for v in m.graph.input} | {v.name for v in m.graph.output}
    expected = {p.format(i) for p in _IO_PATTERNS for i in range(num_layers)}
    return {"nodes": len(m.graph.node), "opset": opset, "ops": dict(ops.most_common()),
            "matmuls_total": len(plain) + len(quantized), "matmuls_quantized": len(quantized),
            "unquantized_matmuls": plain, "matmulnbits_bits": {str(k): v for k, v in sorted(bits.items())},
            "embedding_op": embedding.op_type if embedding is not None else None,
            "missing_io": sorted(expected - names)}


def _check_graph(graph: dict[str, Any], options: OnnxOptions, q: QuantizeConfig | None) -> None:
    if graph["missing_io"]:
        raise ExportError(f"the graph lacks the inputs/outputs loaders expect: {graph['missing_io'][:4]}")
    if graph["opset"] > options.max_opset:
        raise ExportError(f"the graph needs ai.onnx opset {graph['opset']}; export.max_opset is "
                          f"{options.max_opset} (raise it if the deploying runtime runs opset {graph['opset']})")
    if q is not None:
        skipped = [n for n in graph["unquantized_matmuls"] if not (q.lm_head is Precision.FP32 and "lm_head" in n)]
        if skipped and not options.allow_unquantized_matmuls:
            raise ExportError(f"{len(skipped)} MatMul(s) left in fp32: {skipped[:3]}; set "
                              f"export.allow_unquantized_matmuls: true to accept")
    if options.deploy is OnnxDeploy.WEB:
        unknown = sorted(op for op in graph["ops"] if _op_key(op) not in WEB_OPS)
        if unknown:
            raise ExportError(f"ops not in onnxruntime-web's set: {unknown}")


def _op_key(op: str) -> tuple[str, str]:
    domain, _, name = op.rpartition("::")
    return domain, name


def _share_embedding(folder: Path) -> None:
    """Point the embedding lookup at the output layer's quantized matrix where the builder left an fp32 copy.

    The builder shares the tied matrix (Reshape -> GatherBlockQuantized over the lm_head's MatMulNBits weight)
    when the body is int4, but with an int8 body (0.18.0) it keeps a separate fp32 embedding: 113 MB of the
    270 MB int8 model. This pass writes the same Reshape -> GatherBlockQuantized the builder writes itself.
    """
    import onnx
    from onnx import helper

    m = onnx.load(str(folder / MODEL), load_external_data=False)
    graph = m.graph
    inits = {t.name: t for t in graph.initializer}
    gather = next((n for n in graph.node if n.op_type == "Gather" and "input_ids" in n.input
                   and n.input[0] in inits), None)
    head = next((n for n in graph.node if n.op_type == "MatMulNBits" and "logits" in n.output), None)
    if gather is None or head is None:
        return
    attrs = {a.name: a.i for a in head.attribute}
    shape = helper.make_tensor("/model/embed_tokens/shape", onnx.TensorProto.INT64, [2], [attrs["N"], attrs["K"]])
    reshape = helper.make_node("Reshape", [head.input[1], shape.name], ["/model/embed_tokens/Reshape/output_0"],
                               name="/model/embed_tokens/Reshape")
    inputs = ["/model/embed_tokens/Reshape/output_0", gather.input[1], head.input[2]]
    if len(head.input) > 3 and head.input[3]:
        inputs.append(head.input[3])  # zero points (asymmetric)
    lookup = helper.make_node("GatherBlockQuantized", inputs, list(gather.output), domain=_MS,
                              name="/model/embed_tokens/GatherBlockQuantized", bits=attrs["bits"],
                              block_size=attrs["block_size"], gather_axis=0, quantize_axis=1)
    m = onnx.load(str(folder / MODEL))  # with weights: the fp32 copy is dropped and the data file rewritten
    graph = m.graph
    index = next(i for i, n in enumerate(graph.node) if n.name == gather.name)
    graph.node.remove(graph.node[index])
    graph.node.insert(index, lookup)
    graph.node.insert(index, reshape)
    graph.initializer.remove(next(t for t in graph.initializer if t.name == gather.input[0]))
    graph.initializer.append(shape)
    (folder / DATA).unlink()
    onnx.save(m, str(folder / MODEL), save_as_external_data=True, all_tensors_to_one_file=True, location=DATA,
              size_threshold=1024)


def _inline_weights(folder: Path) -> None:
    import onnx

    m = onnx.load(str(folder / MODEL))
    if m.ByteSize() >= 2**31:
        raise ExportError("export.external_data: false needs a model under 2 GB (protobuf's limit)")
    onnx.save(m, str(folder / MODEL))
    (folder / DATA).unlink(missing_ok=True)


def _finish_folder(folder: Path, config: Any, generation: Any, tokenizer: Any, options: OnnxOptions) -> None:
    """genai_config's context and search length; config.json and generation_config.json for HF-style loaders."""
    path = folder / GENAI_CONFIG
    genai = json.loads(path.read_text())
    genai["model"]["context_length"] = options.max_context
    genai["search"]["max_length"] = options.max_context
    path.write_text(json.dumps(genai, indent=4))
    config.save_pretrained(folder)
    if generation is not None:
        generation.save_pretrained(folder)
    if not (folder / "tokenizer.json").exists():  # the builder copies the tokenizer it read; keep it when present
        tokenizer.save_pretrained(folder)
