"""Judge a pipeline run against expected numbers (reference/expected.yaml).

Each entry says which configuration it applies to (`when`: dotted params.yaml keys -> values)
and lists metrics: a JSON file under the metrics folder, a dotted key path into it (`{a.b}`
in the path is replaced by the params value at a.b, e.g. `{pretrained.name}`), the expected
value and a tolerance (`abs` and/or `rel`; a metric passes when |measured − expected| <=
max(abs, rel·|expected|)). An entry whose expected value is null has no numbers yet: it fails.
The params are read as plain YAML (no schema), so the file survives a params restructure.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ddpm_core.config import read_yaml


class ExpectedError(ValueError):
    """expected.yaml (or params.yaml) is malformed; the message names the entry and key."""


@dataclass(frozen=True)
class MetricSpec:
    """One expected number: metrics/<file> at key path `key`, expected ± tolerance."""

    name: str
    file: str
    key: str
    expected: float | None
    abs_tol: float | None
    rel_tol: float | None

    def tolerance(self) -> float | None:
        """max(abs, rel·|expected|), None while the expected value is missing."""
        if self.expected is None:
            return None
        return max(self.abs_tol or 0.0, (self.rel_tol or 0.0) * abs(self.expected))


@dataclass(frozen=True)
class Entry:
    """A configuration (`when`) and the metrics expected of it."""

    name: str
    description: str
    when: dict[str, Any]
    metrics: tuple[MetricSpec, ...]


@dataclass(frozen=True)
class Row:
    """One line of the check's table."""

    metric: str
    where: str
    expected: float | None
    measured: float | None
    tolerance: float | None
    status: str  # pass | FAIL | MISSING | NO VALUE

    @property
    def ok(self) -> bool:
        return self.status == "pass"


def _number(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ExpectedError(f"{where}: expected a number or null, got {value!r}")
    return float(value)


def _metric(raw: Any, where: str) -> MetricSpec:
    if not isinstance(raw, dict):
        raise ExpectedError(f"{where}: expected a mapping with file, key, expected, abs/rel")
    unknown = set(raw) - {"name", "file", "key", "expected", "abs", "rel"}
    if unknown:
        raise ExpectedError(f"{where}: unknown keys {sorted(unknown)} (use name, file, key, "
                            "expected, abs, rel)")
    for k in ("file", "key"):
        if not isinstance(raw.get(k), str) or not raw[k]:
            raise ExpectedError(f"{where}.{k}: required (a string)")
    if "expected" not in raw:
        raise ExpectedError(f"{where}.expected: required (a number, or null until recorded)")
    abs_tol, rel_tol = _number(raw.get("abs"), f"{where}.abs"), _number(raw.get("rel"),
                                                                         f"{where}.rel")
    if abs_tol is None and rel_tol is None:
        raise ExpectedError(f"{where}: give a tolerance, abs and/or rel")
    if (abs_tol or 0) < 0 or (rel_tol or 0) < 0:
        raise ExpectedError(f"{where}: tolerances must be >= 0")
    return MetricSpec(name=str(raw.get("name", raw["key"])), file=raw["file"], key=raw["key"],
                      expected=_number(raw["expected"], f"{where}.expected"),
                      abs_tol=abs_tol, rel_tol=rel_tol)


def load_expected(path: str | Path) -> list[Entry]:
    """Entries of an expected.yaml, validated (ExpectedError names the bad key)."""
    path = Path(path)
    raw = read_yaml(path, "expected-metrics file", "pass --expected", ExpectedError)
    if not isinstance(raw, dict) or not isinstance(raw.get("entries"), list):
        raise ExpectedError(f"{path}: needs a top-level `entries:` list")
    out, names = [], set()
    for i, e in enumerate(raw["entries"]):
        where = f"{path}: entries[{i}]"
        if not isinstance(e, dict) or not isinstance(e.get("name"), str):
            raise ExpectedError(f"{where}: needs a name")
        where = f"{path}: {e['name']}"
        if e["name"] in names:
            raise ExpectedError(f"{where}: duplicate entry name")
        names.add(e["name"])
        when, metrics = e.get("when"), e.get("metrics")
        if not isinstance(when, dict) or not when:
            raise ExpectedError(f"{where}.when: a non-empty mapping of params keys to values")
        if not isinstance(metrics, list) or not metrics:
            raise ExpectedError(f"{where}.metrics: a non-empty list")
        out.append(Entry(e["name"], str(e.get("description", "")), dict(when),
                         tuple(_metric(m, f"{where}.metrics[{j}]")
                               for j, m in enumerate(metrics))))
    return out


_MISSING = object()


def lookup(tree: Any, dotted: str) -> Any:
    """tree[a][b][c] for 'a.b.c' (integer parts index lists); _MISSING when absent."""
    node = tree
    for part in dotted.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.lstrip("-").isdigit() and \
                -len(node) <= int(part) < len(node):
            node = node[int(part)]
        else:
            return _MISSING
    return node


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)
    return a == b


