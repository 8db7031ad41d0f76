"""ExecuTorch's own LLM export (`executorch.extension.llm.export.export_llm`) as `compress bench` peer.

This is what an Android developer runs instead of us: the route ExecuTorch documents for Llama (its
`examples/models/llama/config/llama_xnnpack.yaml`): its own transformer (`llama_transformer.py`) loaded from a
Meta-format checkpoint, torchao's 8da4w (int8 dynamic activations, int4 symmetric weights per group), 4-bit
embedding (`4,32`), `use_kv_cache` + `use_sdpa_with_kv_cache` (its custom SDPA and KV-cache update ops), fp32,
XNNPACK with extended ops. Nothing of this package's quantizer or exporter is used: the same fp32 weights go in.

Deviations from that config, each recorded in the artifact's record:
- `group_size` 32, not 128: 8da4w skips every linear whose input width the group does not divide, silently, and
  128 does not divide SmolLM2's 576 (every q/k/v/gate/up would stay fp32). 32 divides every Llama width.
- `max_context_length` as deep as the bench needs (its default, 128, holds no evaluation window).
- `metadata` with this model's BOS/EOS ids (the config's are Llama 3's).
The checkpoint conversion is what ExecuTorch's `convert_weights` for Llama-family HF checkpoints does (torchtune's
HF -> Meta mapping); written here because those scripts need torchtune, which ExecuTorch does not install.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from compress.exporters.base import atomic_dir

from compress.artifact import Artifact
from compress.errors import ExportError, InputError

MODEL = "model.pte"
GROUP_SIZE = 32
DOCUMENTED = {"qmode": "8da4w", "embedding_quantize": "4,32", "use_kv_cache": True, "use_sdpa_with_kv_cache": True,
              "dtype_override": "fp32", "xnnpack": True, "extended_ops": True}

_HF_TO_META = {
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
}


def _unpermute(w: Any, heads: int) -> Any:
    """HF stores q/k rows in rotate-half order; Meta's checkpoints interleave each head's pairs (HF's
    convert_llama_weights_to_hf permutes one way, this undoes it)."""
    out_features, in_features = w.shape
    return w.view(heads, 2, out_features // heads // 2, in_features).transpose(1, 2).reshape(out_features,
                                                                                            in_features)


# ExecuTorch's rope.apply_scaling fixes low_freq_factor 1 and an original context of 8192 (Llama 3.x's)
_LLAMA3_FIXED = {"low_freq_factor": 1.0, "original_max_position_embeddings": 8192}


def _rope(config: Any) -> tuple[str, dict[str, Any]]:
    scaling = getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None) or {}
    return scaling.get("rope_type") or scaling.get("type") or "default", scaling


def config_problem(config: Any) -> str:
    """Why export_llm cannot hold a model of this (HF) config, or "": checked before any work is done."""
    rope_type, scaling = _rope(config)
    if rope_type not in ("default", "llama3"):
        return f"peer executorch-8da4w: RoPE scaling {rope_type!r} has no export_llm equivalent"
    if rope_type == "llama3" and any(float(scaling.get(k, v)) != v for k, v in _LLAMA3_FIXED.items()):
        return (f"peer executorch-8da4w: export_llm's llama3 RoPE fixes {_LLAMA3_FIXED}; this model has "
                f"{ {k: scaling.get(k) for k in _LLAMA3_FIXED} }")
    return ""


def meta_checkpoint(model: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The HF Llama's weights under Meta's names (q/k rows interleaved per head), and its `params.json`."""
    config = model.config
    if problem := config_problem(config):
        raise InputError(problem)
    rope_type, scaling = _rope(config)
    theta = scaling.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0
    sd = {}
    for key, value in model.state_dict().items():
        value = value.detach().float().contiguous()
        if key == "model.embed_tokens.weight":
            sd["tok_embeddings.weight"] = value
        elif key == "model.norm.weight":
            sd["norm.weight"] = value
        elif key == "lm_head.weight":
            sd["output.weight"] = value
        elif key.startswith("model.layers."):
            _, _, index, rest = key.split(".", 3)
            module, leaf = rest.rsplit(".", 1)
            if module not in _HF_TO_META or leaf != "weight":
                raise InputError(f"peer executorch-8da4w: {key} has no place in ExecuTorch's Llama")
            if module == "self_attn.q_proj":
                value = _unpermute(value, config.num_attention_heads)
            elif module == "self_attn.k_proj":
                value = _unpermute(value, config.num_key_value_heads)
            sd[f"layers.{index}.{_HF_TO_META[module]}.weight"] = value
    sd.setdefault("output.weight", sd["tok_embeddings.weight"].clone())  # tied: a second copy, as convert_weights
    params = {"dim": config.hidden_size, "n_layers": config.num_hidden_layers, "n_heads": config.num_attention_heads,
              "n_kv_heads": config.num_key_value_heads, "vocab_size": config.vocab_size,
              "hidden_dim": config.intermediate_size, "norm_eps": float(config.rms_norm_eps),
              "rope_theta": float(theta), "use_scaled_rope": rope_type == "llama3"}
    head_dim = getattr(config, "head_dim", None)
    if head_dim and head_dim != config.hidden_size // config.num_attention_heads:
        params["head_dim"] = head_dim
    if rope_type == "llama3":
        params["rope_scale_factor"] = scaling.get("factor", 8)
        params["high_freq_factor"] = scaling.get("high_freq_factor", 4)
    return sd, params


