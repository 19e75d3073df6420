"""The settings the library takes (data set, training) as frozen pydantic dataclasses, and the
validation of a settings tree with one-line errors.

A tree is validated when it is built (`validate`): an unknown key names the closest valid one,
a wrong type or an out-of-range value names the key, and pydantic's report becomes one line
`<dotted key>: <why and fix>` (ConfigError). Scalars are strict (YAML's `1e9` is text, `true` is
no number); lists become tuples. The pipeline's whole params.yaml is pipeline/params.py.
Defaults are the paper's (Ho et al. 2020, Appendix B and the official code) unless a comment
says why not.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import pydantic
import yaml
from pydantic import StrictBool, StrictFloat, StrictInt, StrictStr, model_validator

from ddpm_core.modes import Auto, Dataset, Precision

T = TypeVar("T")

# extra="forbid": an unknown key is an error; no NaN or infinity in any number.
settings = pydantic.dataclasses.dataclass(  # the decorator of every settings class
    frozen=True, config=pydantic.ConfigDict(extra="forbid", allow_inf_nan=False))


class ConfigError(ValueError):
    """A params.yaml problem; the message names the key and the fix."""


class Invalid(ValueError):
    """Raised by a validator: `why` is wrong with `key`, relative to the section validated
    ('' for the field or section itself)."""

    def __init__(self, why: str, key: str = "") -> None:
        super().__init__(why)
        self.key = key


def check(ok: Callable[[Any], bool], why: str | Callable[[Any], str]) -> Any:
    """A field constraint (in Annotated): a value failing `ok` is the error `<key>: <why>`
    (`why` may be a function of the value)."""
    def validate(value: Any) -> Any:
        if not ok(value):
            raise Invalid(why(value) if callable(why) else why)
        return value
    return pydantic.AfterValidator(validate)


Positive = Annotated[StrictInt, check(lambda v: v > 0, "must be > 0")]
NonNegative = Annotated[StrictInt, check(lambda v: v >= 0, "must be >= 0")]
PositiveFloat = Annotated[StrictFloat, check(lambda v: v > 0, "must be > 0")]
Fraction = Annotated[StrictFloat, check(lambda v: 0 <= v < 1, "must be in [0, 1)")]
PositiveOrNull = Annotated[StrictInt | None, check(lambda v: v is None or v > 0,
                                                    "must be > 0 or null")]


@settings
class DataConfig:
    """prepare stage: which images, and how the train/test split is made."""

    dataset: Dataset = "digits"
    # cifar10: the official python archive (cifar-10-python.tar.gz) or its extracted folder;
    # folder: a directory of images; npz: a file with a uint8 `images` array.
    path: StrictStr | None = None
    download: StrictBool = True  # cifar10 only: fetch the archive when `path` is missing, online
    # digits / folder / npz (CIFAR-10 has its own test split)
    test_fraction: Annotated[StrictFloat, check(lambda v: 0 < v < 1, "must be in (0, 1)")] = 0.2
    split_seed: NonNegative = 0
    # folder only: resize to this size (None: keep)
    image_size: Annotated[StrictInt | None, check(lambda v: v is None or v >= 4,
                                                   "must be >= 4")] = None

    @model_validator(mode="after")
    def _path_given(self) -> DataConfig:
        if self.dataset in ("folder", "npz") and self.path is None:
            raise Invalid(f"is required for dataset={self.dataset}", "path")
        return self


def _setting(default: Any, *, weights: bool) -> Any:
    """A TrainConfig field that says whether it changes the trained weights."""
    return dataclasses.field(default=default, metadata={"weights": weights})


@settings
class TrainConfig:
    """train stage: Adam with warm-up, clipping and EMA (DDPM's official settings).

    Each field says whether it changes the weights (`weight_settings`): those key the training
    checkpoints, and resuming with a changed one warns. `steps` does not: more steps continue.
    """

    steps: Positive = _setting(800_000, weights=False)
    batch_size: Positive = _setting(128, weights=True)
    lr: PositiveFloat = _setting(2e-4, weights=True)
    warmup_steps: NonNegative = _setting(5000, weights=True)
    grad_clip: PositiveFloat = _setting(1.0, weights=True)
    ema_decay: Fraction = _setting(0.9999, weights=True)
    # Random horizontal flips. "auto" (params.yaml): on, except for digits (a flipped digit is
    # another glyph); Params resolves it to true/false when it is built, so every consumer
    # (training, MLflow) sees the value training used.
    hflip: StrictBool | Auto = _setting(True, weights=True)
    precision: Precision = _setting("fp32", weights=True)
    compile: StrictBool = _setting(False, weights=False)
    channels_last: StrictBool = _setting(False, weights=True)  # changes float summation order
    checkpoint_every: Positive = _setting(10_000, weights=False)
    keep_checkpoints: Positive = _setting(2, weights=False)
    log_every: Positive = _setting(100, weights=False)
    resume_fallback: StrictBool = _setting(False, weights=False)
    nproc: Positive = _setting(1, weights=False)  # the global batch is the same on N processes
    nnodes: Positive = _setting(1, weights=False)  # machines, nproc processes each (torchrun)
    seed: NonNegative = _setting(0, weights=True)

    @model_validator(mode="after")
    def _batch_splits(self) -> TrainConfig:
        if self.batch_size % (self.nproc * self.nnodes):
            raise Invalid(f"must be divisible by nproc={self.nproc}" + (
                f" x nnodes={self.nnodes}" if self.nnodes > 1 else ""), "batch_size")
        return self


def weight_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The TrainConfig settings that change the trained weights, by name."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(TrainConfig)
            if f.metadata["weights"]}


# ----------------------------------------------------------------------------- one-line errors


def _unwrap(tp: Any) -> Any:
    """`tp` without Annotated and without `| None`."""
    while typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        return _unwrap(args[0])
    return tp


def _locate(root: type, loc: tuple) -> tuple[str, Any]:
    """The dotted key of a pydantic error location (`sample.steps[1]`, `variants.h.loss`) and
    the annotation there (None past an unknown key)."""
    key, tp = "", root
    for part in loc:
        tp = _unwrap(tp)
        origin = typing.get_origin(tp)
        if origin is tuple:
            key, tp = f"{key}[{part}]", typing.get_args(tp)[0]
            continue
        if part == "[key]" or origin not in (None, dict):
            break  # a mapping's key, or the member tag of a union: the key is complete
        key = f"{key}.{part}" if key else str(part)
        if origin is dict:
            tp = typing.get_args(tp)[1]
        else:
            tp = typing.get_type_hints(tp).get(part) if dataclasses.is_dataclass(tp) else None
    return key, _unwrap(tp)


def _int_hint(value: Any) -> str:
    """What to write for a whole number YAML did not read as an integer (YAML 1.1 reads 1e9 as
    text and 1.0e+9 as a float)."""
    try:
        f = float(value) if isinstance(value, (str, float)) else math.nan
    except ValueError:
        return ""
    if not math.isfinite(f) or f != int(f):
        return ""
    return f" (YAML reads {value} as {'text' if isinstance(value, str) else 'a float'}: " \
           f"write {int(f)})"


def _names(tp: Any) -> str:
    """'true or false or 'auto'' for bool | Literal['auto'], and so on."""
    if tp is bool:
        return "true or false"
    if typing.get_origin(tp) is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    return " or ".join(_names(_unwrap(a)) for a in typing.get_args(tp))


_EXPECTED = {"int_type": "an integer", "float_type": "a number", "finite_number": "a finite number",
             "bool_type": "true or false", "string_type": "a string", "tuple_type": "a list",
             "dict_type": "a mapping", "dataclass_type": "a mapping"}


def _message(root: type, error: dict, top: str) -> tuple[str, str]:
    """One pydantic error as (dotted key, why and fix); `top` names the root ('' for it)."""
    kind, value, loc = error["type"], error.get("input"), tuple(error["loc"])
    key, tp = _locate(root, loc)
    exc = (error.get("ctx") or {}).get("error")
    if isinstance(exc, Invalid):
        return ".".join(k for k in (key, exc.key) if k), str(exc)
    if kind == "unexpected_keyword_argument":
        parent, cls = _locate(root, loc[:-1])
        # the keys a section accepts (a field set from elsewhere, init=False, is none of them)
        keys = sorted(f.name for f in dataclasses.fields(cls) if f.init)
        prefix = f"{parent}." if parent else ""
        close = difflib.get_close_matches(str(loc[-1]), keys, n=1)
        return key, "unknown key; " + (
            f"did you mean '{prefix}{close[0]}'?" if close else
            f"delete it or use one of {parent or top}'s keys: {', '.join(keys)}")
    if kind == "dataclass_type" and value is None:
        return key, "is empty (null); give its settings or delete the key to use the defaults"
    if kind == "literal_error" and typing.get_origin(tp) is Literal:
        allowed = typing.get_args(tp)
        close = difflib.get_close_matches(value, [str(a) for a in allowed], n=1) if isinstance(
            value, str) else []
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return key, f"{value!r} is not one of {list(allowed)}{hint}"
    if typing.get_origin(tp) in (typing.Union, types.UnionType):  # no member of a union fits
        return key, f"expected {_names(tp)}, got {value!r}"
    if kind in _EXPECTED:
        hint = _int_hint(value) if kind == "int_type" and not isinstance(value, bool) else ""
        return key, f"expected {_EXPECTED[kind]}, got {value!r}{hint}"
    if kind == "missing":
        return key, "required key is missing"
    return key, error["msg"].lower()  # a kind no settings class provokes today


def validate(cls: type[T], raw: Any, under: str = "") -> T:
    """Build settings class `cls` from parsed YAML; any problem is one ConfigError
    `<key>: <why and fix>`, the key under `under` (e.g. `expected.yaml: toy`) or params.yaml's."""
    try:
        return pydantic.TypeAdapter(cls).validate_python({} if raw is None else raw)
    except pydantic.ValidationError as e:
        # a mistyped key first: it explains the other errors of its section
        first = min(e.errors(), key=lambda err: err["type"] != "unexpected_keyword_argument")
        key, why = _message(cls, first, under or "params.yaml")
        raise ConfigError(f"{'.'.join(k for k in (under, key) if k) or 'params.yaml'}: {why}") \
            from None


def read_yaml(path: str | Path, what: str, fix: str,
              error: type[Exception] = ConfigError) -> Any:
    """The parsed YAML of a user's file; a missing file or bad syntax is one-line `error`."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {what} not found; {fix}")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise error(f"{path}: not valid YAML{where}; fix the syntax") from None
