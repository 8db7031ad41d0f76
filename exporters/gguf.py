"""GGUF for llama.cpp: the HF Llama's tensors in llama.cpp's layout, its hparams, tokenizer and chat template.

Written with the `gguf` package (GGUFWriter, the tensor-name map, SpecialVocab for merges, special ids and the
chat template). f32, f16 and Q8_0 are written directly; Q4_0, Q4_K_M and Q5_K_M go through llama.cpp's own
quantizer (`llama_cpp.llama_model_quantize`, the optional `llamacpp` extra) from an f32 GGUF written first, so
llama.cpp picks each tensor's type exactly as its `llama-quantize` tool would (K-quants need rows that are a
multiple of 256 and fall back to other types where they are not: `Artifact.record["tensor_types"]` records the outcome).
"""

from __future__ import annotations

import collections
import contextlib
import enum
import io
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from compress import llamacpp_lib as llamacpp
from compress.artifact import Artifact, Availability
from compress.config import check_fields, setting
from compress.errors import ExportError, Problem, RuntimeUnavailable
from compress.exporters.base import model_problems
from compress.quantized import QuantizeConfig, QuantizedWeights
from compress.rope import STATIC_ROPE, RopeType, freq_factors, rope_parameters, rope_problems

class GgufType(enum.StrEnum):
    F32 = "f32"
    F16 = "f16"
    Q8_0 = "q8_0"
    Q4_0 = "q4_0"
    Q4_K_M = "q4_k_m"
    Q5_K_M = "q5_k_m"


@dataclass(frozen=True)
class GgufOptions:
    file_type: GgufType = GgufType.Q4_K_M
    max_context: int = setting(2048, ge=16, le=131072, doc="llama.cpp context (n_ctx) the runtime allocates")

    def __post_init__(self) -> None:
        check_fields(self)

    def codes_problems(self, q: QuantizeConfig) -> list[Problem]:
        return [Problem("stages", "the gguf exporter writes its own file_type (gguf-py / llama.cpp's quantizer) and "
                                  "cannot hold the quantize stage's codes; remove the quantize stage or choose pte, "
                                  "onnx or mlpackage")]

    def model_problems(self, config: Any, q: QuantizeConfig | None) -> list[Problem]:
        """What of the model (its HF config) this format cannot hold: checked before any work."""
        return model_problems(config, self.max_context, STATIC_ROPE, "the GGUF exporter")


# What each file type is written as: a numpy dtype or GGML type for 2-D weights, or llama.cpp's quantizer.
_DIRECT = {GgufType.F32: "F32", GgufType.F16: "F16", GgufType.Q8_0: "Q8_0"}
_BY_LLAMACPP = {GgufType.Q4_0: "MOSTLY_Q4_0", GgufType.Q4_K_M: "MOSTLY_Q4_K_M", GgufType.Q5_K_M: "MOSTLY_Q5_K_M"}
_FILE_TYPE = {GgufType.F32: "ALL_F32", GgufType.F16: "MOSTLY_F16", GgufType.Q8_0: "MOSTLY_Q8_0", **_BY_LLAMACPP}
assert set(_FILE_TYPE) == set(GgufType), "every GgufType needs a writer"

# llama.cpp's name for a Hugging Face pre-tokenizer (`tokenizer.ggml.pre`), by the pre-tokenizer's JSON.
_LLAMA3_SPLIT = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                 "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")


