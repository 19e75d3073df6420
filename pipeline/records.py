"""The contract between the stages: which files a variant's stages write, what a sampler is, how
every metric is named, and the one loader that `report` and `track` read the results with.

The layout is VariantPaths' (one line per file, with the stage that writes it; <v> is a
variant name, the key in params.yaml's `variants`) and the *_DIR / FEATURES_* paths. Metric
files nest their numbers under the variant name, so `dvc exp show` names a column
`simple.bpd_sigma2_beta` (unique, no file prefix).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ddpm_core.last_sigma import last_sigma_cap, last_sigma_cap_of
from ddpm_core.modes import (
    HEAD_KINDS,
    LEARNED_VAR_TYPES,
    SIGMA2_MODES,
    Dequantization,
    Sigma2,
    Spacing,
    SpecKind,
)
from pipeline.params import Params, SampleConfig

DATA_DIR = Path("data/prepared")
FEATURES_DIR = Path("features")  # features: reference statistics (+ digits classifier)
REFERENCE_FILE = FEATURES_DIR / "reference.npz"
CLASSIFIER_FILE = FEATURES_DIR / "classifier.pt"
FEATURES_INFO = FEATURES_DIR / "info.json"
FEATURES_METRICS = Path("metrics/features.json")  # {floor_fid, classifier_test_accuracy}
FEATURES_TIMINGS = Path("timings/features.json")
REPORTS_DIR = Path("reports")
CKPT_DIR = Path("checkpoints")  # training state: NOT a DVC output (see README, Resuming)


@dataclass(frozen=True)
class SamplerSpec:
    """One sample set: `ancestral` (all T steps of Algorithm 2), `respaced` (ancestral on S
    respaced steps, improved DDPM Sec. 4) or `ddim` (η = eta on S steps; variance "analytic":
    Bao et al.'s Analytic-DDIM, DDIM with the σ̂² noise; "npr" / "sn": NPR- / SN-DDIM, DDIM with
    the heads' noise, Bao et al. 2022b)."""

    kind: SpecKind
    steps: int
    variance: Sigma2 | None = None  # σ² (ancestral, respaced); DDIM: None, analytic, npr, sn
    spacing: Spacing | None = None  # timestep spacing of respaced / DDIM; None: all T steps
    eta: float | None = None  # DDIM only
    # y of the cap 2y/255·√(π/2) on σ of the step to x_{τ_1} (last_sigma.last_sigma_cap); None:
    # no cap (the full chains)
    last_sigma_cap_y: float | None = None

    @property
    def name(self) -> str:
        """File and metric name: ancestral_beta, respaced_beta_S10, ddim_S10,
        ddim_analytic_S10, ddim_npr_S10."""
        short = None if self.variance is None else SIGMA2_MODES[self.variance].short
        if self.kind == "ancestral":
            return f"ancestral_{short}"
        if self.kind == "respaced":
            return f"respaced_{short}_S{self.steps}"
        eta = "" if not self.eta else f"_eta{self.eta:g}"
        what = "ddim" if short is None else f"ddim_{short}"
        return f"{what}{eta}_S{self.steps}"

    @property
    def sigma2(self) -> str | None:
        """The σ²'s metric-key stem (sigma2_beta, ...; MLflow's `sigma2` param), None: DDIM."""
        return None if self.variance is None else SIGMA2_MODES[self.variance].key

    @property
    def last_sigma_cap(self) -> float | None:
        """The cap on σ of the step to x_{τ_1} (None: none)."""
        return None if self.last_sigma_cap_y is None else last_sigma_cap(self.last_sigma_cap_y)

    def label(self) -> str:
        """Human name, e.g. 'ancestral σ² = β, 100 steps'."""
        if self.kind == "ddim":
            return f"{ddim_title(self.variance, self.eta)}, {self.steps} steps"
        what = "ancestral" if self.kind == "ancestral" else "respaced ancestral"
        return f"{what} {SIGMA2_MODES[self.variance].label}, {self.steps} steps"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self), "sigma2": self.sigma2,
                "last_sigma_cap": self.last_sigma_cap}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SamplerSpec:
        return cls(**{f.name: d.get(f.name) for f in dataclasses.fields(cls)})


