"""ExecuTorch `.pte` for XNNPACK: our export-friendly Llama, ExecuTorch's in-place KV-cache op, attention
on XNNPACK (or ExecuTorch's custom SDPA kernel, `export.attention`), the quantize stage's codes lowered into
XNNPACK's integer layouts (exporters/xnnpack_codes.py), XNNPACK lowering.

The program has one method, `forward(tokens (1, seq), input_pos (1,)) -> logits (1, 1, vocab)`, with a
dynamic `seq` (1..max_seq_len), so a prompt prefills in calls of up to max_seq_len tokens and decode is seq = 1. It
returns the last position's logits, as ExecuTorch's own LLM export does (`export.logits: all` returns (1, seq, vocab)).
Beside the program: `tokenizer.json` and `compress-pte.json` (ids, context, coverage), and the runner's
metadata is baked into the program as constant methods (get_bos_id, get_eos_ids, get_max_context_len...).
Coverage is a post-condition: a linear left outside XNNPACK fails the export unless the target allows it.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import gc
import importlib.util
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from compress.exporters.base import atomic_dir, model_problems
from compress.exporters.kv_cache import KvCachePrecision

from compress.artifact import Artifact, Availability
from compress.config import check_fields, setting
from compress.errors import ExportError, InputError, Problem
from compress.hashing import files_under
from compress.quantized import Activations, QuantizeConfig, QuantizedWeights
from compress.rope import STATIC_ROPE

PROGRAM = "model.pte"
DATA_TAG = "model"  # external data (export.external_data) goes to DATA_TAG + ".ptd"
DATA = DATA_TAG + ".ptd"
SIDECAR = "compress-pte.json"
DEFAULT_SEQ_LEN = 256  # tokens per call unless export.max_seq_len says otherwise: the harness's windows in one call
# Weight matmuls (names as _count_delegation normalizes them): none may run on portable kernels. Attention's
# bmm, the custom cache/SDPA ops, the quantized embedding and shape bookkeeping may stay outside.
_LINEAR_OPS = frozenset({"linear", "addmm", "mm"})


def _needed_modules() -> list[str]:
    return [m for m in ("executorch", "torchao") if importlib.util.find_spec(m) is None]


class PteLogits(enum.StrEnum):
    LAST = "last"  # each call returns its last position's logits: what an app needs (export_llm's default)
    ALL = "all"  # every position's logits (1, seq, vocab)


class PteAttention(enum.StrEnum):
    XNNPACK = "xnnpack"  # bmm/softmax over the written cache prefix on XNNPACK: faster prefill
    CUSTOM_SDPA = "custom_sdpa"  # ExecuTorch's custom SDPA kernel (what its own LLM export uses): faster decode


@dataclass(frozen=True)
class PteOptions:
    max_context: int = setting(512, ge=16, le=32768, doc="KV-cache length baked into the program")
    # Like export_llm's max_seq_length: a longer prompt is prefilled in chunks (the stock runner reads it from
    # get_max_seq_len). ExecuTorch plans memory for the largest call, so this bounds activations and logits.
    max_seq_len: int | None = setting(None, ge=1, le=32768,
                                      doc="most tokens one call takes (default: 256, or max_context if smaller)")
    backend: str = setting("xnnpack", choices=("xnnpack",))
    attention: PteAttention = PteAttention.XNNPACK
    # The KV cache's storage (exporters/kv_cache.py): fp16 and int8 need attention: custom_sdpa
    kv_cache: KvCachePrecision = KvCachePrecision.FP32
    # `last`: the lm_head runs on one row per call, and ExecuTorch plans (1, 1, vocab) logits instead of
    # (1, max_seq_len, vocab); verification then feeds its windows one token per call (runtimes/executorch.py)
    logits: PteLogits = PteLogits.LAST
    allow_unquantized_linears: bool = setting(False, doc="let the export succeed when a linear is skipped")
    external_data: bool = setting(True, doc="weights in model.ptd beside model.pte (tied weights stored once)")

    def __post_init__(self) -> None:
        extra = []
        if self.max_seq_len is not None and self.max_seq_len > self.max_context:
            extra.append(Problem("max_seq_len", f"{self.max_seq_len} exceeds max_context {self.max_context}"))
        if self.kv_cache is not KvCachePrecision.FP32 and self.attention is not PteAttention.CUSTOM_SDPA:
            extra.append(Problem("kv_cache", f"{self.kv_cache.value!r} needs attention: custom_sdpa (ExecuTorch's "
                                             f"SDPA kernels read fp16 and int8 caches; XNNPACK's attention does not)"))
        check_fields(self, extra)

    @property
    def seq_len(self) -> int:
        """Tokens per call the program takes."""
        return self.max_seq_len or min(DEFAULT_SEQ_LEN, self.max_context)

    def codes_problems(self, q: QuantizeConfig) -> list[Problem]:
        """XNNPACK runs int4 weights only with int8 dynamic activations (8da4w); offsets it lacks are exact extra
        terms (exporters/xnnpack_codes.py), so any affine scheme otherwise fits."""
        if 4 in q.code_bits() and q.activations is not Activations.INT8_DYNAMIC:
            return [Problem("quantize.activations", f"{q.activations.value!r} with 4-bit codes: XNNPACK runs int4 "
                                                    f"weights only with int8 dynamic activations; use int8_dynamic")]
        return []

    def model_problems(self, config: Any, q: QuantizeConfig | None) -> list[Problem]:
        """What of the model (its HF config) this format cannot hold: checked before any work."""
        return model_problems(config, self.max_context, STATIC_ROPE, "the pte exporter")


class ExecuTorchExporter:
    format = "pte"  # targets.yaml's export.format
    options = PteOptions
    runtimes = ("executorch",)  # the runtimes that run this format
    artifact_name = "executorch"  # its name in the build directory
    version = "1"

    def availability(self) -> Availability:
        missing = _needed_modules()
        if missing:
            return Availability(False, f"{', '.join(missing)} not installed; pip install 'compress[executorch]'")
        return Availability(True)

    def export(self, model: Any, tokenizer: Any, options: PteOptions, out_dir: Path, console: Any,
               quantized: QuantizedWeights | None = None) -> Artifact:
        import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  registers llama::update_cache/custom_sdpa
        import executorch.kernels.quantized  # noqa: F401  out variants of the int8 KV cache's per-token quant ops
        import torch
        from compress.exporters.llama import AttentionBackend, ExportLlama  # torch: loaded when exporting
        from compress.exporters.xnnpack_codes import apply_codes, check_codes, fuse_qkv_codes

        if problems := options.model_problems(model.config, None):
            raise InputError(str(problems[0]))
        backend = {PteAttention.XNNPACK: AttentionBackend.XNNPACK,
                   PteAttention.CUSTOM_SDPA: AttentionBackend.CUSTOM}[options.attention]
        codes = quantized
        # q/k/v as one matmul (and one RoPE) where attention leaves XNNPACK right after them anyway (custom_sdpa),
        # so splitting the result costs no extra partition: ~12 fewer graph nodes per layer to lower, 2 fewer
        # matmuls per layer to run.
        fuse = options.attention is PteAttention.CUSTOM_SDPA
        if fuse and codes is not None:
            fused = fuse_qkv_codes(codes, model.config.num_hidden_layers)
            fuse, codes = fused is not None, fused or codes
        last = options.logits is PteLogits.LAST
        tied = bool(model.config.tie_word_embeddings)
        linears = sum(1 for m in model.modules() if isinstance(m, torch.nn.Linear))
        module = ExportLlama.from_hf(model, options.max_context, backend, fuse_qkv=fuse,
                                     kv_precision=options.kv_cache, last_logits=last)
        # The export module holds what it needs of the weights: where the caller handed the model over (the build
        # does), the fp32 linears the codes replace below are freed as they are replaced.
        del model
        gc.collect()
        notes: dict[str, Any] = {"quantization": "fp32 (none)"}
        if codes is not None:  # the quantize stage ran: lower its codes as they are
            check_codes(codes)
            with console.step("Lowering the quantize stage's codes (XNNPACK layout)") as step:
                notes = {"quantization": f"quantize stage ({codes.config.algorithm})",
                         **apply_codes(module, codes, tied), "tied_embeddings": tied}
                step["detail"] = f"{notes['linears_quantized']}/{notes['linears_total']} linears, " \
                                 f"{notes['linears_with_offset_correction']} with an offset correction"
        else:
            notes.update(linears_total=linears, linears_quantized=0)
        notes["qkv_fused"] = fuse
        notes["kv_cache"] = options.kv_cache.value
        notes["logits"] = options.logits.value
        timings: dict[str, float] = {}
        with atomic_dir(out_dir) as tmp:
            program, delegation = self._lower(module, options, tokenizer, timings, console)
            (tmp / PROGRAM).write_bytes(program.buffer)
            if options.external_data:
                program.write_tensor_data_to_file(str(tmp))  # DATA: the weights, each distinct buffer once
                if not (tmp / DATA).is_file():
                    raise ExportError(f"ExecuTorch wrote no {DATA} although export.external_data is set")
            tokenizer.save_pretrained(tmp)  # tokenizer.json: what the stock llama runner's --tokenizer_path reads
            data = {"data": DATA} if options.external_data else {}
            sidecar = {"max_context": options.max_context, "max_seq_len": options.seq_len,
                       "vocab_size": module.dims.vocab_size,
                       "bos_id": module.dims.bos_token_id, "eos_ids": _eos_ids(tokenizer, module), **data,
                       "coverage": {**notes, **delegation}, "export_seconds": timings}
            (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=2))
        self._check_delegation(delegation, options)
        files = tuple(str(p) for p in files_under(out_dir))
        return Artifact(out_dir, self.format, files, main=PROGRAM, data=DATA if options.external_data else "",
                        max_context=options.max_context, vocab_size=module.dims.vocab_size,
                        record={"coverage": {**notes, **delegation}, "export_seconds": timings},
                        last_logits_only=last)

    def _lower(self, module: Any, options: PteOptions, tokenizer: Any, timings: dict[str, float],
               console: Any) -> tuple[Any, dict[str, Any]]:
        import torch
        from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge
        from executorch.exir.passes import MemoryPlanningPass
        from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass
        from torch._functorch._aot_autograd.subclass_parametrization import unwrap_tensor_subclass_parameters
        from torch.export import Dim

        example = (torch.zeros(1, 2, dtype=torch.long), torch.tensor([0], dtype=torch.long))
        seq = Dim("seq", min=1, max=options.seq_len)
        with console.step("torch.export") as step, torch.no_grad():
            # torchao's quantized weights are tensor subclasses; as plain parameters (qdata, scale, zero point)
            # they are placeholders of their own that the external-data tags below can name.
            unwrap_tensor_subclass_parameters(module)
            exported = torch.export.export(module, example, dynamic_shapes=({1: seq}, None), strict=False)
            _merge_common_subexpressions(exported)
            if options.external_data:
                _tag_external_constants(exported)
        timings["torch_export"] = step["seconds"]
        with console.step("Lowering to XNNPACK") as step, _prefix_shapes_delegable(), _quiet_deprecation():
            # One greedy partitioner: the dynamic-quant-only one makes a partition per linear, and ExecuTorch
            # re-legalizes the whole graph for every partition (quadratic: >6 min on 2 cores for 30 layers).
            partitioner = _partitioner()
            # to_edge + to_backend rather than to_edge_transform_and_lower: the latter re-traces the whole program
            # three times (functionalize, decompose keeping the partitioner's ops, decompose the ops it refused),
            # each under fake tensors, ~10% of the export each (py-spy, 6 layers). Here one run_decompositions
            # keeps the partitioner's ops (aten.linear, torchao's quant ops) unconditionally; a linear XNNPACK then
            # refuses stays outside and _check_delegation fails the export, so nothing is silently slower.
            keep, _ = partitioner.ops_to_not_decompose(exported)
            edge = to_edge(exported, constant_methods=_runner_metadata(module, tokenizer, options),
                           compile_config=EdgeCompileConfig(_check_ir_validity=False, _skip_dim_order=True,
                                                            preserve_ops=list(keep)))
            edge = edge.to_backend(partitioner)
            delegation = _count_delegation(edge.exported_program().graph_module)
            step["detail"] = f"{delegation['delegated_nodes']} nodes in {delegation['delegate_calls']} XNNPACK " \
                             f"partitions, {delegation['non_delegated_nodes']} outside"
        timings["lower"] = step["seconds"]
        with console.step("Emitting the ExecuTorch program") as step:
            start = time.perf_counter()
            program = edge.to_executorch(ExecutorchBackendConfig(
                extract_delegate_segments=True, do_quant_fusion_and_const_prop=True,
                memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
                sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass(),
                external_constants=(lambda node: DATA_TAG) if options.external_data else False))
            program.buffer  # serializes the program and its external data now, inside the timed step
            timings["emit"] = time.perf_counter() - start
        return program, delegation

    @staticmethod
    def _check_delegation(delegation: dict[str, Any], options: PteOptions) -> None:
        outside = {op: n for op, n in delegation["non_delegated_ops"].items() if op in _LINEAR_OPS}
        if outside and not options.allow_unquantized_linears:
            raise ExportError(f"linear ops left outside XNNPACK: {outside}; the program would run them on portable "
                              f"kernels (set export.allow_unquantized_linears: true to accept)")


def _partitioner() -> Any:
    """XNNPACK's greedy partitioner, with two changes. Views of the KV caches stay outside it: XNNPACK copies
    whatever its reshape reads (measured: 30-50 us per cache view, 2 per layer, on SmolLM2), while ExecuTorch runs
    a static view outside a delegate as an alias of the buffer, which the delegate then reads in place. And the
    backend's preprocessing runs only the pass this module needs (below)."""
    import operator

    import torch
    from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS
    from executorch.backends.xnnpack.partition.config.generic_node_configs import ViewCopyConfig
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir.backend.compile_spec_schema import CompileSpec
    from executorch.exir.backend.partitioner import DelegationSpec

    def reads_cache(node: Any, ep: Any) -> bool:
        src = node.args[0]
        if src.op == "placeholder":
            return src.name in ep.graph_signature.inputs_to_buffers
        return (src.target is operator.getitem and getattr(src.args[0], "target", None)
                is torch.ops.higher_order.auto_functionalized_v2)  # the cache as updated in place

    class CacheAliasViewConfig(ViewCopyConfig):
        def check_constraints(self, node: Any, ep: Any) -> bool:
            return not reads_cache(node, ep) and super().check_constraints(node, ep)

    class MergingPartitioner(XnnpackPartitioner):
        def generate_partitions(self, ep: Any) -> list[Any]:
            return _merge_in_graph_order(super().generate_partitions(ep), ep.graph_module.graph)

    partitioner = MergingPartitioner(configs=[CacheAliasViewConfig if c is ViewCopyConfig else c
                                              for c in ALL_PARTITIONER_CONFIGS])
    # XNNPACK's preprocess re-traces every partition under fake tensors through ~17 passes; for this module's
    # ops only its addmm -> linear conversion does anything (no convolutions, batch norms, concats, fusable
    # activations or channels-last layouts). Its "dqlinear_partitioner" compile spec is the backend's switch to
    # run that pass alone. Measured (6 layers of SmolLM2): lowering 60 -> 35 s, logits unchanged.
    partitioner.delegation_spec = DelegationSpec(partitioner.delegation_spec.backend_id,
                                                 [CompileSpec("dqlinear_partitioner", b"")])
    return partitioner


