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
from typing import Annotated, Any

from pydantic import StrictFloat, StrictStr, model_validator

from ddpm_core import config  # config.check: this module's check() is the judge
from ddpm_core.config import ConfigError, Invalid, read_yaml, settings, validate


class ExpectedError(ValueError):
    """expected.yaml (or params.yaml) is malformed; the message names the entry and key."""


Tolerance = Annotated[StrictFloat | None, config.check(lambda v: v is None or v >= 0,
                                                        "tolerances must be >= 0")]
Text = Annotated[StrictStr, config.check(bool, "required (a string)")]


@settings
class MetricSpec:
    """One expected number: metrics/<file> at key path `key`, expected ± tolerance."""

    file: Text
    key: Text
    expected: StrictFloat | None  # null until recorded
    name: StrictStr = ""  # "": the key
    abs: Tolerance = None
    rel: Tolerance = None

    @model_validator(mode="after")
    def _complete(self) -> MetricSpec:
        if self.abs is None and self.rel is None:
            raise Invalid("give a tolerance, abs and/or rel")
        object.__setattr__(self, "name", self.name or self.key)
        return self


@settings
class Entry:
    """A configuration (`when`) and the metrics expected of it."""

    name: StrictStr
    when: Annotated[dict[str, Any], config.check(
        bool, "a non-empty mapping of params keys to values")]
    metrics: Annotated[tuple[MetricSpec, ...], config.check(bool, "a non-empty list")]
    description: StrictStr = ""


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


def load_expected(path: str | Path) -> list[Entry]:
    """Entries of an expected.yaml, validated (ExpectedError names the bad key)."""
    path = Path(path)
    raw = read_yaml(path, "expected-metrics file", "pass --expected", ExpectedError)
    if not isinstance(raw, dict) or not isinstance(raw.get("entries"), list):
        raise ExpectedError(f"{path}: needs a top-level `entries:` list")
    out: list[Entry] = []
    for i, e in enumerate(raw["entries"]):
        name = e.get("name") if isinstance(e, dict) else None
        where = f"{path}: {name if isinstance(name, str) else f'entries[{i}]'}"
        try:
            out.append(validate(Entry, e, where))
        except ConfigError as err:
            raise ExpectedError(str(err)) from None
        if name in (o.name for o in out[:-1]):
            raise ExpectedError(f"{where}: duplicate entry name")
    return out


_MISSING = object()


def lookup(tree: Any, dotted: str) -> Any:
    """tree[a][b][c] for 'a.b.c' (integer parts index lists); _MISSING when absent."""
    node = tree
    for part in dotted.split("."):
        try:
            node = node[int(part)] if isinstance(node, list) else node[part]
        except (KeyError, IndexError, TypeError, ValueError):  # no such key, index or mapping
            return _MISSING
    return node


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)
    return a == b


def select_entry(entries: list[Entry], params: dict) -> Entry:
    """The entry whose every `when` key holds in params (the most specific if several);
    LookupError if none."""
    found = [e for e in entries if all((v := lookup(params, k)) is not _MISSING and _equal(v, want)
                                       for k, want in e.when.items())]
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
        value = lookup(cache[m.file], key)  # _MISSING from a missing file too
        measured = float(value) if isinstance(value, int | float) and not isinstance(
            value, bool) else None
        # max(abs, rel·|expected|), none while the expected value is missing
        tol = None if m.expected is None else max(m.abs or 0.0, (m.rel or 0.0) * abs(m.expected))
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
