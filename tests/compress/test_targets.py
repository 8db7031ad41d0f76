from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from compress.errors import ConfigError
from compress.quantized import QuantAlgorithm, QuantizeConfig
from compress.targets import SHIPPED_TARGETS, load_targets, parse_target, parse_targets

GOOD = {
    "version": 1,
    "targets": {
        "t": {
            "stages": [{"quantize": {"weight_bits": 4, "group_size": 32, "activations": "int8_dynamic"}}],
            "export": {"format": "pte", "max_context": 512},
            "runtime": {"name": "executorch", "threads": 2},
            "budgets": {"max_mean_kl": 0.5},
        }
    },
}


def _with(path: str, value) -> dict:
    """GOOD with one key (dotted path under targets.t) replaced; value None deletes it."""
    import copy

    data = copy.deepcopy(GOOD)
    node = data["targets"]["t"]
    *parents, last = path.split(".")
    for p in parents:
        node = node[int(p)] if p.isdigit() else node[p]
    if value is None:
        del node[last]
    else:
        node[last] = value
    return data


def test_every_shipped_target_loads_with_the_expected_format_and_runtime():
    tf = load_targets(SHIPPED_TARGETS)
    expected = {
        "android": ("pte", "executorch"),
        "ios": ("mlpackage", "coreml"),
        "ios-coreai": ("aimodel", "coreai"),
        "web": ("onnx", "onnxruntime"),
        "desktop": ("onnx", "onnxruntime"),
        "reference": ("safetensors", "torch_eager"),
    }
    assert set(expected) <= set(tf.targets)
    for name, (fmt, runtime) in expected.items():
        spec = tf.get(name)
        assert (spec.export.format, spec.runtime.name) == (fmt, runtime)
        assert spec.budgets.items(), f"{name} has no budgets"
    android = tf.get("android").stages[-1].config  # the quantize stage; its codes are lowered as they are
    assert (android.weight_bits, android.group_size, android.activations.value) == (4, 32, "int8_dynamic")
    # web is android's stage with 8-bit scales (ONNX stores them in 8 bits) and a smaller bits budget; the YAML
    # merge key (<<) carries android's other settings over.
    web = tf.get("web").stages[-1].config
    assert dataclasses.replace(web, scale_bits=16, max_avg_bits=android.max_avg_bits) == android
    assert (web.scale_bits, web.max_avg_bits) == (8, 4.35)
    # ios-coreai runs ios's stage: one cached stage, the same codes through both Apple formats.
    assert tf.get("ios-coreai").stages[-1].config == tf.get("ios").stages[-1].config
    desktop = tf.get("desktop").stages[-1].config  # one road: desktop's int8 codes come from a stage too
    assert (desktop.weight_bits, desktop.algorithm, desktop.symmetric) == (8, QuantAlgorithm.RTN, True)


def test_resolved_spec_round_trips_through_its_data_form():
    for name, spec in load_targets().targets.items():
        assert parse_target(spec.to_data(), name) == spec


BAD_CASES = [
    # (dotted key under targets.t, value, expected fragments of the message)
    ("colour", "red", ["targets.t.colour", "unknown key", "valid keys"]),
    ("runtime.threads", "two", ["targets.t.runtime.threads", "expected an integer", "'two'"]),
    ("runtime.threads", 0, ["targets.t.runtime.threads", "out of range", ">= 1"]),
    ("runtime.name", "tflite", ["targets.t.runtime.name", "'tflite'", "'executorch'", "'onnxruntime'"]),
    ("export.format", "onx", ["targets.t.export.format", "'onx'", "'pte'", "'onnx'", "'mlpackage'"]),
    ("export.max_context", 8, ["targets.t.export.max_context", "out of range", ">= 16"]),
    ("export.bogus", 1, ["targets.t.export.bogus", "unknown key"]),
    ("export", None, ["targets.t.export", "required key is missing"]),
    ("stages", [{"quantise": {}}], ["targets.t.stages[0]", "'quantise'", "'prune'", "'quantize'"]),
    ("stages", [{"quantize": {"weight_bits": 3}}], ["stages[0].quantize.weight_bits", "3", "4, 8"]),
    ("stages", [{"quantize": {"group_size": 48}}], ["stages[0].quantize.group_size", "power of two"]),
    ("stages", [{"quantize": {"weight_bits": 8}}, {"quantize": {"weight_bits": 8}}], ["stages[1]", "appears twice"]),
    ("export.quantize", {"weight_bits": 4}, ["targets.t.export.quantize", "unknown key"]),
    ("stages", [{"quantize": {"weight_bits": 4, "activations": "none"}}], ["stages[0].quantize.activations",
                                                                           "int8 dynamic activations"]),
    ("export.attention", "flash", ["export.attention", "'flash'", "'xnnpack'", "'custom_sdpa'"]),
    ("stages", "quantize", ["targets.t.stages", "expected a list"]),
    ("budgets.max_mean_kl", -1, ["budgets.max_mean_kl", "out of range", ">= 0"]),
    ("budgets.min_top1_agreement", 1.5, ["budgets.min_top1_agreement", "<= 1"]),
    ("budgets.max_kl", 0.1, ["budgets.max_kl", "unknown key", "max_mean_kl"]),
    ("runtime", {"name": "onnxruntime"}, ["runtime.name", "cannot run format 'pte'", "executorch"]),
    ("eval", {"window_len": 1024}, ["eval.window_len", "exceeds export.max_context 512"]),
    ("eval", {"prompts": []}, ["eval.prompts", "at least one"]),
    ("eval", {"arithmetic_bound": "fp16_accumulation"}, ["eval.arithmetic_bound", "'fp16_accumulation'",
                                                         "runtime 'executorch'", "it offers none"]),
    ("eval", {"windows": 2, "bound_windows": 3}, ["eval.bound_windows", "3 exceeds windows (2)"]),
    ("eval", {"bound_windows": 0}, ["eval.bound_windows", "out of range", ">= 1"]),
]


