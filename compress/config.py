"""Typed configs parsed once at the edge.

Configs are frozen dataclasses. Each field may carry `choices` / range metadata (see `setting`); the
dataclass's `__post_init__` calls `check_fields(self, ...)`, so a config built in Python is validated
exactly like one read from YAML. `parse(cls, raw, where)` turns a YAML mapping into such a dataclass
and reports *every* problem it finds (unknown keys, wrong types, missing keys, out-of-range values),
each located by its key path, in one `ConfigError`.
"""

from __future__ import annotations

import dataclasses
import enum
import reprlib
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from compress.errors import ConfigError, Problem

T = TypeVar("T")
_MISSING = dataclasses.MISSING


def setting(
    default: Any = _MISSING,
    *,
    choices: Iterable[Any] | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    doc: str = "",
) -> Any:
    """A dataclass field with validation metadata, checked by `check_fields`."""
    meta = {"choices": tuple(choices) if choices is not None else None, "ge": ge, "gt": gt, "le": le,
            "lt": lt, "doc": doc}
    if isinstance(default, (list, dict, set)):
        raise TypeError("use an immutable default (tuple, frozen dataclass)")
    return dataclasses.field(default=default, metadata=meta)


def _range_text(m: Mapping[str, Any]) -> str:
    parts = []
    if m.get("ge") is not None:
        parts.append(f">= {m['ge']}")
    if m.get("gt") is not None:
        parts.append(f"> {m['gt']}")
    if m.get("le") is not None:
        parts.append(f"<= {m['le']}")
    if m.get("lt") is not None:
        parts.append(f"< {m['lt']}")
    return " and ".join(parts)


SHOWN_MAX = 60  # characters of a value (or key) quoted back in a problem: a hostile one is shown shortened


# A container's repr is bounded before it is made: YAML aliases make a small file a structure whose full repr is
# exponential in its size (an alias bomb), and reprlib stops at these depths and lengths.
_BOUNDED = reprlib.Repr()  # keyword arguments only from Python 3.12
_BOUNDED.maxlevel, _BOUNDED.maxdict, _BOUNDED.maxlist, _BOUNDED.maxtuple, _BOUNDED.maxset = 3, 4, 4, 4, 4
_BOUNDED.maxstring = _BOUNDED.maxother = _BOUNDED.maxlong = SHOWN_MAX


def shown(value: Any) -> str:
    """`value` as a problem message quotes it: its repr (an enum's value's), shortened past SHOWN_MAX."""
    if isinstance(value, enum.Enum):
        text = repr(value.value)
    elif isinstance(value, (Mapping, list, tuple, set)):
        text = _BOUNDED.repr(value)
    else:
        text = repr(value)
    return text if len(text) <= SHOWN_MAX else f"{text[:SHOWN_MAX - 20]}... ({len(text)} characters)"


def field_problems(obj: Any) -> list[Problem]:
    """Problems with `obj`'s fields against their `setting` metadata (choices, ranges)."""
    problems: list[Problem] = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        m = f.metadata
        if value is None or not m:
            continue
        if m.get("choices") is not None and value not in m["choices"]:
            allowed = ", ".join(shown(c) for c in m["choices"])
            problems.append(Problem(f.name, f"{shown(value)} is not allowed; choose one of {allowed}"))
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if ((m.get("ge") is not None and value < m["ge"]) or (m.get("gt") is not None and value <= m["gt"])
                    or (m.get("le") is not None and value > m["le"]) or (m.get("lt") is not None
                                                                        and value >= m["lt"])):
                problems.append(Problem(f.name, f"{shown(value)} is out of range; allowed: {_range_text(m)}"))
    return problems


def check_fields(obj: Any, extra: Iterable[Problem] = ()) -> None:
    """Raise one ConfigError with every field problem of `obj` plus `extra` (cross-field rules)."""
    problems = field_problems(obj) + list(extra)
    if problems:
        raise ConfigError(problems)


def join(where: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{where}[{key}]"
    key = key if len(key) <= SHOWN_MAX else shown(key)
    return f"{where}.{key}" if where else key


def type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a mapping"}.get(type(value), type(value).__name__)


def parse(cls: type[T], raw: Any, where: str = "") -> T:
    """Build `cls` from YAML data, or raise ConfigError listing every problem found."""
    problems: list[Problem] = []
    obj = parse_value(cls, raw, where, problems)
    if problems:
        raise ConfigError(problems)
    return obj


def parse_value(tp: Any, raw: Any, where: str, problems: list[Problem]) -> Any:
    """Parse `raw` as type `tp`, appending problems; returns None when it could not."""
    custom = getattr(tp, "__config_parse__", None)
    if custom is not None:
        return custom(raw, where, problems)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if raw is None and len(inner) < len(args):
            return None
        if len(inner) != 1:
            raise TypeError(f"unsupported union {tp}")
        return parse_value(inner[0], raw, where, problems)
    if origin is tuple:
        if not isinstance(raw, list):
            problems.append(Problem(where, f"expected a list, got {type_name(raw)}"))
            return None
        before = len(problems)
        items = tuple(parse_value(args[0], item, join(where, i), problems) for i, item in enumerate(raw))
        return items if len(problems) == before else None
    if dataclasses.is_dataclass(tp):
        return parse_dataclass(tp, raw, where, problems)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        values = [e.value for e in tp]
        if raw in values and not isinstance(raw, bool):
            return tp(raw)
        problems.append(Problem(where, f"{shown(raw)} is not valid; choose one of {', '.join(map(repr, values))}"))
        return None
    if tp is bool:
        if isinstance(raw, bool):
            return raw
    elif tp is int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
    elif tp is float:
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return float(raw)
    elif tp is str:
        if isinstance(raw, str):
            return raw
    else:
        raise TypeError(f"unsupported config type {tp!r}")
    problems.append(Problem(where, f"expected {type_name(tp())}, got {type_name(raw)} {shown(raw)}"))
    return None


def parse_dataclass(cls: Any, raw: Any, where: str, problems: list[Problem]) -> Any:
    """The field-by-field parse of a dataclass (what `parse_value` does unless the class customises it)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        problems.append(Problem(where, f"expected a mapping, got {type_name(raw)} {shown(raw)}"))
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in raw:
        if key not in fields:
            problems.append(Problem(join(where, str(key)), f"unknown key; valid keys: {', '.join(fields)}"))
    kwargs = {}
    complete = True  # every required field parsed: worth constructing to report range/cross-field problems
    for name, f in fields.items():
        path = join(where, name)
        required = f.default is _MISSING and f.default_factory is _MISSING
        if name in raw:
            before = len(problems)
            value = parse_value(hints[name], raw[name], path, problems)
            if len(problems) == before:
                kwargs[name] = value
            elif required:
                complete = False
        elif required:
            problems.append(Problem(path, "required key is missing"))
            complete = False
    if not complete:
        return None
    try:
        return cls(**kwargs)
    except ConfigError as err:
        known = {p.where for p in problems}
        problems.extend(q for q in (Problem(join(where, p.where) if p.where else where, p.message)
                                    for p in err.problems) if q.where not in known)
        return None


def to_data(obj: Any) -> Any:
    """The YAML/JSON-ready form of a config (enums as their values, tuples as lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        custom = getattr(obj, "__config_data__", None)
        if custom is not None:
            return custom()
        return {f.name: to_data(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (tuple, list)):
        return [to_data(x) for x in obj]
    if isinstance(obj, Mapping):
        return {str(k): to_data(v) for k, v in obj.items()}
    return obj