# the DDIM sampler of each σ² DDIM takes: plain DDIM (None), Analytic-DDIM (Bao et al. 2022)
# and NPR- / SN-DDIM (Bao et al. 2022b), the last three with their σ² noise even at η = 0
DDIM_NAMES: dict[Sigma2 | None, str] = {None: "DDIM", "analytic": "Analytic-DDIM",
                                        "npr": "NPR-DDIM", "sn": "SN-DDIM"}


def ddim_title(variance: Sigma2 | None, eta: float | None) -> str:
    """'DDIM η = 0', 'Analytic-DDIM η = 0', 'NPR-DDIM η = 0' or 'SN-DDIM η = 0'."""
    return f"{DDIM_NAMES[variance]} η = {eta or 0.0:g}"


def sampler_specs(s: SampleConfig, T: int, var_type: Sigma2,
                  heads: bool = True) -> list[SamplerSpec]:
    """What sample@<v> draws for a model whose own σ² is `var_type`: the full chain with each
    σ² of sample.variances (a learned σ² instead: its own), then at every S of sample.steps
    respaced ancestral with each of those σ², DDIM and, when σ² analytic is among them,
    Analytic-DDIM. The heads' σ² (npr, sn; left out when `heads` is False: a model without
    heads) are drawn at every S of sample.head_steps only (None: as the others), respaced and
    as NPR-/SN-DDIM. Respaced chains of S < T steps and DDIM cap σ of the step to x_{τ_1} with
    y = sample.last_sigma_cap_y; the full chains (S = T too) are uncapped."""
    variances = [var_type] if var_type in LEARNED_VAR_TYPES else [
        v for v in s.variances if heads or v not in HEAD_KINDS]
    plain = [v for v in variances if v not in HEAD_KINDS]
    kinds = [v for v in variances if v in HEAD_KINDS]
    # (S, the σ² drawn at S, plain DDIM too)
    by_steps = [(S, plain + (kinds if s.head_steps is None else []), True) for S in s.steps]
    if s.head_steps is not None:
        by_steps += [(S, kinds, False) for S in s.head_steps]
    y = s.last_sigma_cap_y
    specs = [SamplerSpec("ancestral", T, v) for v in
             (variances if s.head_steps is None else plain)]
    for S, vs, ddim in by_steps:
        y_anc = None if last_sigma_cap_of(T, S, False, y) is None else y  # S = T: the full chain
        specs += [SamplerSpec("respaced", S, v, s.spacing, None, y_anc) for v in vs]
        if ddim:
            specs.append(SamplerSpec("ddim", S, None, s.spacing, s.ddim_eta, y))
        specs += [SamplerSpec("ddim", S, v, s.spacing, s.ddim_eta, y) for v in vs
                  if v in DDIM_NAMES]
    return list({spec.name: spec for spec in specs}.values())


def fid_key(spec: SamplerSpec) -> str:
    """Metric key of a sample set's FID: fid_<sampler>."""
    return f"fid_{spec.name}"


def bpd_key(var_type: Sigma2, K: int | None = None) -> str:
    """Metric key of a bound: bpd_<sigma2> (all T terms) or bpd_<sigma2>_K<K> (K steps)."""
    return f"bpd_{SIGMA2_MODES[var_type].key}" + ("" if K is None else f"_K{K}")


@dataclass(frozen=True)
class NllKeys:
    """nll@<v>'s metric keys for one dequantization: the probability-flow ODE's bits/dim (mean
    over the images), its standard error over the images and the solver's mean evaluation
    count per image; and the report's likelihood-table column of that bits/dim."""

    bpd: str
    se: str
    nfe: str
    column: str

    def __iter__(self) -> Iterator[str]:
        """The three metric keys, so that `bpd, se, nfe = NLL_KEYS[deq]`."""
        return iter((self.bpd, self.se, self.nfe))


