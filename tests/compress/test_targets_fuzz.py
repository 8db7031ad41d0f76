"""Property-based: the shipped targets.yaml, mutated (types, keys, nesting, sizes, unicode, raw bytes), is either a
valid targets file that round-trips or one ConfigError (exit 2) naming what is wrong; never another exception."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from compress.errors import ConfigError, ExitCode
from compress.targets import SHIPPED_TARGETS, load_targets, parse_target

SHIPPED = yaml.safe_load(SHIPPED_TARGETS.read_text())
# Derandomized: CI runs the same examples every time (a failure reproduces). No shrinking phase: shrinking a
# failure here can take minutes; the failing example is printed as found.
FUZZ = settings(derandomize=True, max_examples=300, deadline=None, database=None,
                phases=[Phase.explicit, Phase.reuse, Phase.generate],
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
MESSAGE_LINE_MAX = 400  # characters per line of a problem: a hostile value is shown shortened, never whole

SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
    st.sampled_from(["android", "pte", "onnx", "gguf", "int8", "int8_dynamic", "q4_0", "hqq", "gptq", "4", "32",
                     "1e-9", "-1", "yes", "~", "smollm2-135m", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "a" * 5000]),
)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=12), inner, max_size=4)),
                      max_leaves=16)
KEYS = st.one_of(st.text(max_size=16), st.sampled_from(["stages", "export", "runtime", "budgets", "eval", "quantize",
                                                        "prune", "distill", "format", "name", "threads"]))


def _mutate(data: Any, draw: Any) -> Any:
    """One mutation at a random place in the tree: a value replaced, a key dropped, added or renamed, an item
    duplicated, or a value buried under many levels of nesting."""
    if not isinstance(data, (dict, list)) or not data or draw(st.integers(0, 3)) == 0:
        action = draw(st.sampled_from(["replace", "nest", "drop", "add", "rename", "duplicate"]))
        if action == "replace" or not isinstance(data, (dict, list)) or not data:
            return draw(VALUES)
        if action == "nest":
            depth = draw(st.integers(1, 200))
            for _ in range(depth):
                data = [data] if draw(st.booleans()) else {draw(KEYS): data}
            return data
        if isinstance(data, dict):
            key = draw(st.sampled_from(sorted(data, key=str)))
            if action == "drop":
                del data[key]
            elif action == "add":
                data[draw(KEYS)] = draw(VALUES)
            elif action == "rename":
                data[draw(KEYS)] = data.pop(key)
            else:
                data[f"{key}"] = copy.deepcopy(data[key])
            return data
        index = draw(st.integers(0, len(data) - 1))
        if action == "drop":
            del data[index]
        elif action == "add":
            data.insert(index, draw(VALUES))
        else:
            data.append(copy.deepcopy(data[index]))
        return data
    if isinstance(data, dict):
        key = draw(st.sampled_from(sorted(data, key=str)))
        data[key] = _mutate(data[key], draw)
    else:
        index = draw(st.integers(0, len(data) - 1))
        data[index] = _mutate(data[index], draw)
    return data


def _check(text: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "targets.yaml"
        path.write_bytes(text)
        try:
            loaded = load_targets(path)
        except ConfigError as err:
            message = str(err)
            assert err.exit_code is ExitCode.BAD_INPUT and message.strip()
            assert "Traceback" not in message
            assert all(len(line) <= MESSAGE_LINE_MAX for line in message.splitlines()), message[:2000]
            return
        for name, spec in loaded.targets.items():  # what loads is a whole, valid spec
            assert parse_target(spec.to_data(), name) == spec


@FUZZ
@given(st.data())
def test_a_mutated_targets_file_loads_or_is_refused_with_a_config_error(data):
    tree = copy.deepcopy(SHIPPED)
    for _ in range(data.draw(st.integers(1, 3))):
        tree = _mutate(tree, data.draw)
    _check(yaml.safe_dump(tree, allow_unicode=True, sort_keys=False).encode())


@FUZZ
@given(st.data())
def test_a_damaged_targets_file_text_loads_or_is_refused_with_a_config_error(data):
    text = bytearray(SHIPPED_TARGETS.read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(text)))
        action = data.draw(st.sampled_from(["cut", "insert", "bytes", "truncate"]))
        if action == "cut":
            del text[at:at + data.draw(st.integers(1, 200))]
        elif action == "insert":
            text[at:at] = data.draw(st.text(min_size=1, max_size=40)).encode("utf-8", "surrogatepass")
        elif action == "bytes":
            text[at:at] = data.draw(st.binary(min_size=1, max_size=16))
        else:
            del text[at:]
    _check(bytes(text))


def test_a_huge_targets_file_is_refused_before_it_is_parsed(tmp_path: Path):
    huge = tmp_path / "targets.yaml"
    huge.write_text("version: 1\n# " + "x" * (2 << 20) + "\n")
    try:
        load_targets(huge)
    except ConfigError as err:
        assert "targets.yaml: 2.1 MB is too large for a targets file (at most 1 MB)" in str(err)
    else:
        raise AssertionError("a 2 MB targets file loaded")