def _merge_in_graph_order(partitions: list[Any], graph: Any) -> list[Any]:
    """Merge XNNPACK's proposed partitions in graph order wherever the union creates no cycle.

    XNNPACK's grouped partitioner merges candidates in one greedy pass that starts from the end of the graph, and
    with the quantized linears' node groups it leaves three partitions per decoder layer where one is possible (the
    only nodes outside XNNPACK in a layer are the cache updates and the attention op). Each partition costs a
    delegate call per token and, at export, a sub-module split of the whole graph. Whole partitions are merged, so
    every group XNNPACK formed stays together; validate_partition rejects a union that a node outside it would
    both feed and consume. Measured on SmolLM2: 91 -> 31 partitions."""
    from torch.fx.passes.infra.partitioner import Partition
    from torch.fx.passes.utils.fuser_utils import validate_partition

    order = {node: i for i, node in enumerate(graph.nodes)}

    def first_op(part: Any) -> int:  # a partition's weights are placeholders, all at the top of the graph
        return min((order[n] for n in part.nodes if n.op == "call_function"), default=0)

    merged: list[Any] = []
    for part in sorted(partitions, key=first_op):
        if merged and validate_partition([*merged[-1].nodes, *part.nodes]):
            for node in part.nodes:
                merged[-1].add_node(node)
        else:
            merged.append(Partition(id=len(merged), nodes=list(part.nodes)))
    return merged


