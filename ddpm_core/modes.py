"""Names of every mode: one source for the library, the configuration and the stages.

Torch-free on purpose: `ddpm_core.config` imports this module, and a bad params.yaml must fail
without paying for `import torch`. Each mode is a `Literal` (for type hints and for config
validation) and a tuple of its names (for checks and messages); a test keeps the two equal.
"""

from __future__ import annotations

from typing import Literal

# β schedule (schedules.py): Ho et al. 2020 (linear), the official code (quadratic: linear in
# √β, constant), the common write-ups' β-quadratic (quadratic_beta), Nichol & Dhariwal 2021
# (cosine). All but cosine are rescaled by 1000/T.
ScheduleKind = Literal["linear", "quadratic", "quadratic_beta", "cosine", "constant"]
SCHEDULE_KINDS: tuple[ScheduleKind, ...] = ("linear", "quadratic", "quadratic_beta", "cosine",
                                            "constant")

# What the network's first C output channels predict (diffusion.py).
MeanType = Literal["eps", "x0", "mu"]
MEAN_TYPES: tuple[MeanType, ...] = ("eps", "x0", "mu")

# The reverse-process variance σ_t² (diffusion.py); learned ones need C more output channels.
VarType = Literal["fixed_large", "fixed_small", "learned", "learned_range"]
VAR_TYPES: tuple[VarType, ...] = ("fixed_large", "fixed_small", "learned", "learned_range")
FIXED_VAR_TYPES: tuple[VarType, ...] = ("fixed_large", "fixed_small")
LEARNED_VAR_TYPES: tuple[VarType, ...] = ("learned", "learned_range")

# Training loss (losses.py) and how its timesteps are drawn (resample.py).
LossType = Literal["simple", "vlb", "hybrid"]
LOSS_TYPES: tuple[LossType, ...] = ("simple", "vlb", "hybrid")
TSampling = Literal["uniform", "importance"]
T_SAMPLINGS: tuple[TSampling, ...] = ("uniform", "importance")

# Timestep subsequences for respaced sampling (samplers.py): leading, linspace and trailing as
# diffusers' schedulers define them; ddim_quadratic as the DDIM code.
Spacing = Literal["leading", "ddim_quadratic", "linspace", "trailing"]
SPACINGS: tuple[Spacing, ...] = ("leading", "ddim_quadratic", "linspace", "trailing")

# Arithmetic of the network call (training.py, inference.py).
Precision = Literal["fp32", "bf16"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "bf16")

# Feature network of FID/KID (fid.py).
Features = Literal["inception", "digits_classifier"]
FEATURES: tuple[Features, ...] = ("inception", "digits_classifier")
