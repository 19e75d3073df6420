"""The configuration tree: frozen, typed dataclasses loaded from `params.yaml`.

Every section is validated when it is built: an unknown key names the closest valid one, a wrong
type or an out-of-range value names the key, and nothing runs before the whole file is checked.
Defaults are the paper's (Ho et al. 2020, Appendix B and the official code) unless a comment
says why not; the shipped `params.yaml` overrides a few of them so that the default pipeline runs
on the 8x8 digits data set on two CPU cores.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from ddpm_core.last_sigma import DEFAULT_LAST_SIGMA_CAP_Y
from ddpm_core.modes import LossType, MeanType, Spacing, TSampling, VarType
from ddpm_core.modes import ScheduleKind as Schedule


class ConfigError(ValueError):
    """A params.yaml problem; the message names the key and the fix."""


def _require(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


@dataclass(frozen=True)
class DataConfig:
    """prepare stage: which images, and how the train/test split is made."""

    dataset: Literal["digits", "cifar10", "folder", "npz"] = "digits"
    # cifar10: the official python archive (cifar-10-python.tar.gz) or its extracted folder;
    # folder: a directory of images; npz: a file with a uint8 `images` array.
    path: str | None = None
    download: bool = True  # cifar10 only: fetch the archive when `path` is missing and online
    test_fraction: float = 0.2  # digits / folder / npz (CIFAR-10 has its own test split)
    split_seed: int = 0
    image_size: int | None = None  # folder only: resize to this size (None: keep)

    def validate(self, key: str) -> None:
        _require(0.0 < self.test_fraction < 1.0, f"{key}.test_fraction", "must be in (0, 1)")
        _require(self.split_seed >= 0, f"{key}.split_seed", "must be >= 0")
        if self.dataset in ("folder", "npz"):
            _require(self.path is not None, f"{key}.path",
                     f"is required for dataset={self.dataset}")
        if self.image_size is not None:
            _require(self.image_size >= 4, f"{key}.image_size", "must be >= 4")


@dataclass(frozen=True)
class ModelConfig:
    """The U-Net: a preset from ddpm_core.unet.PRESETS, with optional overrides."""

    preset: Literal["digits", "cifar10", "celebahq256", "lsun256"] = "digits"
    base_channels: int | None = None
    channel_mult: tuple[int, ...] | None = None
    num_res_blocks: int | None = None
    attn_resolutions: tuple[int, ...] | None = None
    dropout: float | None = None

    def validate(self, key: str) -> None:
        if self.base_channels is not None:
            _require(self.base_channels > 0, f"{key}.base_channels", "must be > 0")
        if self.num_res_blocks is not None:
            _require(self.num_res_blocks > 0, f"{key}.num_res_blocks", "must be > 0")
        if self.dropout is not None:
            _require(0.0 <= self.dropout < 1.0, f"{key}.dropout", "must be in [0, 1)")
        if self.channel_mult is not None:
            _require(len(self.channel_mult) > 0 and min(self.channel_mult) > 0,
                     f"{key}.channel_mult", "must be a non-empty list of positive ints")
        if self.attn_resolutions is not None:
            _require(all(r > 0 for r in self.attn_resolutions), f"{key}.attn_resolutions",
                     "must be feature-map sizes (positive ints, e.g. [16]) or []")


@dataclass(frozen=True)
class DiffusionConfig:
    """The forward process; the schedule kind is the top-level `schedule` key."""

    timesteps: int = 1000

    def validate(self, key: str) -> None:
        _require(self.timesteps >= 2, f"{key}.timesteps", "must be >= 2")


# A variant's name is its key in the `variants` mapping: it names the DVC stages (train@<name>,
# sample@<name>, ...) and every file of the variant, so it must be a plain file-name word.
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


@dataclass(frozen=True)
class VariantConfig:
    """One model: a row of DDPM Table 2 (or improved DDPM's hybrid objective) that the train
    stage trains, or, with `pretrained`, existing weights that the train stage imports."""

    name: str = field(default="", metadata={"from_key": True})  # the mapping key
    mean_type: MeanType = "eps"
    var_type: VarType = "fixed_large"
    loss: LossType = "simple"
    t_sampling: TSampling = "uniform"
    # Evaluate existing weights instead of training: one of our model files
    # (models/<name>.pt), a training checkpoint (checkpoints/.../ckpt_*.pt), or with
    # format: diffusers a diffusers DDPM folder (config.json + weights).
    pretrained: str | None = None
    format: Literal["ours", "diffusers"] = "ours"

    def validate(self, key: str) -> None:
        _require(bool(self.name) and set(self.name) <= _NAME_CHARS, key,
                 "a variant name must be letters, digits, '-' or '_' (it names the DVC stages "
                 "and files)")
        learned = self.var_type in ("learned", "learned_range")
        if learned and self.pretrained is None:
            _require(self.loss != "simple", f"{key}.loss",
                     "a learned variance needs loss 'vlb' or 'hybrid' (L_simple does not train it)")
        if self.loss == "hybrid" and not learned and self.pretrained is None:  # losses.Loss
            raise ConfigError(f"{key}.var_type: loss 'hybrid' trains a learned variance; use "
                              "var_type learned or learned_range (or loss simple or vlb with "
                              f"var_type {self.var_type})")
        if self.t_sampling == "importance":
            _require(self.loss == "vlb", f"{key}.t_sampling",
                     "importance sampling of t is defined for loss 'vlb' only")


def _setting(default: Any, *, weights: bool) -> Any:
    """A TrainConfig field that says whether it changes the trained weights."""
    return field(default=default, metadata={"weights": weights})


@dataclass(frozen=True)
class TrainConfig:
    """train stage: Adam with warm-up, clipping and EMA (DDPM's official settings).

    Each field says whether it changes the weights (`weight_settings`): those key the training
    checkpoints, and resuming with a changed one warns. `steps` does not: more steps continue.
    """

    steps: int = _setting(800_000, weights=False)
    batch_size: int = _setting(128, weights=True)
    lr: float = _setting(2e-4, weights=True)
    warmup_steps: int = _setting(5000, weights=True)
    grad_clip: float = _setting(1.0, weights=True)
    ema_decay: float = _setting(0.9999, weights=True)
    # Random horizontal flips. "auto" (params.yaml): on, except for digits (a flipped digit is
    # another glyph); Params resolves it to true/false when it is built, so every consumer
    # (training, MLflow) sees the value training used.
    hflip: bool | Literal["auto"] = _setting(True, weights=True)
    precision: Literal["fp32", "bf16"] = _setting("fp32", weights=True)
    compile: bool = _setting(False, weights=False)
    channels_last: bool = _setting(False, weights=True)  # changes float summation order
    checkpoint_every: int = _setting(10_000, weights=False)
    keep_checkpoints: int = _setting(2, weights=False)
    log_every: int = _setting(100, weights=False)
    resume_fallback: bool = _setting(False, weights=False)
    nproc: int = _setting(1, weights=False)  # the global batch is the same on N processes
    seed: int = _setting(0, weights=True)

    def validate(self, key: str) -> None:
        for name in ("steps", "batch_size", "checkpoint_every", "keep_checkpoints", "log_every",
                     "nproc"):
            _require(getattr(self, name) > 0, f"{key}.{name}", "must be > 0")
        _require(self.lr > 0, f"{key}.lr", "must be > 0")
        _require(self.warmup_steps >= 0, f"{key}.warmup_steps", "must be >= 0")
        _require(self.grad_clip > 0, f"{key}.grad_clip", "must be > 0")
        _require(0.0 <= self.ema_decay < 1.0, f"{key}.ema_decay", "must be in [0, 1)")
        _require(self.seed >= 0, f"{key}.seed", "must be >= 0")
        _require(self.batch_size % self.nproc == 0, f"{key}.batch_size",
                 f"must be divisible by nproc={self.nproc}")


def weight_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The TrainConfig settings that change the trained weights, by name."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(TrainConfig)
            if f.metadata["weights"]}


@dataclass(frozen=True)
class SampleConfig:
    """sample stage: which samplers run on every trained variant, and how many images."""

    num_samples: int = 50_000
    batch_size: int = 256
    use_ema: bool = True
    clip_x0: bool = True
    # Ancestral sampling (all T steps, and respaced at every S of steps) with each σ² choice:
    # fixed_large | fixed_small | analytic (Analytic-DPM: Γ from the gamma stage; analytic also
    # adds Analytic-DDIM, DDIM with the σ̂² noise, at every S of steps).
    variances: tuple[str, ...] = ("fixed_large", "fixed_small")
    # Respaced ancestral (sigma^2 = beta) and DDIM at these step counts, for FID vs steps.
    steps: tuple[int, ...] = (10, 20, 50, 100)
    # trailing: every chain starts at step T (Lin et al. 2024); the DDIM paper's conventions
    # (leading, ddim_quadratic) start earlier and stay available for comparing with its table.
    spacing: Spacing = "trailing"
    ddim_eta: float = 0.0
    # σ of the step to x_{τ_1} (respaced chains of K < T steps and DDIM) at most 2y/255·√(π/2),
    # y pixel levels: Bao et al.'s code (clip_sigma_idx 1; y = 2 for CIFAR-10 LS, else 1). DDPM
    # and DDIM's papers have no cap: null. The full T-step chain is never capped.
    last_sigma_cap_y: float | None = DEFAULT_LAST_SIGMA_CAP_Y
    seed: int = 0
    grid_size: int = 64
    # The network call (ddpm_core.inference): bf16 autocast, torch.compile (CUDA graphs on a
    # GPU), and N processes under torchrun, each taking its share of the batches.
    precision: Literal["fp32", "bf16"] = "fp32"
    compile: bool = False
    nproc: int = 1

    def validate(self, key: str) -> None:
        _require(self.num_samples > 0, f"{key}.num_samples", "must be > 0")
        _require(self.batch_size > 0, f"{key}.batch_size", "must be > 0")
        _require(0.0 <= self.ddim_eta <= 1.0, f"{key}.ddim_eta", "must be in [0, 1]")
        _require(self.last_sigma_cap_y is None or self.last_sigma_cap_y > 0,
                 f"{key}.last_sigma_cap_y", "must be > 0 (pixel levels) or null (no cap)")
        _require(all(s > 0 for s in self.steps), f"{key}.steps", "must be positive step counts")
        _require(self.grid_size > 0, f"{key}.grid_size", "must be > 0")
        _require(self.seed >= 0, f"{key}.seed", "must be >= 0")
        _require(self.nproc > 0, f"{key}.nproc", "must be > 0")
        for v in self.variances:
            _require(v in ("fixed_large", "fixed_small", "analytic"), f"{key}.variances",
                     f"{v!r} is not a σ² choice; use fixed_large, fixed_small or analytic")


@dataclass(frozen=True)
class BpdConfig:
    """bpd stage: the full variational bound on the test split."""

    num_images: int | None = None  # None: the whole test split
    batch_size: int = 64
    t_batch: int = 8  # timesteps evaluated per network call (x batch_size images)
    # fixed_large | fixed_small | analytic (Analytic-DPM: needs the gamma stage's Γ)
    variances: tuple[str, ...] = ("fixed_large", "fixed_small")
    # K-step chains (even trajectory) besides the full chain T; K = T is always evaluated.
    steps: tuple[int, ...] = ()
    use_ema: bool = True
    # The network call (ddpm_core.inference): bf16 autocast, torch.compile (CUDA graphs on a
    # GPU), and N processes under torchrun, each taking its share of the batches.
    precision: Literal["fp32", "bf16"] = "fp32"
    compile: bool = False
    nproc: int = 1
    seed: int = 0  # the q(x_t | x_0) noise of test image i at step τ comes from (seed, i, τ)

    def validate(self, key: str) -> None:
        _require(self.seed >= 0, f"{key}.seed", "must be >= 0")
        # the even trajectory keeps steps 1 and T (likelihood.even_trajectory): a chain of one
        # step has no decoder step below its prior, so K = 1 is no bound of that family
        _require(all(k >= 2 for k in self.steps), f"{key}.steps",
                 "K = 1 is no chain (the even trajectory keeps steps 1 and T); give K >= 2")
        for v in self.variances:
            _require(v in ("fixed_large", "fixed_small", "analytic"), f"{key}.variances",
                     f"{v!r} is not a σ² choice; use fixed_large, fixed_small or analytic")
        if self.num_images is not None:
            _require(self.num_images > 0, f"{key}.num_images", "must be > 0 or null")
        _require(self.batch_size > 0, f"{key}.batch_size", "must be > 0")
        _require(self.t_batch > 0, f"{key}.t_batch", "must be > 0")
        _require(self.nproc > 0, f"{key}.nproc", "must be > 0")


@dataclass(frozen=True)
class NllConfig:
    """nll stage: the exact bits/dim by the probability-flow ODE (Song et al. 2021, uniform
    dequantization, Hutchinson divergence) on the first num_images test images."""

    num_images: int | None = None  # None: the whole test split
    rtol: float = 1e-5  # RK45 tolerances (Song et al. 2021, App. D.2)
    atol: float = 1e-5
    repeats: int = 1  # independent Hutchinson probes per image
    # images sharing one solve share its steps: a number depends on the batch within the
    # tolerance; 1 makes each image's number depend on (seed, index) only
    batch_size: int = 1
    seed: int = 0  # dequantization noise and probes of image i come from (seed, i)
    use_ema: bool = True

    def validate(self, key: str) -> None:
        if self.num_images is not None:
            _require(self.num_images > 0, f"{key}.num_images", "must be > 0 or null")
        for name in ("rtol", "atol"):
            value = getattr(self, name)
            _require(0.0 < value < 1.0, f"{key}.{name}",
                     f"must lie in (0, 1), got {value} (Song et al.: 1e-5)")
        _require(self.repeats > 0, f"{key}.repeats", "must be > 0")
        _require(self.batch_size > 0, f"{key}.batch_size", "must be > 0")
        _require(self.seed >= 0, f"{key}.seed", "must be >= 0")


@dataclass(frozen=True)
class GammaConfig:
    """gamma stage: Γ_t = E‖ε̂(x_t, t)‖²/d of the analytic σ² (Analytic-DPM), by Monte Carlo on
    the first num_images training images, one noise draw per image and step."""

    num_images: int = 256
    batch_size: int = 512
    use_ema: bool = True
    seed: int = 0

    def validate(self, key: str) -> None:
        _require(self.num_images > 0, f"{key}.num_images", "must be > 0")
        _require(self.batch_size > 0, f"{key}.batch_size", "must be > 0")
        _require(self.seed >= 0, f"{key}.seed", "must be >= 0")


@dataclass(frozen=True)
class FidConfig:
    """fid stage: torch-fidelity against the training split."""

    # auto: Inception-v3 for natural images, the digits classifier for the digits data set.
    features: Literal["auto", "inception", "digits_classifier"] = "auto"
    inception_weights: str | None = None  # local path to torch-fidelity's Inception weights
    kid_subset_size: int = 100
    classifier_epochs: int = 30
    classifier_seed: int = 0

    def validate(self, key: str) -> None:
        _require(self.kid_subset_size > 1, f"{key}.kid_subset_size", "must be > 1")
        _require(self.classifier_epochs > 0, f"{key}.classifier_epochs", "must be > 0")
        _require(self.classifier_seed >= 0, f"{key}.classifier_seed", "must be >= 0")


@dataclass(frozen=True)
class MlflowConfig:
    """Where runs go; MLFLOW_TRACKING_URI overrides `tracking_uri`."""

    experiment: str = "ddpm"
    tracking_uri: str | None = None  # None: sqlite:///<DVC_ROOT or repo root>/mlflow.db

    def validate(self, key: str) -> None:
        if self.tracking_uri is not None:
            check_tracking_uri(self.tracking_uri, f"{key}.tracking_uri")


def check_tracking_uri(uri: str, key: str) -> None:
    """A ConfigError naming `key` unless `uri` is a tracking URI MLflow can open: a tracking
    server, a SQLAlchemy database, Databricks or a file store."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(uri)
    except ValueError:
        parts = urlsplit("")
    scheme = parts.scheme.split("+")[0]  # postgresql+psycopg2://: a database driver
    ok = (uri in ("databricks", "databricks-uc", "uc") or scheme in ("databricks", "uc") or
          (scheme in ("http", "https") and bool(parts.hostname)) or
          (scheme == "sqlite" and uri.startswith("sqlite:///") and len(uri) > len("sqlite:///")) or
          (scheme in ("postgresql", "mysql", "mssql") and bool(parts.netloc)) or
          (scheme == "file" and bool(parts.path)))
    _require(ok, key, f"{uri!r} is not a tracking URI; give http://<host>:<port> (an mlflow "
             "server), sqlite:///<path>/mlflow.db, or a postgresql://, mysql:// or mssql:// "
             "database URL (unset it for sqlite:///<repo root>/mlflow.db)")


def _default_variants() -> dict[str, VariantConfig]:
    return {"simple": VariantConfig(name="simple", loss="simple"),
            "vlb": VariantConfig(name="vlb", loss="vlb")}


@dataclass(frozen=True)
class Params:
    """The whole params.yaml."""

    schedule: Schedule = "linear"  # modes.SCHEDULE_KINDS; formulas, 1000/T scaling: schedules.py
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    # name -> variant; each gets its own DVC stages (train@name, sample@name, bpd@name, fid@name)
    variants: dict[str, VariantConfig] = field(default_factory=_default_variants)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    bpd: BpdConfig = field(default_factory=BpdConfig)
    nll: NllConfig = field(default_factory=NllConfig)
    gamma: GammaConfig = field(default_factory=GammaConfig)
    fid: FidConfig = field(default_factory=FidConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)

    def __post_init__(self) -> None:
        # The effective training settings, resolved once here (see TrainConfig.hflip).
        if self.train.hflip == "auto":
            object.__setattr__(self, "train", dataclasses.replace(
                self.train, hflip=self.data.dataset != "digits"))

    def validate(self, key: str) -> None:
        _require(bool(self.variants), f"{key}variants",
                 "give at least one variant (a model to train, or one with `pretrained: path`)")
        # FID/KID compare sample sets: KID draws subsets of kid_subset_size from each
        need = max(2, self.fid.kid_subset_size)
        _require(self.sample.num_samples >= need, f"{key}sample.num_samples",
                 f"must be >= {need} (FID needs 2 images, KID subsets of fid.kid_subset_size="
                 f"{self.fid.kid_subset_size}); raise it or lower fid.kid_subset_size")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _union_name(args: tuple) -> str:
    """'true or false or 'auto'' for bool | Literal['auto'], and so on."""
    names = []
    for a in args:
        if a is type(None):
            names.append("null")
        elif a is bool:
            names.append("true or false")
        elif typing.get_origin(a) is Literal:
            names += [repr(x) for x in typing.get_args(a)]
        else:
            names.append(_type_name(a))
    return " or ".join(names)


def _int_hint(value: Any) -> str:
    """What to write for a whole number YAML did not read as an integer (YAML 1.1 reads 1e9 as
    text and 1.0e+9 as a float)."""
    if isinstance(value, bool) or not isinstance(value, (str, float)):
        return ""
    try:
        f = float(value)
    except ValueError:
        return ""
    if not math.isfinite(f) or f != int(f):
        return ""
    return f" (YAML reads {value} as {'text' if isinstance(value, str) else 'a float'}: " \
           f"write {int(f)})"


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting lists to tuples and dicts to
    dataclasses; raise ConfigError naming `key` on a mismatch."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else
                          f"{key}: expected {_union_name(args)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{key}: {value!r} is not one of {list(allowed)}{hint}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp, _ellipsis) = typing.get_args(tp)
        return tuple(_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            hint = (" (variants is a mapping name -> settings, e.g. `simple: {loss: simple}`)"
                    if isinstance(value, list) else "")
            raise ConfigError(f"{key}: expected a mapping, got {value!r}{hint}")
        _key_tp, item_tp = typing.get_args(tp)
        out = {}
        for name, item in value.items():
            if not isinstance(name, str):  # YAML reads `1:` as a number
                raise ConfigError(f"{key}.{name}: a variant name must be a string; quote it "
                                  f"('{name}') or use a word such as 'simple'")
            out[name] = _build(item_tp, item, f"{key}.{name}", from_key=name)
        return out
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}{_int_hint(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"config annotation {tp!r} at {key} is not supported")  # a bug, not input


def _build(cls: type, raw: Any, key: str, from_key: str | None = None) -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys by name; a field marked
    `from_key` (a variant's name) takes the mapping key `from_key` instead of a value."""
    where = key or "params.yaml"
    if raw is None and not key:  # an empty params.yaml: every default
        raw = {}
    if raw is None:
        raise ConfigError(f"{where}: is empty (null); give its settings or delete the key to "
                          "use the defaults")
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    keyed = [f.name for f in dataclasses.fields(cls) if f.metadata.get("from_key")]
    fields = {f.name for f in dataclasses.fields(cls)} - set(keyed)
    prefix = f"{key}." if key else ""
    for name in raw:
        if name not in fields:
            close = difflib.get_close_matches(str(name), sorted(fields), n=1)
            hint = (f"did you mean '{prefix}{close[0]}'?" if close else
                    f"delete it or use one of {where}'s keys: {', '.join(sorted(fields))}")
            raise ConfigError(f"{prefix}{name}: unknown key; {hint}")
    kwargs = {name: _convert(value, hints[name], f"{prefix}{name}") for name, value in raw.items()}
    if from_key is not None:
        kwargs.update({name: from_key for name in keyed})
    missing = [f.name for f in dataclasses.fields(cls)
               if f.name not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{prefix}{missing[0]}: required key is missing")
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate(key)
    return obj


def params_from_dict(raw: Any) -> Params:
    """Validate a parsed params.yaml mapping and build the configuration tree."""
    return _build(Params, raw, "")


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


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; every problem is a one-line ConfigError."""
    return params_from_dict(read_yaml(path, "file", "run from the repository root or pass "
                                      "the path"))


def to_dict(obj: Any) -> dict:
    """A dataclass tree as plain dicts/lists, as params.yaml writes it (for logging); a
    variant's name is its key, not a field."""
    def strip(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items()}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x

    d = strip(dataclasses.asdict(obj))
    if isinstance(obj, Params):
        for v in d["variants"].values():
            v.pop("name", None)
    return d