def _tag_external_constants(exported: Any) -> None:
    """Mark every weight and constant (not the KV caches, which are mutable state) for external data, both those
    XNNPACK will hold and those the program keeps (the quantized embedding). ExecuTorch then writes them all into
    one named-data store that keeps one copy of identical bytes: the tied embedding gathers the very int8 matrix the
    lm_head multiplies by (exporters/xnnpack_codes.py), so SmolLM2's 28 MB tied matrix is stored once, not twice.
    XNNPACK reads the tag from its weights' dequantize nodes too (its PropagateCustomMetaPass copies it there; the
    exporter runs only the addmm -> linear pass of XNNPACK's preprocessing, see _partitioner), so it is set on both."""
    import torch

    sig = exported.graph_signature
    mutated = set(sig.buffers_to_mutate.values())
    constants = {**sig.inputs_to_parameters, **sig.inputs_to_buffers, **sig.inputs_to_lifted_tensor_constants}
    tagged = set()
    for node in exported.graph.nodes:
        if node.op == "placeholder" and node.name in constants and constants[node.name] not in mutated:
            node.meta.setdefault("custom", {})["delegate_constant_tag"] = DATA_TAG
            tagged.add(node)
    for node in exported.graph.nodes:
        source = node.args[0] if node.op == "call_function" and node.args else None
        if isinstance(source, torch.fx.Node) and source in tagged and "dequantize" in str(node.target):
            node.meta.setdefault("custom", {})["delegate_constant_tag"] = DATA_TAG