class GgufExporter:
    format = "gguf"  # targets.yaml's export.format
    options = GgufOptions
    runtimes = ("llamacpp",)  # the runtimes that run this format
    artifact_name = "model.gguf"  # its name in the build directory
    version = "1"

    def availability(self) -> Availability:
        return Availability(True)  # `gguf` is a core dependency; the quantizer is checked per file type

    def export(self, model: Any, tokenizer: Any, options: GgufOptions, out_dir: Path, console: Any,
               quantized: QuantizedWeights | None = None) -> Artifact:
        import gguf

        if options.file_type in _BY_LLAMACPP and not llamacpp.installed():
            raise RuntimeUnavailable(f"GGUF file type {options.file_type.value!r} needs llama.cpp's quantizer "
                                     f"(llama-cpp-python), which is not installed; {llamacpp.INSTALL_HINT}")
        config = model.config
        limit = config.max_position_embeddings
        if options.max_context > limit:
            raise ExportError(f"export.max_context {options.max_context} exceeds the model's "
                              f"max_position_embeddings {limit}")
        final = Path(out_dir)
        final.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{final.name}.tmp-", dir=final.parent) as tmp:
            direct = options.file_type if options.file_type in _DIRECT else GgufType.F32
            path = Path(tmp) / "direct.gguf"
            with console.step(f"Writing GGUF ({direct.value})") as step:
                fallbacks = write_gguf(model, tokenizer, direct, path)
                step["detail"] = f"{path.stat().st_size / 1e6:.1f} MB"
            if options.file_type in _BY_LLAMACPP:
                with console.step(f"Quantizing to {options.file_type.value} with llama.cpp") as step:
                    requantized = Path(tmp) / "quantized.gguf"
                    fallbacks = llamacpp_quantize(path, requantized,
                                                  getattr(gguf.LlamaFileType, _BY_LLAMACPP[options.file_type]))
                    path = requantized
                    step["detail"] = f"{path.stat().st_size / 1e6:.1f} MB"
            summary = describe_gguf(path)
            os.replace(path, final)  # the only rename: a crash before it leaves nothing at `final`
        record = {"file_type": options.file_type.value, "size_bytes": final.stat().st_size, **summary,
                  "quantizer": "llama.cpp" if options.file_type in _BY_LLAMACPP else "gguf-py",
                  "fallbacks": fallbacks}
        return Artifact(final, self.format, (final.name,), max_context=options.max_context,
                        vocab_size=int(model.config.vocab_size), record=record)


def llamacpp_quantize(src: Path, dst: Path, ftype: int) -> list[str]:
    """Quantize with llama.cpp; returns its fallback warnings (tensors whose rows do not fit the block size)."""
    llama_cpp = llamacpp.llama_cpp_quiet()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(ftype)
    params.nthread = 0  # llama.cpp's default: every hardware thread
    log = io.StringIO()
    # llama-cpp-python's log hook prints llama.cpp's warnings to sys.stderr: keep them for the record instead.
    with contextlib.redirect_stderr(log):
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    lines = log.getvalue().splitlines()
    if rc != 0 or not dst.is_file():
        raise ExportError(f"llama.cpp's quantizer failed on {src.name} (return code {rc}): "
                          f"{(lines or ['no output'])[-1].strip()}")
    return [" ".join(line.split()) for line in lines if "falling back" in line]


