"""targets.yaml: a versioned schema of frozen dataclasses, validated once, all errors reported together.

    version: 1
    targets:
      android:
        description: ...
        stages:                      # ordered; each item is {stage-kind: config}
          - quantize: {weight_bits: 4, group_size: 32, activations: int8_dynamic}
        export: {format: pte, max_context: 512}
        runtime: {name: executorch, threads: 2}
        eval: {windows: 8, window_len: 256}
        budgets: {max_mean_kl: 0.5, min_top1_agreement: 0.8}
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from compress.config import check_fields, join, parse_dataclass, parse_value, setting, shown, to_data, type_name
from compress.errors import ConfigError, Problem
from compress.exporters import EXPORTERS
from compress.gate import Budgets
from compress.runtimes import RUNTIMES
from compress.runtimes.base import runtime_bounds
from compress.stages.configs import STAGE_CONFIGS, StageKind

SCHEMA_VERSION = 1
SHIPPED_TARGETS = Path(__file__).resolve().parent / "targets.yaml"  # package data; ./targets.yaml links here


@dataclass(frozen=True)
class ExportSpec:
    """`export: {format: NAME, **options}`: NAME is a registered exporter's format, and the options are validated
    against the dataclass that exporter declares."""

    format: str
    options: Any

    @classmethod
    def __config_parse__(cls, raw: Any, where: str, problems: list[Problem]) -> ExportSpec | None:
        if not isinstance(raw, Mapping):
            problems.append(Problem(where, f"expected a mapping with a 'format' key, got {type_name(raw)}"))
            return None
        if "format" not in raw:
            problems.append(Problem(join(where, "format"), "required key is missing"))
            return None
        fmt = raw["format"]
        if not isinstance(fmt, str) or fmt not in EXPORTERS:
            problems.append(Problem(join(where, "format"), f"{shown(fmt)} is not valid; choose one of "
                                                           f"{', '.join(map(repr, EXPORTERS.names()))}"))
            return None
        rest = {k: v for k, v in raw.items() if k != "format"}
        options = parse_value(EXPORTERS.get(fmt).options, rest, where, problems)
        return None if options is None else cls(fmt, options)

    def __config_data__(self) -> dict[str, Any]:
        return {"format": self.format, **to_data(self.options)}

    @property
    def max_context(self) -> int | None:
        return getattr(self.options, "max_context", None)


@dataclass(frozen=True)
class StageSpec:
    """One pipeline step: `{quantize: {...}}` in YAML."""

    kind: StageKind
    config: Any

    @classmethod
    def __config_parse__(cls, raw: Any, where: str, problems: list[Problem]) -> StageSpec | None:
        kinds = ", ".join(k.value for k in StageKind)
        if not isinstance(raw, Mapping) or len(raw) != 1:
            problems.append(Problem(where, f"a stage is a mapping with exactly one key, the stage kind ({kinds}); "
                                           f"got {shown(raw)}"))
            return None
        (name, body), = raw.items()
        kind = parse_value(StageKind, name, where, problems)
        if kind is None:
            return None
        config = parse_value(STAGE_CONFIGS[kind], body, join(where, kind.value), problems)
        return None if config is None else cls(kind, config)

    def __config_data__(self) -> dict[str, Any]:
        return {self.kind.value: to_data(self.config)}


@dataclass(frozen=True)
class RuntimeSpec:
    name: str  # a registered runtime
    threads: int = setting(2, ge=1, le=256)

    def __post_init__(self) -> None:
        extra = [] if self.name in RUNTIMES else [
            Problem("name", f"{shown(self.name)} is not valid; choose one of {', '.join(map(repr, RUNTIMES.names()))}")]
        check_fields(self, extra)

    @classmethod
    def __config_parse__(cls, raw: Any, where: str, problems: list[Problem]) -> RuntimeSpec | None:
        if isinstance(raw, str):  # shorthand: `runtime: onnxruntime`
            raw = {"name": raw}
        return parse_dataclass(cls, raw, where, problems)


DEFAULT_PROMPTS = (
    "What is the capital of France?",
    "Write one sentence explaining what a compiler does.",
    "List three colors of the rainbow.",
    "How do I reverse a list in Python?",
)


@dataclass(frozen=True)
class EvalSpec:
    """The evaluation protocol: what text, how much of it, and how latency is measured."""

    data: str = setting("pydoc", doc="'pydoc' (CPython's bundled docs) or a .txt/.jsonl path")
    windows: int = setting(8, ge=1, le=4096)
    window_len: int = setting(256, ge=8, le=32768)
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    greedy_tokens: int = setting(32, ge=1, le=4096)
    prefill_len: int = setting(128, ge=1, le=32768)
    decode_tokens: int = setting(64, ge=1, le=32768)
    warmup: int = setting(1, ge=0, le=100)
    repeats: int = setting(5, ge=1, le=1000)
    latency: bool = setting(True, doc="measure latency and peak RSS (in a child process)")
    arithmetic_bound: str | None = setting(None, doc="a second accuracy pass with the runtime loaded in this "
                                                     "arithmetic (the runtime's `bounds`), gated by the same "
                                                     "accuracy budgets")
    bound_windows: int | None = setting(None, ge=1, le=4096, doc="the first N windows for the bound; all by default")

    def __post_init__(self) -> None:
        extra = [] if self.prompts else [Problem("prompts", "needs at least one prompt")]
        if self.bound_windows is not None and self.bound_windows > self.windows:
            extra.append(Problem("bound_windows", f"{self.bound_windows} exceeds windows ({self.windows})"))
        check_fields(self, extra)


@dataclass(frozen=True)
class TargetSpec:
    name: str
    export: ExportSpec
    runtime: RuntimeSpec
    description: str = ""
    stages: tuple[StageSpec, ...] = ()
    eval: EvalSpec = field(default_factory=EvalSpec)
    budgets: Budgets = field(default_factory=Budgets)

    def __post_init__(self) -> None:
        extra = []
        allowed = EXPORTERS.get(self.export.format).runtimes
        if self.runtime.name not in allowed:
            extra.append(Problem("runtime.name", f"{self.runtime.name!r} cannot run format "
                                 f"{self.export.format!r}; use {', '.join(allowed)}"))
        bound = self.eval.arithmetic_bound
        if bound is not None and self.runtime.name in RUNTIMES:
            offered = runtime_bounds(RUNTIMES.get(self.runtime.name))
            if bound not in offered:
                choice = f"choose one of {', '.join(map(repr, offered))}" if offered else "it offers none"
                extra.append(Problem("eval.arithmetic_bound", f"{shown(bound)} is not a bound of runtime "
                                                              f"{self.runtime.name!r}; {choice}"))
        ctx = self.export.max_context
        if ctx is not None:
            if self.eval.window_len > ctx:
                extra.append(Problem("eval.window_len", f"{self.eval.window_len} exceeds export.max_context {ctx}"))
            if self.eval.prefill_len + self.eval.decode_tokens > ctx:
                extra.append(Problem("eval.prefill_len", f"prefill_len + decode_tokens = "
                                     f"{self.eval.prefill_len + self.eval.decode_tokens} exceeds "
                                     f"export.max_context {ctx}"))
        seen: set[Any] = set()
        for i, stage in enumerate(self.stages):
            # A distill after quantize trains the grids, a different step from a distill before it.
            key = (stage.kind, StageKind.QUANTIZE in seen) if stage.kind is StageKind.DISTILL else stage.kind
            if key in seen:
                extra.append(Problem(f"stages[{i}]", f"stage {stage.kind.value!r} appears twice"))
            seen |= {stage.kind, key}
        extra.extend(self._quantize_stage_problems())
        check_fields(self, extra)

    def _quantize_stage_problems(self) -> list[Problem]:
        kinds = [s.kind for s in self.stages]
        if StageKind.QUANTIZE not in kinds:
            return []
        out = []
        index = kinds.index(StageKind.QUANTIZE)
        for i, stage in enumerate(self.stages[index + 1:], index + 1):
            if stage.kind is StageKind.QUANTIZE:
                continue  # reported as appearing twice
            if stage.kind is not StageKind.DISTILL:
                out.append(Problem(f"stages[{i}]", f"{stage.kind.value} after quantize would change the quantized "
                                                   f"linears' shapes or codes; only distill may follow quantize "
                                                   f"(it trains the grids' scales and offsets, codes fixed)"))
            elif stage.config.fake_quant is not None:
                out.append(Problem(f"stages[{i}].fake_quant", "a distill after quantize trains on the quantize "
                                                              "stage's own grid; remove fake_quant"))
        # What the format's kernels can hold of the stage's codes, declared with its export options.
        for problem in self.export.options.codes_problems(self.stages[index].config):
            where = f"stages[{index}].{problem.where}" if problem.where.startswith("quantize") else problem.where
            out.append(Problem(where, f"{problem.message} (export.format {self.export.format})"))
        return out

    @classmethod
    def __config_parse__(cls, raw: Any, where: str, problems: list[Problem]) -> TargetSpec | None:
        # The name comes from the key under `targets:`; everything else is an ordinary dataclass parse.
        name = where.rsplit(".", 1)[-1]
        if isinstance(raw, Mapping) and "name" in raw:
            problems.append(Problem(join(where, "name"), "unknown key; the target's name is its key"))
            return None
        body = dict(raw) if isinstance(raw, Mapping) else raw
        if isinstance(body, dict):
            body["name"] = name
        return parse_dataclass(cls, body, where, problems)

    def to_data(self) -> dict[str, Any]:
        data = to_data(self)
        data.pop("name")
        return data


@dataclass(frozen=True)
class TargetsFile:
    path: Path
    version: int
    targets: dict[str, TargetSpec]

    def get(self, name: str) -> TargetSpec:
        try:
            return self.targets[name]
        except KeyError:
            valid = ", ".join(self.targets) or "(none)"
            raise ConfigError(f"{self.path.name}: unknown target {name!r}; valid: {valid}") from None


def parse_targets(data: Any, source: str = "targets.yaml") -> dict[str, TargetSpec]:
    """Validate already-loaded YAML data; every problem is located as `source: key.path`."""
    problems: list[Problem] = []
    if not isinstance(data, Mapping):
        raise ConfigError(Problem(source, f"expected a mapping with 'version' and 'targets', got {type_name(data)}"))
    for key in data:
        if key not in ("version", "targets"):
            problems.append(Problem(join("", str(key)), "unknown key; valid keys: version, targets"))
    version = data.get("version")
    if version != SCHEMA_VERSION:
        problems.append(Problem("version", f"{shown(version)} is not supported; this compress reads version "
                                           f"{SCHEMA_VERSION}"))
    raw_targets = data.get("targets")
    targets: dict[str, TargetSpec] = {}
    if not isinstance(raw_targets, Mapping) or not raw_targets:
        problems.append(Problem("targets", f"expected a non-empty mapping of target name -> spec, got "
                                           f"{type_name(raw_targets)}"))
    else:
        for name, raw in raw_targets.items():
            spec = parse_value(TargetSpec, raw, join("targets", str(name)), problems)
            if spec is not None:
                targets[str(name)] = spec
    if problems:
        raise ConfigError([Problem(f"{source}: {p.where}" if p.where else source, p.message) for p in problems])
    return targets


MAX_TARGETS_BYTES = 1 << 20  # a targets file is a few KB; refused above this before YAML reads it


def load_targets(path: Path | str | None = None) -> TargetsFile:
    path = Path(path) if path is not None else SHIPPED_TARGETS
    if not path.is_file():
        raise ConfigError(f"targets file {str(path)!r} does not exist")
    if (size := path.stat().st_size) > MAX_TARGETS_BYTES:
        raise ConfigError(f"{path.name}: {size / 1e6:.1f} MB is too large for a targets file (at most "
                          f"{MAX_TARGETS_BYTES >> 20} MB)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        targets = parse_targets(data, path.name)
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path.name}: not UTF-8 text (byte {err.start})") from None
    except RecursionError:
        raise ConfigError(f"{path.name}: nested too deeply to be a targets file") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        loc = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path.name}: not valid YAML{loc}: {problem}") from None
    return TargetsFile(path=path, version=data["version"], targets=targets)


def parse_target(data: Mapping[str, Any], name: str) -> TargetSpec:
    """One target from a mapping (used when re-verifying from a manifest's resolved spec)."""
    problems: list[Problem] = []
    spec = parse_value(TargetSpec, dict(data), join("targets", name), problems)
    if problems:
        raise ConfigError(problems)
    return spec