def _merge_common_subexpressions(exported: Any) -> None:
    """One node for identical pure computations (the offset term's group sums of q/k/v and of gate/up read the
    same input through the same row of ones): fewer XNNPACK ops to run, and fewer nodes to lower."""
    from torch.fx.passes.dialect.common.cse_pass import CSEPass

    result = CSEPass()(exported.graph_module)
    if result.modified:
        exported.graph_module.graph = result.graph_module.graph
        exported.graph_module.recompile()


@contextlib.contextmanager
def _quiet_deprecation() -> Iterator[None]:
    """The partitioner logs a deprecation warning for to_edge + to_backend (why this exporter keeps that route:
    `_lower`); it would land in the user's console on every android build, so that one logger is held to errors."""
    import logging

    logger = logging.getLogger("executorch.backends.xnnpack.partition.xnnpack_partitioner")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _prefix_shapes_delegable() -> Iterator[None]:
    """Let XNNPACK take tensors sized by the cache prefix (start + seq positions, start from `input_pos.item()`).

    XNNPACK's partitioner refuses every tensor whose shape holds an unbacked symbol, conservatively, because it
    cannot rule out an empty tensor; that would leave attention (bmm, softmax) on portable kernels. Here the only
    such size is start + seq >= 1, bounded by max_context through the export module's checks, and ExecuTorch
    resizes a delegate's inputs at run time within those bounds. Measured on SmolLM2 (6 layers, 2 threads):
    attention over the prefix instead of the whole 512-slot cache took decode from 4.14 to 3.28 ms per token."""
    from executorch.backends.xnnpack.partition.config import xnnpack_config

    refuse = xnnpack_config.has_free_unbacked_symbols
    xnnpack_config.has_free_unbacked_symbols = lambda value: False
    try:
        yield
    finally:
        xnnpack_config.has_free_unbacked_symbols = refuse