@pytest.mark.parametrize("key,value,fragments", BAD_CASES, ids=[f"{c[0]}={c[1]!r}"[:40] for c in BAD_CASES])
def test_each_bad_config_names_the_key_the_value_and_what_is_allowed(key, value, fragments):
    with pytest.raises(ConfigError) as info:
        parse_targets(_with(key, value), "mine.yaml")
    message = str(info.value)
    assert message.startswith("mine.yaml: "), message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_an_arithmetic_bound_must_be_one_the_runtime_offers():
    data = _with("export", {"format": "mlpackage", "max_context": 512, "compute_units": "cpu_and_gpu"})
    data["targets"]["t"].update(runtime="coreml", stages=[])
    data["targets"]["t"]["eval"] = {"arithmetic_bound": "fp16_accumulation", "bound_windows": 2}
    spec = parse_targets(data, "mine.yaml").get("t")
    assert (spec.eval.arithmetic_bound, spec.eval.bound_windows) == ("fp16_accumulation", 2)
    data["targets"]["t"]["eval"] = {"arithmetic_bound": "bf16"}
    with pytest.raises(ConfigError, match="eval.arithmetic_bound: 'bf16' is not a bound of runtime 'coreml'; "
                                          "choose one of 'fp16_accumulation'"):
        parse_targets(data, "mine.yaml")


def test_all_problems_are_reported_together():
    data = _with("colour", "red")
    t = data["targets"]["t"]
    t["runtime"]["threads"] = 0
    t["budgets"]["max_mean_kl"] = "low"
    t["stages"] = [{"quantize": {"weight_bits": 3, "symmetric": "yes"}}]
    data["targets"]["u"] = {"export": {"format": "gguf", "file_type": "q3"}, "runtime": "llamacpp"}
    with pytest.raises(ConfigError) as info:
        parse_targets(data, "x.yaml")
    wheres = [p.where for p in info.value.problems]
    assert len(wheres) == 6, info.value
    assert "x.yaml: targets.u.export.file_type" in wheres


@pytest.mark.parametrize("data,fragment", [
    ({"version": 2, "targets": GOOD["targets"]}, "version: 2 is not supported"),
    ({"targets": GOOD["targets"]}, "version: None is not supported"),
    ({"version": 1, "targets": {}}, "targets: expected a non-empty mapping"),
    ({"version": 1, "targets": GOOD["targets"], "extra": 1}, "extra: unknown key"),
    (["a"], "expected a mapping with 'version' and 'targets'"),
])
def test_file_level_problems(data, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        parse_targets(data)


def test_configs_validate_themselves_when_built_in_python():
    with pytest.raises(ConfigError, match="weight_bits: 3 is not allowed; choose one of 4, 8"):
        QuantizeConfig(weight_bits=3)


def test_unreadable_files_give_one_clear_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_targets(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("version: 1\ntargets: {a: [\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: not valid YAML \(line \d+, column \d+\)"):
        load_targets(broken)


def test_unknown_target_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="unknown target 'andriod'; valid: android, android-small, ios, ios-coreai, web, desktop"):
        load_targets().get("andriod")


def test_cli_check_reports_every_problem_and_exits_2(tmp_path: Path, cli):
    bad = tmp_path / "bad.yaml"
    data = _with("colour", "red")
    data["targets"]["t"]["runtime"]["threads"] = 0
    bad.write_text(yaml.safe_dump(data))
    result = cli("targets", "check", str(bad))
    assert result.code == 2, result.stderr
    assert "2 problems" in result.stderr
    assert "bad.yaml: targets.t.colour: unknown key" in result.stderr
    assert "bad.yaml: targets.t.runtime.threads: 0 is out of range" in result.stderr
    assert "Traceback" not in result.stderr
    ok = cli("targets", "check")
    assert ok.code == 0 and "OK" in ok.stdout


def test_cli_show_prints_the_resolved_target(cli):
    result = cli("targets", "show", "android")
    assert result.code == 0, result.stderr
    shown = yaml.safe_load(result.stdout)["android"]
    assert shown["export"]["format"] == "pte" and shown["eval"]["windows"] == 8  # defaults filled in
