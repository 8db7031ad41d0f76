"""What adding a format takes: an exporter (with its options), a runtime, and one registry line each. Nothing else
in compress changes: targets.yaml validates the new format's options and runtime, `build` exports, verifies on
the new runtime and gates, and the manifest records it.

The format here is a toy (the fp32 state dict as one .npz, run by eager PyTorch); it stands for a real one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from compress.artifact import Artifact, Availability
from compress.build import BuildRequest, build
from compress.config import check_fields, setting
from compress.errors import ConfigError, Problem
from compress.exporters import EXPORTERS
from compress.exporters.base import atomic_dir
from compress.progress import Console
from compress.quantized import QuantizeConfig, QuantizedWeights
from compress.runtimes import RUNTIMES
from compress.runtimes.torch_eager import TorchEagerRuntime
from compress.targets import parse_targets


# ---- what would be exporters/npz.py ------------------------------------------------------------
@dataclass(frozen=True)
class NpzOptions:
    max_context: int = setting(256, ge=16, le=4096)

    def __post_init__(self) -> None:
        check_fields(self)

    def codes_problems(self, q: QuantizeConfig) -> list[Problem]:
        return [Problem("stages", "npz holds float weights only")]

    def model_problems(self, config: Any, q: QuantizeConfig | None) -> list[Problem]:
        return []  # the eager runtime runs whatever transformers loads


class NpzExporter:
    format = "npz"
    options = NpzOptions
    runtimes = ("npz_eager",)
    artifact_name = "npz"
    version = "1"

    def availability(self) -> Availability:
        return Availability(True)

    def export(self, model: Any, tokenizer: Any, options: NpzOptions, out_dir: Path, console: Any,
               quantized: QuantizedWeights | None = None) -> Artifact:
        with atomic_dir(out_dir) as tmp:
            np.savez(tmp / "weights.npz", **{k: v.detach().numpy() for k, v in model.state_dict().items()})
            (tmp / "config.json").write_text(model.config.to_json_string())
            tokenizer.save_pretrained(tmp)
        files = tuple(sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file()))
        return Artifact(out_dir, self.format, files, main="weights.npz", max_context=options.max_context,
                        vocab_size=model.config.vocab_size)


# ---- what would be runtimes/npz_eager.py -------------------------------------------------------
class NpzEagerRuntime:
    name = "npz_eager"

    def availability(self) -> Availability:
        return Availability(True)

    def load(self, artifact: Artifact, threads: int) -> Any:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(**json.loads((artifact.path / "config.json").read_text()))
        model = LlamaForCausalLM(config).eval()
        weights = np.load(artifact.path / artifact.main)
        model.load_state_dict({k: torch.from_numpy(weights[k]) for k in weights.files})
        return TorchEagerRuntime.session_for(model, artifact.max_context)


TARGETS = {"version": 1, "targets": {"mine": {
    "export": {"format": "npz", "max_context": 256}, "runtime": {"name": "npz_eager", "threads": 1},
    "eval": {"windows": 2, "window_len": 32, "greedy_tokens": 4, "latency": False},
    "budgets": {"max_mean_kl": 1e-9, "min_top1_agreement": 1.0}}}}


@pytest.fixture
def registered(monkeypatch):
    """The two registry lines (exporters/__init__.py and runtimes/__init__.py), for this test only."""
    monkeypatch.setitem(EXPORTERS._items, NpzExporter.format, NpzExporter())
    monkeypatch.setitem(RUNTIMES._items, NpzEagerRuntime.name, NpzEagerRuntime())


def test_a_new_format_builds_verifies_and_gates_with_nothing_else_changed(registered, tiny_dir, tmp_path):
    import yaml

    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(TARGETS))
    target = parse_targets(TARGETS, "mine.yaml")["mine"]
    assert isinstance(target.export.options, NpzOptions) and target.export.options.max_context == 256
    manifest = build(BuildRequest(target=target, model=str(tiny_dir), out_dir=tmp_path / "out",
                                  targets_file=tmp_path / "mine.yaml"), Console(quiet=True))
    assert manifest.artifact["format"] == "npz" and (tmp_path / "out" / "npz" / "weights.npz").is_file()
    assert manifest.verification["runtime"] == "npz_eager"
    assert manifest.verification["metrics"]["mean_kl"] == 0.0 and manifest.verdict == "pass"


def test_the_new_format_s_options_and_runtime_are_checked_when_targets_are_read(registered):
    def refused(key: str, value: Any) -> str:
        bad = json.loads(json.dumps(TARGETS))
        bad["targets"]["mine"][key] = value
        with pytest.raises(ConfigError) as err:
            parse_targets(bad, "mine.yaml")
        return str(err.value)

    assert "targets.mine.export.max_context: 8 is out of range" in refused("export", {"format": "npz",
                                                                                      "max_context": 8})
    assert "'onnxruntime' cannot run format 'npz'; use npz_eager" in refused("runtime", "onnxruntime")
    assert "npz holds float weights only (export.format npz)" in refused("stages", [{"quantize": {"weight_bits": 8}}])


def test_an_unregistered_format_is_refused_naming_the_registered_ones():
    with pytest.raises(ConfigError, match=r"export.format: 'npz' is not valid; choose one of 'aimodel', 'gguf', 'mlpackage'"):
        parse_targets(TARGETS, "mine.yaml")