def _eos_ids(tokenizer: Any, module: Any) -> list[int]:
    ids = {module.dims.eos_token_id, tokenizer.eos_token_id}
    return sorted(int(i) for i in ids if i is not None)


def _runner_metadata(module: Any, tokenizer: Any, options: PteOptions) -> dict[str, Any]:
    """What ExecuTorch's stock llama runner reads from the program's constant methods."""
    dims = module.dims
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else dims.bos_token_id
    return {"get_bos_id": int(bos if bos is not None else 0), "get_eos_ids": _eos_ids(tokenizer, module),
            "get_max_seq_len": options.seq_len, "get_max_context_len": options.max_context,
            "get_n_layers": dims.num_layers, "get_vocab_size": dims.vocab_size, "use_kv_cache": True,
            "use_sdpa_with_kv_cache": True, "enable_dynamic_shape": True}


def _count_delegation(graph_module: Any) -> dict[str, Any]:
    """Nodes inside XNNPACK partitions vs compute nodes left on portable kernels."""
    delegated, calls = 0, 0
    for name, sub in graph_module.named_children():
        if name.startswith("lowered_module"):
            calls += 1
            delegated += sum(1 for n in sub.original_module.graph.nodes if n.op == "call_function")
    outside: collections.Counter[str] = collections.Counter()
    for node in graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        target = getattr(node.target, "__name__", str(node.target))
        if any(skip in target for skip in ("executorch_call_delegate", "getitem", "sym_size", "_assert_scalar",
                                           "_local_scalar_dense")) or target in ("le", "ge", "lt", "gt", "add"):
            continue  # bookkeeping of the dynamic sequence length, not compute
        outside[target.removeprefix("aten.").removesuffix(".default")] += 1
    return {"delegate_calls": calls, "delegated_nodes": delegated, "non_delegated_nodes": sum(outside.values()),
            "non_delegated_ops": dict(outside.most_common())}