def llm_config(checkpoint: Path, params: Path, out_dir: Path, max_context: int, bos: int, eos: list[int],
               qmode: str | None = DOCUMENTED["qmode"]) -> dict[str, Any]:
    """The LlmConfig export_llm reads: llama_xnnpack.yaml's settings plus the recorded deviations."""
    quant: dict[str, Any] = {}
    if qmode:
        quant = {"qmode": qmode, "group_size": GROUP_SIZE, "embedding_quantize": DOCUMENTED["embedding_quantize"]}
    return {
        "base": {"model_class": "llama3", "checkpoint": str(checkpoint), "params": str(params),
                 "metadata": json.dumps({"get_bos_id": bos, "get_eos_ids": eos})},
        "model": {"use_kv_cache": True, "use_sdpa_with_kv_cache": True, "dtype_override": "fp32"},
        "quantization": quant,
        "backend": {"xnnpack": {"enabled": True, "extended_ops": True}},
        "export": {"max_context_length": max_context, "output_dir": str(out_dir),
                   "output_name": str(out_dir / MODEL)},  # a name ending in .pte is taken as the path, verbatim
    }


def export_llm_peer(model: Any, tokenizer: Any, out_dir: Path, max_context: int, log: Path,
                    qmode: str | None = DOCUMENTED["qmode"]) -> Artifact:
    """Run export_llm (in a child process: it prints a lot and holds its own copies of the weights) on `model`'s
    fp32 weights; the `.pte` it writes, described for the ExecuTorch runtime. `qmode=None` exports fp32."""
    import torch

    if importlib_missing := [m for m in ("executorch", "omegaconf", "hydra") if not _has(m)]:
        raise InputError(f"peer executorch-8da4w needs {importlib_missing[0]}; pip install 'compress[executorch]'")
    config = model.config
    eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    with atomic_dir(out_dir) as tmp:
        # export_llama reads "int8" or "8da4w" anywhere in the checkpoint's path as "already quantized": the
        # checkpoint goes to a fresh temporary directory whose path says neither.
        work = Path(tempfile.mkdtemp(prefix="compress-etllm-"))
        if any(word in str(work) for word in ("int8", "8da4w")):
            raise ExportError(f"export_llm would take {work} for a pre-quantized checkpoint (its path says so); "
                              f"set TMPDIR to another directory")
        try:
            sd, params = meta_checkpoint(model)
            torch.save(sd, work / "consolidated.pth")
            del sd
            (work / "params.json").write_text(json.dumps(params))
            bos = config.bos_token_id if config.bos_token_id is not None else tokenizer.bos_token_id
            cfg = llm_config(work / "consolidated.pth", work / "params.json", tmp, max_context, int(bos),
                             [int(e) for e in eos if e is not None], qmode)
            _run_export_llm(cfg, work, log)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        if not (tmp / MODEL).is_file():
            raise ExportError(f"export_llm wrote no {MODEL} (its log: {log})")
    record = {"tool": "executorch export_llm", "config": "examples/models/llama/config/llama_xnnpack.yaml",
              "settings": {**DOCUMENTED, "qmode": qmode or "fp32", "group_size": GROUP_SIZE if qmode else None,
                           "max_context_length": max_context},
              "deviations": {"group_size": "32, not the config's 128, which does not divide every linear's input "
                                           "width and leaves those linears fp32",
                             "max_context_length": f"{max_context}: as deep as the bench's depths",
                             "metadata": "this model's BOS/EOS ids"}}
    return Artifact(out_dir, "pte", (MODEL,), main=MODEL, max_context=max_context, vocab_size=config.vocab_size,
                    record=record, last_logits_only=True)


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _run_export_llm(cfg: dict[str, Any], work: Path, log: Path) -> None:
    from omegaconf import OmegaConf

    (work / "llm_config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    cmd = [sys.executable, "-m", "executorch.extension.llm.export.export_llm", "--config",
           str(work / "llm_config.yaml"), f"hydra.run.dir={work / 'hydra'}"]
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    with log.open("w") as fh:
        proc = subprocess.run(cmd, check=False, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=work)
    if proc.returncode != 0:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        raise ExportError(f"ExecuTorch's export_llm failed (exit {proc.returncode}): "
                          f"{lines[-1] if lines else 'no output'}")