def write_gguf(model: Any, tokenizer: Any, file_type: GgufType, path: Path) -> list[str]:
    """Write `model` as a GGUF of `file_type` (f32, f16 or q8_0); returns the tensors that fell back to f16."""
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    _add_hparams(writer, config, getattr(gguf.LlamaFileType, _FILE_TYPE[file_type]))
    _add_identity(writer, model)
    _add_tokenizer(writer, tokenizer, config)
    fallbacks = []
    for name, data in llama_cpp_tensors(model):
        qtype = _DIRECT[file_type] if data.ndim == 2 else "F32"  # norms stay f32, as llama.cpp expects
        if qtype == "Q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]:
            qtype = "F16"  # a row that is not a whole number of blocks: convert_hf_to_gguf's fallback too
            fallbacks.append(f"{name}: {data.shape[-1]} columns are not whole Q8_0 blocks -> f16")
        if qtype == "Q8_0":
            writer.add_tensor(name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, data.astype(np.float16 if qtype == "F16" else np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return fallbacks


def llama_cpp_tensors(model: Any) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array in llama.cpp's layout) for every tensor; a tied lm_head is not repeated."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    out = []
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp uses token_embd as the output matrix when `output.weight` is absent
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"tensor {hf_name!r} has no llama.cpp counterpart; is this a plain Llama?")
        data = tensor.detach().float().cpu().numpy()  # (out, in): GGUF stores it as ne = (in, out)
        if hf_name.endswith("q_proj.weight"):
            data = permute_for_rope(data, config.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            data = permute_for_rope(data, config.num_key_value_heads)
        out.append((name, np.ascontiguousarray(data)))
    if rope_parameters(config)["rope_type"] == RopeType.LLAMA3:
        # llama.cpp divides each default frequency by `rope_freqs` (as convert_hf_to_gguf writes Llama 3.1+):
        # the factors are the default frequencies over transformers' scaled ones.
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        out.append((gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
                    freq_factors(config, head_dim).numpy()))
    return out


def permute_for_rope(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rotates the two halves of each head (rotate_half); llama.cpp's RoPE rotates adjacent pairs.

    Within each head, rows (0..d/2-1 | d/2..d-1) become interleaved (0, d/2, 1, d/2+1, ...), exactly as
    convert_hf_to_gguf.py's LlamaModel.permute; transformers' GGUF loader applies the inverse on import.
    """
    rows = weight.shape[0]  # n_heads * head_dim
    return (weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:])  # (heads, 2, d/2, in)
            .swapaxes(1, 2)  # (heads, d/2, 2, in)
            .reshape(weight.shape))


def _add_identity(writer: Any, model: Any) -> None:
    """general.name, basename, size_label and license: the source GGUF's own when the checkpoint was converted
    from one (compress.models.gguf records them); else the checkpoint directory's name (its parent's, for a
    cache directory named `hf`) and a size label computed from the parameter count, as llama.cpp's converter
    does."""
    import gguf

    from compress.models.gguf import source_general

    where = Path(model.config.name_or_path or "llama")
    general = source_general(where) if where.is_dir() else {}
    name = where.parent.name if where.name == "hf" else where.name
    size = gguf.size_label(sum(p.numel() for p in model.parameters()), 0, 0, 0)  # a tied matrix counted once
    writer.add_name(general.get("name") or name)
    writer.add_basename(general.get("basename") or name.removesuffix(f"-{size.lower()}").removesuffix(f"-{size}"))
    writer.add_size_label(general.get("size_label") or size)
    for key, add in (("license", writer.add_license), ("organization", writer.add_organization),
                     ("finetune", writer.add_finetune)):
        if general.get(key):
            add(general[key])


def _add_hparams(writer: Any, config: Any, file_type: int) -> None:
    import gguf

    problems = rope_problems(config, STATIC_ROPE, "the GGUF exporter")
    if problems:
        raise ExportError(str(problems[0]))
    rope = rope_parameters(config)
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ExportError("Llamas with attention_bias or mlp_bias are not supported by the GGUF exporter")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    if head_dim * config.num_attention_heads != config.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    if rope["rope_type"] == RopeType.LINEAR:  # llama3's scaling travels as the rope_freqs tensor instead
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(2)  # GGML_QNT_VERSION: the current block layouts


def _add_tokenizer(writer: Any, tokenizer: Any, config: Any) -> None:
    """GPT-2-style byte-level BPE, as convert_hf_to_gguf's _set_vocab_gpt2 writes it."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    if spec.get("model", {}).get("type") != "BPE" or spec.get("decoder", {}).get("type") != "ByteLevel":
        raise ExportError("the GGUF exporter writes GPT-2-style byte-level BPE tokenizers only; this tokenizer "
                          f"is {spec.get('model', {}).get('type', type(tokenizer).__name__)!r}")
    if not spec["model"].get("merges"):
        raise ExportError("the tokenizer has no BPE merges; llama.cpp's gpt2 tokenizer needs at least one")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(spec))
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    tokens, types = [], []
    for i in range(config.vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL if i not in added else
                         gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory(prefix="compress-tokenizer-") as tmp:
        # SpecialVocab reads merges, special ids, add_bos/eos and the chat template from saved files.
        tokenizer.save_pretrained(tmp)
        config.to_json_file(Path(tmp) / "config.json")
        gguf.SpecialVocab(tmp, load_merges=True, n_vocab=config.vocab_size).add_to_gguf(writer, quiet=True)


def pre_tokenizer_name(spec: dict[str, Any]) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for this tokenizer.json, or an error naming what was found."""
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]

    def byte_level(p: dict[str, Any], regex: bool) -> bool:
        return p.get("type") == "ByteLevel" and p.get("use_regex", True) == regex and not p.get("add_prefix_space")

    if len(parts) == 1 and byte_level(parts[0], True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and byte_level(parts[1], True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and parts[0].get("pattern", {}).get("Regex") == _LLAMA3_SPLIT \
            and byte_level(parts[1], False):
        return "llama-bpe"
    raise ExportError(f"pre-tokenizer {json.dumps(pre)[:200]} has no known llama.cpp equivalent "
                      f"(known: ByteLevel with regex -> gpt-2, Digits+ByteLevel -> smollm, Llama 3 Split -> "
                      f"llama-bpe); llama.cpp would tokenize text differently from the source")


def describe_gguf(path: Path) -> dict[str, Any]:
    """Tensor count and which tensors got which type (blocks folded: `attn_q.weight: {Q4_0: 30}`)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    by_role: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    total: collections.Counter[str] = collections.Counter()
    for t in reader.tensors:
        by_role[re.sub(r"^blk\.\d+\.", "", t.name)][t.tensor_type.name] += 1
        total[t.tensor_type.name] += 1
    quantized = sum(n for kind, n in total.items() if kind not in ("F32", "F16", "BF16"))
    return {"tensor_count": len(reader.tensors), "tensors_quantized": quantized,
            "tensor_type_counts": dict(total.most_common()),
            "tensor_types": {role: dict(c) for role, c in sorted(by_role.items())}}
