"""params.yaml: the pipeline's whole configuration tree, frozen pydantic dataclasses.

The library's sections (data, train) and the validation with one-line errors are
ddpm_core.config's; the sections here are read by the stages only. Torch-free: a bad params.yaml
fails before any stage pays for `import torch`. Defaults are the paper's (Ho et al. 2020,
Appendix B and the official code) unless a comment says why not; the shipped `params.yaml`
overrides a few of them so that the default pipeline runs on the 8x8 digits data set on two
CPU cores.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import StrictBool, StrictFloat, StrictInt, StrictStr, field_validator, model_validator

from ddpm_core import modes
from ddpm_core.config import (
    ConfigError,
    DataConfig,
    Fraction,
    Invalid,
    NonNegative,
    Positive,
    PositiveOrNull,
    TrainConfig,
    check,
    read_yaml,
    settings,
    validate,
)
from ddpm_core.last_sigma import DEFAULT_LAST_SIGMA_CAP_Y

# The σ² choices of the samplers and the bound over every variant: the fixed ones,
# Analytic-DPM's (Γ from the gamma stage) and Bao et al. 2022b's NPR and SN (the heads of the
# nnhead stage); a learned σ² is a learned variant's own.
VARIANCES: tuple[modes.Sigma2, ...] = (*modes.FIXED_VAR_TYPES, "analytic", *modes.HEAD_KINDS)
Variances = Annotated[tuple[modes.Sigma2, ...], check(
    lambda vs: set(vs) <= set(VARIANCES),
    lambda vs: f"{next(v for v in vs if v not in VARIANCES)!r} is not a σ² choice; use "
               f"{', '.join(VARIANCES[:-1])} or {VARIANCES[-1]}")]


def head_kinds_in(variances: tuple[str, ...]) -> list[str]:
    """The σ² of `variances` that need the variance heads (npr, sn), in the order given."""
    return [v for v in variances if v in modes.HEAD_KINDS]


def _eager_for_heads(section: str, variances: tuple[str, ...], compile_: bool) -> None:
    """The heads run on the U-Net's eager feature map (ddpm_core.heads refuses a compiled
    network): compile and npr/sn do not go together."""
    if compile_ and (kinds := head_kinds_in(variances)):
        raise Invalid(f"{' and '.join(kinds)} in {section}.variances need the eager network (the "
                      "variance heads read the U-Net's last feature map; a compiled one is "
                      f"refused): set {section}.compile: false or drop {', '.join(kinds)}",
                      "compile")


@settings
class ModelConfig:
    """The U-Net: a preset from ddpm_core.unet.PRESETS, with optional overrides."""

    preset: modes.Preset = "digits"
    base_channels: PositiveOrNull = None
    channel_mult: Annotated[tuple[StrictInt, ...] | None, check(
        lambda v: v is None or (len(v) > 0 and min(v) > 0),
        "must be a non-empty list of positive ints")] = None
    num_res_blocks: PositiveOrNull = None
    attn_resolutions: Annotated[tuple[StrictInt, ...] | None, check(
        lambda v: v is None or all(r > 0 for r in v),
        "must be feature-map sizes (positive ints, e.g. [16]) or []")] = None
    dropout: Fraction | None = None


@settings
class DiffusionConfig:
    """The forward process; the schedule kind is the top-level `schedule` key."""

    timesteps: Annotated[StrictInt, check(lambda v: v >= 2, "must be >= 2")] = 1000


# A variant's name is its key in the `variants` mapping: it names the DVC stages (train@<name>,
# sample@<name>, ...) and every file of the variant, so it must be a plain file-name word.
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


@settings
class VariantConfig:
    """One model: a row of DDPM Table 2 (or improved DDPM's hybrid objective) that the train
    stage trains, or, with `pretrained`, existing weights that the train stage imports."""

    mean_type: modes.MeanType = "eps"
    var_type: modes.VarType = "fixed_large"
    loss: modes.LossType = "simple"
    t_sampling: modes.TSampling = "uniform"
    # Evaluate existing weights instead of training: one of our model files
    # (models/<name>.pt), a training checkpoint (checkpoints/.../ckpt_*.pt), or with
    # format: diffusers a diffusers DDPM folder (config.json + weights).
    pretrained: StrictStr | None = None
    format: modes.ModelFormat = "ours"
    name: str = field(default="", init=False)  # its key in `variants` (set by Params)

    @model_validator(mode="after")
    def _trainable(self) -> VariantConfig:
        learned = self.var_type in modes.LEARNED_VAR_TYPES
        if learned and self.pretrained is None and self.loss == "simple":
            raise Invalid("a learned variance needs loss 'vlb' or 'hybrid' (L_simple does not "
                          "train it)", "loss")
        if self.loss == "hybrid" and not learned and self.pretrained is None:  # losses.Loss
            raise Invalid("loss 'hybrid' trains a learned variance; use var_type learned or "
                          "learned_range (or loss simple or vlb with var_type "
                          f"{self.var_type})", "var_type")
        if self.t_sampling == "importance" and self.loss != "vlb":
            raise Invalid("importance sampling of t is defined for loss 'vlb' only", "t_sampling")
        return self


@settings
class SampleConfig:
    """sample stage: which samplers run on every trained variant, and how many images."""

    num_samples: Positive = 50_000
    batch_size: Positive = 256
    use_ema: StrictBool = True
    clip_x0: StrictBool = True
    # Ancestral sampling (all T steps, and respaced at every S of steps) with each σ² choice:
    # fixed_large | fixed_small | analytic (Analytic-DPM: Γ from the gamma stage; analytic also
    # adds Analytic-DDIM, DDIM with the σ̂² noise, at every S of steps).
    variances: Variances = ("fixed_large", "fixed_small")
    # Respaced ancestral (each σ² above) and DDIM at these step counts, for FID vs steps.
    steps: Annotated[tuple[StrictInt, ...], check(
        lambda s: all(k > 0 for k in s), "must be positive step counts")] = (10, 20, 50, 100)
    # trailing: every chain starts at step T (Lin et al. 2024); the DDIM paper's conventions
    # (leading, ddim_quadratic) start earlier and stay available for comparing with its table.
    spacing: modes.Spacing = modes.DEFAULT_SPACING
    ddim_eta: Annotated[StrictFloat, check(lambda v: 0 <= v <= 1, "must be in [0, 1]")] = 0.0
    # σ of the step to x_{τ_1} (respaced chains of K < T steps and DDIM) at most 2y/255·√(π/2),
    # y pixel levels: Bao et al.'s code (clip_sigma_idx 1; y = 2 for CIFAR-10 LS, else 1). DDPM
    # and DDIM's papers have no cap: null. The full T-step chain is never capped.
    last_sigma_cap_y: Annotated[StrictFloat | None, check(
        lambda v: v is None or v > 0, "must be > 0 (pixel levels) or null (no cap)")] = \
        DEFAULT_LAST_SIGMA_CAP_Y
    # The heads' σ² (npr, sn in `variances`: Bao et al. 2022b): respaced ancestral and
    # NPR-/SN-DDIM at these step counts only, no full chain (S = T is the full chain); null: like
    # the other σ², the full chain and every S of `steps`.
    head_steps: Annotated[tuple[StrictInt, ...] | None, check(
        lambda s: s is None or all(k > 0 for k in s), "must be positive step counts or null")] \
        = None
    seed: NonNegative = 0
    grid_size: Positive = 64
    # The network call (ddpm_core.inference): bf16 autocast, torch.compile (CUDA graphs on a
    # GPU), and nproc processes on each of nnodes machines under torchrun, each process taking
    # its share of the images.
    precision: modes.Precision = "fp32"
    compile: StrictBool = False
    nproc: Positive = 1
    nnodes: Positive = 1  # > 1: a rendezvous endpoint (rendezvous below)
    # rows of every network call (api.FixedRows): BLAS and cuDNN pick kernels by shape, so a
    # fixed call size keeps each image's numbers independent of batch_size; a divisor of the
    # rows of a batch (batch_size, x t_batch for the bound) wastes no padding
    net_batch: Positive = modes.NET_BATCH

    @model_validator(mode="after")
    def _heads(self) -> SampleConfig:
        _eager_for_heads("sample", self.variances, self.compile)
        return self


@settings
class BpdConfig:
    """bpd stage: the full variational bound on the test split."""

    num_images: PositiveOrNull = None  # None: the whole test split
    batch_size: Positive = 64
    t_batch: Positive = 8  # timesteps evaluated per network call (x batch_size images)
    # fixed_large | fixed_small | analytic (Analytic-DPM: needs the gamma stage's Γ) | npr | sn
    # (Bao et al. 2022b: the heads of the nnhead stage)
    variances: Variances = ("fixed_large", "fixed_small")
    # K-step chains (even trajectory) besides the full chain T; K = T is always evaluated. The
    # even trajectory keeps steps 1 and T (likelihood.even_trajectory): a chain of one step has
    # no decoder step below its prior, so K = 1 is no bound of that family.
    steps: Annotated[tuple[StrictInt, ...], check(
        lambda s: all(k >= 2 for k in s),
        "K = 1 is no chain (the even trajectory keeps steps 1 and T); give K >= 2")] = ()
    use_ema: StrictBool = True
    seed: NonNegative = 0  # seed of the bound's Monte Carlo draws: test image i's noise comes
    # from (seed, i, t)
    # the network call and its rows: as in SampleConfig
    precision: modes.Precision = "fp32"
    compile: StrictBool = False
    nproc: Positive = 1
    nnodes: Positive = 1
    net_batch: Positive = modes.NET_BATCH

    @model_validator(mode="after")
    def _heads(self) -> BpdConfig:
        _eager_for_heads("bpd", self.variances, self.compile)
        return self


@settings
class NnheadConfig:
    """nnhead stage: Bao et al. 2022b's NPR and SN variance heads (ddpm_core.api.train_heads),
    trained together on the variant's frozen ε-network, for σ² npr and sn."""

    # 0: no heads are trained (npr and sn then cannot be asked for). Bao et al.'s own count is
    # not transcribed here (the paper could not be read); params.yaml sizes it for the digits.
    steps: NonNegative = 0
    lr: Annotated[StrictFloat, check(lambda v: v > 0, "must be > 0")] = 1e-4  # their code's
    batch_size: Positive = 128
    seed: NonNegative = 0  # training step s draws its images, t and noise from (seed, s)
    use_ema: StrictBool = True  # the heads sit on the weights the evaluations use (EMA)


Tolerance = Annotated[StrictFloat, check(
    lambda v: 0 < v < 1, lambda v: f"must lie in (0, 1), got {v} (Song et al.: 1e-5)")]


@settings
class NllConfig:
    """nll stage: the exact bits/dim by the probability-flow ODE (Song et al. 2021, Hutchinson
    divergence) on the first num_images test images, for each dequantization."""

    num_images: PositiveOrNull = None  # None: the whole test split
    rtol: Tolerance = 1e-5  # RK45 tolerances (Song et al. 2021, App. D.2)
    atol: Tolerance = 1e-5
    repeats: Positive = 1  # independent Hutchinson probes per image
    # images sharing one solve share its steps: a number depends on the batch within the
    # tolerance; 1 makes each image's number depend on (seed, index) only
    batch_size: Positive = 1
    seed: NonNegative = 0  # dequantization noise and probes of image i come from (seed, i)
    use_ema: StrictBool = True
    # uniform: Song et al.'s x = 2(k + u)/256 − 1; variational: through the chain's first step
    # and its decoder, a bound on the discrete likelihood like the DDPM bound (ode.py)
    dequantization: Annotated[tuple[modes.Dequantization, ...], check(
        lambda ds: len(ds) > 0 and len(set(ds)) == len(ds),
        "must name uniform and/or variational, each once")] = ("uniform", "variational")


@settings
class GammaConfig:
    """gamma stage: Γ_t = E‖ε̂(x_t, t)‖²/d of the analytic σ² (Analytic-DPM), by Monte Carlo on
    the first num_images training images, one noise draw per image and step."""

    num_images: Positive = 256
    batch_size: Positive = 512
    use_ema: StrictBool = True
    seed: NonNegative = 0


@settings
class FidConfig:
    """fid stage: torch-fidelity against the training split."""

    # auto: Inception-v3 for natural images, the digits classifier for the digits data set.
    features: modes.FeatureChoice = "auto"
    inception_weights: StrictStr | None = None  # local path to torch-fidelity's Inception weights
    kid_subset_size: Annotated[StrictInt, check(lambda v: v > 1, "must be > 1")] = 100
    classifier_epochs: Positive = 30
    classifier_seed: NonNegative = 0


_URI_FIX = ("is not a tracking URI; give http://<host>:<port> (an mlflow server), "
            "sqlite:///<path>/mlflow.db, or a postgresql://, mysql:// or mssql:// database URL "
            "(unset it for sqlite:///<repo root>/mlflow.db)")


def is_tracking_uri(uri: str) -> bool:
    """Whether MLflow can open `uri`: a tracking server, a SQLAlchemy database, Databricks or a
    file store."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        parts = urlsplit("")
    scheme = parts.scheme.split("+")[0]  # postgresql+psycopg2://: a database driver
    return (uri in ("databricks", "databricks-uc", "uc") or scheme in ("databricks", "uc") or
            (scheme in ("http", "https") and bool(parts.hostname)) or
            (scheme == "sqlite" and uri.startswith("sqlite:///") and len(uri) > len("sqlite:///"))
            or (scheme in ("postgresql", "mysql", "mssql") and bool(parts.netloc)) or
            (scheme == "file" and bool(parts.path)))


def check_tracking_uri(uri: str, key: str) -> None:
    """A ConfigError naming `key` unless `uri` is a tracking URI MLflow can open."""
    if not is_tracking_uri(uri):
        raise ConfigError(f"{key}: {uri!r} {_URI_FIX}")


# A multi-node stage (train, sample or bpd with nnodes > 1) meets through torchrun's c10d
# rendezvous. Its endpoint is the job's, not the experiment's (the first node of this
# allocation), so it comes from the environment only, the way torchrun takes --rdzv-endpoint
# and --rdzv-id: params.yaml stays the same on every cluster and job.
RDZV_ENDPOINT_ENV, RDZV_ID_ENV = "DDPM_RDZV_ENDPOINT", "DDPM_RDZV_ID"


@dataclasses.dataclass(frozen=True)
class Rendezvous:
    """Where the torchrun agents of a multi-node stage meet: host:port of one node, a job id."""

    nnodes: int
    endpoint: str
    run_id: str


def rendezvous(key: str, nnodes: int, environ: Mapping[str, str]) -> Rendezvous | None:
    """None for one machine; else DDPM_RDZV_ENDPOINT (host:port) and the id DDPM_RDZV_ID, else
    SLURM_JOB_ID, else 'ddpm'. A missing or malformed endpoint is a ConfigError naming `key`."""
    if nnodes == 1:
        return None
    endpoint = environ.get(RDZV_ENDPOINT_ENV, "").strip()
    if not endpoint:
        raise ConfigError(f"{key}: {nnodes} machines meet at a rendezvous endpoint; export "
                          f"{RDZV_ENDPOINT_ENV}=<first node's host>:<free port> on every node "
                          "(README, Running on a cluster), or set it to 1")
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{key}: {RDZV_ENDPOINT_ENV}={endpoint!r} is not host:port; give the "
                          "first node's host name and a free port, e.g. node001:29500")
    run_id = environ.get(RDZV_ID_ENV) or environ.get("SLURM_JOB_ID") or "ddpm"
    return Rendezvous(nnodes, endpoint, run_id)


@settings
class MlflowConfig:
    """Where runs go; MLFLOW_TRACKING_URI overrides `tracking_uri`."""

    experiment: StrictStr = "ddpm"
    # None: sqlite:///<DVC_ROOT or repo root>/mlflow.db
    tracking_uri: Annotated[StrictStr | None, check(
        lambda u: u is None or is_tracking_uri(u), lambda u: f"{u!r} {_URI_FIX}")] = None


@settings
class Params:
    """The whole params.yaml."""

    schedule: modes.ScheduleKind = "linear"  # formulas and the 1000/T scaling: schedules.py
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    # name -> variant; each gets its own DVC stages (train@name, sample@name, bpd@name, fid@name)
    variants: dict[str, VariantConfig] = field(default_factory=lambda: {
        "simple": VariantConfig(loss="simple"), "vlb": VariantConfig(loss="vlb")})
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    bpd: BpdConfig = field(default_factory=BpdConfig)
    nnhead: NnheadConfig = field(default_factory=NnheadConfig)
    nll: NllConfig = field(default_factory=NllConfig)
    gamma: GammaConfig = field(default_factory=GammaConfig)
    fid: FidConfig = field(default_factory=FidConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)

    @field_validator("variants", mode="before")
    @classmethod
    def _names(cls, raw: Any) -> Any:
        if isinstance(raw, list):
            raise Invalid(f"expected a mapping, got {raw!r} (variants is a mapping name -> "
                          "settings, e.g. `simple: {loss: simple}`)")
        for name in raw if isinstance(raw, Mapping) else ():
            if not isinstance(name, str):  # YAML reads `1:` as a number
                raise Invalid(f"a variant name must be a string; quote it ('{name}') or use a "
                              "word such as 'simple'", str(name))
            if not name or not set(name) <= _NAME_CHARS:
                raise Invalid("a variant name must be letters, digits, '-' or '_' (it names "
                              "the DVC stages and files)", name)
        return raw

    @model_validator(mode="after")
    def _whole(self) -> Params:
        if not self.variants:
            raise Invalid("give at least one variant (a model to train, or one with "
                          "`pretrained: path`)", "variants")
        # FID/KID compare sample sets: KID draws subsets of kid_subset_size from each
        need = max(2, self.fid.kid_subset_size)
        if self.sample.num_samples < need:
            raise Invalid(f"must be >= {need} (FID needs 2 images, KID subsets of "
                          f"fid.kid_subset_size={self.fid.kid_subset_size}); raise it or lower "
                          "fid.kid_subset_size", "sample.num_samples")
        T = self.diffusion.timesteps  # the samplers and the bound take chains of its T steps
        for key, steps in (("sample.steps", self.sample.steps), ("bpd.steps", self.bpd.steps)):
            if too_long := [S for S in steps if S > T]:
                raise Invalid(f"{too_long[0]} exceeds diffusion.timesteps={T}", key)
        for key, variances in (("sample.variances", self.sample.variances),
                               ("bpd.variances", self.bpd.variances)):
            if self.nnhead.steps == 0 and (kinds := head_kinds_in(variances)):
                raise Invalid(f"{' and '.join(kinds)} need the variance heads of the nnhead "
                              "stage, but nnhead.steps is 0 (no heads are trained): set "
                              f"nnhead.steps > 0 or drop {', '.join(kinds)}", key)
        if too_long := [S for S in self.sample.head_steps or () if S > T]:
            raise Invalid(f"{too_long[0]} exceeds diffusion.timesteps={T}", "sample.head_steps")
        for name, v in self.variants.items():
            object.__setattr__(v, "name", name)
        # The effective training settings, resolved once here (see TrainConfig.hflip).
        if self.train.hflip == "auto":
            object.__setattr__(self, "train", dataclasses.replace(
                self.train, hflip=self.data.dataset != "digits"))
        return self


def params_from_dict(raw: Any) -> Params:
    """Validate a parsed params.yaml mapping and build the configuration tree."""
    return validate(Params, raw)


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; every problem is a one-line ConfigError."""
    return params_from_dict(read_yaml(path, "file", "run from the repository root or pass "
                                      "the path"))


def to_dict(params: Params) -> dict:
    """The tree as plain dicts, as params.yaml writes it (for logging); a variant's name is its
    key, not a field."""
    d = dataclasses.asdict(params)
    for v in d["variants"].values():
        del v["name"]
    return d