NLL_KEYS: dict[Dequantization, NllKeys] = {
    "uniform": NllKeys("nll_ode_bpd", "nll_ode_bpd_se", "nll_nfe_mean", "ODE bits/dim"),
    "variational": NllKeys("nll_ode_vardeq_bpd", "nll_ode_vardeq_bpd_se", "nll_vardeq_nfe_mean",
                           "ODE, variational deq."),
}

FINAL_LOSS = "final_loss"
# the stages that write timings/<stage>/<v>.json
TIMED_STAGES = ("train", "nnhead", "sample", "bpd", "nll", "fid")
FLOOR_FID = "floor_fid"


class _VariantFile:
    """A VariantPaths attribute: <folder>/<variant name><suffix>."""

    def __init__(self, folder: str, suffix: str = "") -> None:
        self.folder = folder
        self.suffix = suffix

    def __get__(self, paths: VariantPaths, owner: type | None = None) -> Path:
        return Path(self.folder) / f"{paths.name}{self.suffix}"


@dataclass(frozen=True)
class VariantPaths:
    """Every file of one variant's stages, with the stage that writes it."""

    name: str

    model = _VariantFile("models", ".pt")  # train: network + diffusion spec, raw and EMA weights
    loss_csv = _VariantFile("plots/loss", ".csv")  # train: step,loss,grad_norm,lr (grows)
    train_metrics = _VariantFile("metrics/train", ".json")  # train: {<v>: {final_loss}}
    gamma = _VariantFile("gamma", ".json")  # gamma: Γ of the analytic σ² (null: learned σ²)
    heads_dir = _VariantFile("heads")  # nnhead: heads.pt (the heads file) and info.json
    samples = _VariantFile("samples")  # sample: <sampler>.npy uint8 [N, H, W, C], index.json
    grids = _VariantFile("grids")  # sample: <sampler>.png image plots (`dvc plots show/diff`)
    bpd_terms = _VariantFile("bpd", ".csv")  # bpd: per-term bits/dim, one column per σ²
    bpd_steps = _VariantFile("plots/bpd_steps", ".csv")  # bpd: K,<sigma2>...: bits/dim vs K
    bpd_metrics = _VariantFile("metrics/bpd", ".json")  # bpd: {<v>: {bpd_<sigma2>[_K<k>]}}
    nll_metrics = _VariantFile("metrics/nll", ".json")  # nll: {<v>: {nll_ode_bpd[_se], ...}}
    fid_details = _VariantFile("fid", ".json")  # fid: FID/KID/IS per sampler
    fid_metrics = _VariantFile("metrics/fid", ".json")  # fid: {<v>: {fid_<sampler>}}
    fid_steps = _VariantFile("plots/fid_steps", ".csv")  # fid: steps,ddim,...: FID vs S

    @property
    def heads(self) -> Path:  # nnhead: the NPR and SN heads (ddpm_core.headfile); absent: none
        return self.heads_dir / "heads.pt"

    @property
    def heads_info(self) -> Path:  # nnhead: {heads: file name or null, skipped: why, settings}
        return self.heads_dir / "info.json"

    @property
    def sample_index(self) -> Path:  # sample: the SamplerSpecs of samples/<v>/
        return self.samples / "index.json"

    def timings(self, stage: str) -> Path:  # each stage: seconds, images/s (not metrics)
        return Path("timings") / stage / f"{self.name}.json"

    def outputs(self) -> list[Path]:
        """Every path of the layout above (files and folders), in the order of the class."""
        return [getattr(self, n) for n, a in vars(VariantPaths).items()
                if isinstance(a, (_VariantFile, property))]

    def checkpoints(self) -> Path:
        return CKPT_DIR / self.name


def variant_metrics(name: str, values: dict[str, float | None]) -> dict:
    """The content of a variant's metrics file: {name: {key: value}}."""
    return {name: {k: v for k, v in values.items() if v is not None}}


