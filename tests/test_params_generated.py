"""Bad params generated from the configuration tree itself, so that a new key is covered the
day it is added: for every key, a wrong type, an out-of-range value, an unknown sibling key and
null where null is not allowed. Each must be a ConfigError whose one line names the key
(in-process: fast). tests/test_params.py keeps the exit-status plumbing through real stages."""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, Union

import pytest
import yaml

from pipeline.params import ConfigError, Params, params_from_dict

REPO = Path(__file__).resolve().parents[1]
BASE = yaml.safe_load((REPO / "params.yaml").read_text())

# Numbers no setting accepts: each numeric key must reject at least one of them.
OUT_OF_RANGE_INT = (-1, 0, 10**12)
OUT_OF_RANGE_FLOAT = (-1.0, 0.0, 1.0, 2.0, 1e12, math.inf, math.nan)


@dataclasses.dataclass(frozen=True)
class Case:
    """One mutation of params.yaml: set `path` to `value` (or add an unknown key beside it)."""

    kind: str
    path: tuple[str | int, ...]
    value: Any
    key: str  # what the error must name

    @property
    def id(self) -> str:
        return f"{self.kind}:{self.key}={self.value!r}"


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else tp), type(None) in typing.get_args(tp)
    return tp, False


def _wrong_type(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):  # e.g. bool | "auto": a nested list fits none
        return [[1]]
    if origin is Literal:
        return 12345
    if origin is tuple:
        return "not-a-list"
    if dataclasses.is_dataclass(tp) or origin is dict:
        return "not-a-mapping"
    return {bool: "yes-please", int: "seven", float: "half", str: 12345}[tp]


def _key(path: tuple[str | int, ...]) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out


def _walk(cls: type, raw: dict, path: tuple[str | int, ...]) -> Iterator[tuple[Any, tuple, Any]]:
    """(annotation, path, current value) of every key of dataclass `cls` under `path`."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        value = raw.get(f.name, None) if isinstance(raw, dict) else None
        yield tp, (*path, f.name), value
        inner, _ = _strip_optional(tp)
        if dataclasses.is_dataclass(inner):
            yield from _walk(inner, value or {}, (*path, f.name))
        elif typing.get_origin(inner) is tuple:
            item = typing.get_args(inner)[0]
            if dataclasses.is_dataclass(item) and value:
                yield from _walk(item, value[0], (*path, f.name, 0))
        elif typing.get_origin(inner) is dict:
            item = typing.get_args(inner)[1]
            if dataclasses.is_dataclass(item) and value:
                first = next(iter(value))
                yield from _walk(item, value[first], (*path, f.name, first))


def generate_cases() -> list[Case]:
    cases = []
    for tp, path, _value in _walk(Params, BASE, ()):
        inner, optional = _strip_optional(tp)
        key = _key(path)
        cases.append(Case("wrong_type", path, _wrong_type(inner), key))
        cases.append(Case("unknown_sibling", path, None, _key((*path[:-1], "zz_unknown"))))
        if not optional:
            cases.append(Case("null", path, None, key))
        if inner is int or inner is float:
            cases.append(Case("out_of_range", path, None, key))
        elif typing.get_origin(inner) is Literal:
            cases.append(Case("out_of_range", path, "not-a-mode", key))
        elif typing.get_origin(inner) is tuple and typing.get_args(inner)[0] in (int, float):
            cases.append(Case("out_of_range", path, [-1], key))
    return cases


CASES = generate_cases()
KEYS = {_key(p) for _, p, _ in _walk(Params, BASE, ())}


def _set(raw: dict, path: tuple, value: Any) -> dict:
    out = copy.deepcopy(raw)
    node = out
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    return out


def _unknown(raw: dict, path: tuple) -> dict:
    out = copy.deepcopy(raw)
    node = out
    for p in path[:-1]:
        node = node.setdefault(p, {}) if isinstance(p, str) else node[p]
    node["zz_unknown"] = 1
    return out


def _error(raw: dict) -> str:
    with pytest.raises(ConfigError) as e:
        params_from_dict(raw)
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def test_the_shipped_params_yaml_is_valid_and_the_tree_is_covered():
    params_from_dict(BASE)
    kinds = {c.kind for c in CASES}
    assert kinds == {"wrong_type", "unknown_sibling", "null", "out_of_range"}
    assert len(CASES) > 150, len(CASES)


@pytest.mark.parametrize("case", [c for c in CASES if c.kind != "out_of_range"],
                         ids=lambda c: c.id)
def test_bad_value_is_one_line_naming_the_key(case: Case):
    raw = (_unknown(BASE, case.path) if case.kind == "unknown_sibling"
           else _set(BASE, case.path, case.value))
    msg = _error(raw)
    assert msg.startswith(f"{case.key}") or msg.startswith(f"{case.key}:"), (case.key, msg)


@pytest.mark.parametrize("case", [c for c in CASES if c.kind == "out_of_range"],
                         ids=lambda c: c.id)
def test_out_of_range_value_is_one_line_naming_the_key(case: Case):
    tp = dict((p, t) for t, p, _ in _walk(Params, BASE, ()))[case.path]
    inner, _ = _strip_optional(tp)
    if case.value is not None:
        candidates = [case.value]
    else:
        candidates = list(OUT_OF_RANGE_INT if inner is int else OUT_OF_RANGE_FLOAT)
    rejected = []
    for v in candidates:
        try:
            params_from_dict(_set(BASE, case.path, v))
        except ConfigError as e:
            msg = str(e)
            assert "\n" not in msg and ": " in msg, msg
            if msg.startswith(f"{case.key}:"):
                rejected.append(v)
            else:  # a cross-field check may name the other key (batch_size vs nproc)
                assert msg.split(":")[0] in KEYS, msg
    assert rejected, f"{case.key}: accepts every one of {candidates}; give it a range"
    if inner is float:
        assert math.inf in rejected, f"{case.key}: accepts inf"
        assert any(isinstance(v, float) and math.isnan(v) for v in rejected), (
            f"{case.key}: accepts NaN")