def matches(entry: Entry, params: dict) -> bool:
    """Every `when` key of the entry holds in params."""
    return all((v := lookup(params, k)) is not _MISSING and _equal(v, want)
               for k, want in entry.when.items())


def select_entry(entries: list[Entry], params: dict) -> Entry:
    """The entry matching params (the most specific if several); ExpectedError if none."""
    found = [e for e in entries if matches(e, params)]
    if not found:
        names = ", ".join(f"{e.name} ({', '.join(f'{k}={v}' for k, v in e.when.items())})"
                          for e in entries)
        raise LookupError(f"no entry of the expected metrics matches these params; entries: "
                          f"{names}")
    best = max(len(e.when) for e in found)
    top = [e for e in found if len(e.when) == best]
    if len(top) > 1:
        raise ExpectedError(f"entries {[e.name for e in top]} match equally; make one `when` "
                            "more specific")
    return top[0]


def _resolve_key(key: str, params: dict, where: str) -> str:
    def sub(m: re.Match) -> str:
        v = lookup(params, m.group(1))
        if v is _MISSING:
            raise ExpectedError(f"{where}: key {key!r} uses {{{m.group(1)}}}, absent from params")
        return str(v)

    return re.sub(r"\{([\w.]+)\}", sub, key)


def evaluate(entry: Entry, params: dict, metrics_dir: str | Path) -> list[Row]:
    """Measured vs expected for every metric of the entry."""
    metrics_dir = Path(metrics_dir)
    cache: dict[str, Any] = {}
    rows = []
    for m in entry.metrics:
        key = _resolve_key(m.key, params, f"{entry.name}.{m.name}")
        where = f"{m.file}:{key}"
        if m.file not in cache:
            f = metrics_dir / m.file
            try:
                cache[m.file] = json.loads(f.read_text()) if f.is_file() else _MISSING
            except json.JSONDecodeError:
                cache[m.file] = _MISSING
        value = _MISSING if cache[m.file] is _MISSING else lookup(cache[m.file], key)
        measured = float(value) if isinstance(value, int | float) and not isinstance(
            value, bool) else None
        tol = m.tolerance()
        if m.expected is None:
            status = "NO VALUE"
        elif measured is None or not math.isfinite(measured):
            status = "MISSING"
        else:
            status = "pass" if abs(measured - m.expected) <= tol else "FAIL"
        rows.append(Row(m.name, where, m.expected, measured, tol, status))
    return rows


def format_table(rows: list[Row]) -> str:
    """Plain-text table: metric, where, expected, measured, tolerance, status."""
    def num(x: float | None) -> str:
        return "-" if x is None else f"{x:.4g}"

    head = ("metric", "where", "expected", "measured", "± tol", "status")
    body = [(r.metric, r.where, num(r.expected), num(r.measured), num(r.tolerance), r.status)
            for r in rows]
    widths = [max(len(str(row[i])) for row in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in [head, *body]]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def read_params(path: str | Path) -> dict:
    """params.yaml as plain YAML."""
    raw = read_yaml(path, "params file", "pass --params", ExpectedError)
    if not isinstance(raw, dict):
        raise ExpectedError(f"{path}: expected a mapping at the top level")
    return raw


def check(params_path: str | Path, metrics_dir: str | Path,
          expected_path: str | Path) -> tuple[Entry, list[Row]]:
    """(the entry matching params, its rows); LookupError when no entry matches."""
    params = read_params(params_path)
    entry = select_entry(load_expected(expected_path), params)
    return entry, evaluate(entry, params, metrics_dir)