def read_json(path: Path) -> Any:
    """A JSON file a stage wrote, with a one-line error naming the stage to run."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; run the stage that writes it (dvc repro)")
    return json.loads(path.read_text())


def read_gamma(paths: VariantPaths, T: int) -> Any:
    """Γ [T] float64 tensor from gamma@<v>'s file (None for a learned σ²); one-line error if
    stale."""
    import torch

    d = read_json(paths.gamma)
    if d["gamma"] is None:
        return None
    if d["T"] != T:
        raise FileNotFoundError(f"{paths.gamma}: Γ for T={d['T']}, the model has T={T}; "
                                "rerun gamma@" + paths.name)
    return torch.tensor(d["gamma"], dtype=torch.float64)


@dataclass
class VariantResults:
    """Everything the stages wrote about one variant."""

    name: str
    source: str
    samplers: list[SamplerSpec]
    num_samples: dict[str, int]  # sampler name -> images
    train: dict[str, float]  # final_loss (absent for pretrained weights)
    bpd: dict[str, float]  # bpd_<sigma2>[_K<k>] -> bits/dim
    nll: dict[str, float]  # nll_ode_bpd, nll_ode_bpd_se, nll_nfe_mean ({}: a μ model, no ODE)
    fid: dict[str, float]  # fid_<sampler> -> FID
    fid_details: dict[str, dict[str, float]]  # sampler name -> {fid, kid_mean, kid_std, ...}
    timings: dict[str, dict[str, Any]]  # stage -> {seconds, ...}
    paths: VariantPaths = field(repr=False, default=None)  # type: ignore[assignment]

    def fid_of(self, spec: SamplerSpec) -> float | None:
        return self.fid.get(fid_key(spec))


@dataclass
class FeatureInfo:
    """The feature network and the floor (test split against the training split)."""

    features: str
    label: str  # e.g. "FID (digits classifier)"
    reference_images: int
    floor: dict[str, float]  # {"fid": ...} of the test split (IS too for Inception)
    floor_images: int
    classifier_test_accuracy: float | None
    timings: dict[str, Any] = field(default_factory=dict)  # timings/features.json ({}: none)


@dataclass
class Results:
    features: FeatureInfo
    variants: dict[str, VariantResults]


def _unwrap(path: Path, name: str) -> dict:
    return read_json(path).get(name, {})


def load_variant(name: str) -> VariantResults:
    p = VariantPaths(name)
    index = read_json(p.sample_index)
    specs = [SamplerSpec.from_dict(d) for d in index["samplers"]]
    return VariantResults(
        name=name, source=index.get("source", str(p.model)), samplers=specs,
        num_samples={d["name"]: d["num_samples"] for d in index["samplers"]},
        train=_unwrap(p.train_metrics, name), bpd=_unwrap(p.bpd_metrics, name),
        nll=_unwrap(p.nll_metrics, name),
        fid=_unwrap(p.fid_metrics, name), fid_details=read_json(p.fid_details),
        timings={stage: read_json(p.timings(stage)) for stage in TIMED_STAGES
                 if p.timings(stage).is_file()}, paths=p)


def load_features() -> FeatureInfo:
    info = read_json(FEATURES_INFO)
    return FeatureInfo(features=info["features"], label=info["label"],
                       reference_images=info["reference_images"], floor=info["floor"],
                       floor_images=info["floor_images"],
                       classifier_test_accuracy=info.get("classifier_test_accuracy"),
                       timings=read_json(FEATURES_TIMINGS) if FEATURES_TIMINGS.is_file() else {})


def wall_seconds(timing: dict[str, Any]) -> float | None:
    """A stage's wall time from its timings file: `seconds` (a number, or per sampler a dict of
    numbers, summed), else the sum of its `<part>_seconds` (features); None if it has none."""
    s = timing.get("seconds")
    if isinstance(s, dict):
        return float(sum(s.values()))
    if isinstance(s, (int, float)):
        return float(s)
    parts = [v for k, v in timing.items() if k.endswith("_seconds") and isinstance(v, (int, float))]
    return float(sum(parts)) if parts else None


def load_results(params: Params) -> Results:
    """The results of every variant in params.yaml (report and track read only this)."""
    return Results(features=load_features(),
                   variants={name: load_variant(name) for name in params.variants})
