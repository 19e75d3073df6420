"""Names of every mode: one source for the library, the configuration and the stages.

Torch-free on purpose: `ddpm_core.config` imports this module, and a bad params.yaml must fail
without paying for `import torch`. Each mode is a `Literal` (for type hints and for config
validation); the tuple of its names, where code reads one, is `get_args` of it. A test
(tests/test_modes.py) fails on any `Literal[` written outside this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

# β schedule (schedules.py): Ho et al. 2020 (linear), the official code (quadratic: linear in
# √β, constant), the common write-ups' β-quadratic (quadratic_beta), Nichol & Dhariwal 2021
# (cosine). All but cosine are rescaled by 1000/T.
ScheduleKind = Literal["linear", "quadratic", "quadratic_beta", "cosine", "constant"]

# What the network's first C output channels predict (diffusion.py).
MeanType = Literal["eps", "x0", "mu"]

# The reverse-process variance σ_t² (diffusion.py); learned ones need C more output channels.
VarType = Literal["fixed_large", "fixed_small", "learned", "learned_range"]
FIXED_VAR_TYPES: tuple[VarType, ...] = ("fixed_large", "fixed_small")
LEARNED_VAR_TYPES: tuple[VarType, ...] = ("learned", "learned_range")

# The variance heads of Bao et al. 2022b (heads.py) on a frozen ε-network: NPR-DPM's
# h ≈ E[(ε − ε̂)² | x_t] and SN-DPM's h ≈ E[ε² | x_t], each a per-pixel σ²(x_t).
HeadKind = Literal["npr", "sn"]
HEAD_KINDS: tuple[HeadKind, ...] = get_args(HeadKind)

# The reverse-process variance of a sampler and of the bound: the four VarTypes, plus
# Analytic-DPM's optimal σ̂² (analytic.py; Bao et al. 2022), which needs Γ, and the heads' NPR
# and SN σ² (which need the heads). One table row each: the name (params.yaml, the library and
# the API), the stem of metric keys and MLflow params (bpd_<key>_K<k>), the label of tables and
# figures, and the short name in sampler names and on the `ddpm` command line (--sigma2 beta).
Sigma2 = Literal["fixed_large", "fixed_small", "learned", "learned_range", "analytic", HeadKind]


@dataclass(frozen=True)
class Sigma2Mode:
    """One σ² choice: its name, metric-key stem, label and short name."""

    name: Sigma2
    key: str
    label: str
    short: str


SIGMA2_MODES: dict[Sigma2, Sigma2Mode] = {m.name: m for m in (
    Sigma2Mode("fixed_large", "sigma2_beta", "σ² = β", "beta"),
    Sigma2Mode("fixed_small", "sigma2_beta_tilde", "σ² = β̃", "beta_tilde"),
    Sigma2Mode("learned", "sigma2_learned", "σ² learned", "learned"),
    Sigma2Mode("learned_range", "sigma2_learned_range", "σ² learned (range)", "learned_range"),
    Sigma2Mode("analytic", "sigma2_analytic", "σ² analytic", "analytic"),
    Sigma2Mode("npr", "sigma2_npr", "σ² NPR-DPM", "npr"),
    Sigma2Mode("sn", "sigma2_sn", "σ² SN-DPM", "sn"),
)}
SIGMA2S: tuple[Sigma2, ...] = get_args(Sigma2)


def sigma2_mode(name: str) -> Sigma2Mode:
    """The row of a σ² given by its name or its short name (ValueError naming the choices)."""
    for m in SIGMA2_MODES.values():
        if name in (m.name, m.short):
            return m
    raise ValueError(f"unknown σ² {name!r}; expected one of {SIGMA2S} (or the short names "
                     f"{tuple(m.short for m in SIGMA2_MODES.values())})")


# Samplers of the engine (api.sample, samplers.py): DDPM's ancestral chain (all T steps or
# respaced), DDIM (η) and Bao et al.'s Analytic-DDIM (DDIM with the σ̂² noise).
SamplerKind = Literal["ancestral", "ddim", "ddim_analytic"]
SAMPLER_KINDS: tuple[SamplerKind, ...] = get_args(SamplerKind)

# Training loss (losses.py) and how its timesteps are drawn (resample.py).
LossType = Literal["simple", "vlb", "hybrid"]
TSampling = Literal["uniform", "importance"]
T_SAMPLINGS: tuple[TSampling, ...] = get_args(TSampling)

# Timestep subsequences for respaced sampling (samplers.py): leading, linspace and trailing as
# diffusers' schedulers define them; ddim_quadratic as the DDIM code.
Spacing = Literal["leading", "ddim_quadratic", "linspace", "trailing"]
SPACINGS: tuple[Spacing, ...] = get_args(Spacing)
# Lin et al. 2024: a chain must start at the last step; `trailing` does, as DPM-Solver's does.
DEFAULT_SPACING: Spacing = "trailing"

# Rows of every network call of the engine (api.FixedRows; sample.net_batch, bpd.net_batch,
# `ddpm --net-batch`): a fixed call size keeps each image's numbers independent of the batch.
NET_BATCH = 100

# Arithmetic of the network call (training.py, inference.py).
Precision = Literal["fp32", "bf16"]

# Feature network of FID/KID (fid.py).
Features = Literal["inception", "digits_classifier"]

# ----------------------------------------------------------------------------- the other modes
# Network presets (unet.PRESETS holds one UNetConfig per name): Ho et al. 2020's CIFAR-10 and
# 256² networks, and a small one for the digits.
Preset = Literal["digits", "cifar10", "celebahq256", "lsun256"]

# A sample set of the pipeline (pipeline/records.SamplerSpec): all T steps of the ancestral
# chain, the ancestral chain on S respaced steps, or DDIM on S steps.
SpecKind = Literal["ancestral", "respaced", "ddim"]

# Which weights of a model file: the EMA ones or the raw ones (modelfile.py, api.load_model).
Which = Literal["ema", "model"]

# Divergence of the probability-flow ODE (ode.py): exact (C·H·W backward passes) or Hutchinson.
Divergence = Literal["exact", "hutchinson"]
# Dequantization of the ODE likelihood: uniform is [SDE] Table 2's x = 2(k + u)/256 − 1;
# variational goes through the chain's first step (the bound's footing; ode.py).
Dequantization = Literal["uniform", "variational"]

# Continuous-time schedules of the ODE (continuous.py).
ContinuousKind = Literal["vp_linear", "cosine", "interpolated"]

# Data sets of params.yaml's data.dataset (data.py) and formats of pretrained weights.
Dataset = Literal["digits", "cifar10", "folder", "npz"]
ModelFormat = Literal["ours", "diffusers"]

# Choices of params.yaml that take "auto" (resolved from the data set when the params load):
# FID's feature network (the digits classifier for digits, Inception otherwise) and train.hflip.
FeatureChoice = Literal["auto", Features]
Auto = Literal["auto"]
