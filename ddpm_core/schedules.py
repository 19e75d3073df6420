"""Noise schedules β_1..β_T of the forward process, computed in float64.

Index ``i = 0..T-1`` of every returned tensor is the paper's step ``t = i + 1``.
"""

from __future__ import annotations

import math
from typing import get_args

import torch

from ddpm_core.modes import ScheduleKind

# Ho et al. 2020, Sec. 4: β_1 = 1e-4 ... β_T = 0.02 at T = 1000.
BETA_START = 1e-4
BETA_END = 0.02
# Nichol & Dhariwal 2021, eq. (17): offset s and the clip of β_t.
COSINE_S = 0.008
MAX_BETA = 0.999


def _scaled_endpoints(T: int) -> tuple[float, float]:
    # improved-diffusion: scale = 1000 / T keeps ᾱ_T roughly fixed when T changes.
    scale = 1000.0 / T
    return scale * BETA_START, scale * BETA_END


# Nichol & Dhariwal 2021, eq. (17)
def cosine_alpha_bar(u: torch.Tensor, s: float = COSINE_S) -> torch.Tensor:
    """ᾱ(u) = f(u)/f(0), f(u) = cos²((u + s)/(1 + s) · π/2) for u = t/T in [0, 1]; any shape."""
    u = u.to(torch.float64)

    def f(v: torch.Tensor) -> torch.Tensor:
        return torch.cos((v + s) / (1 + s) * math.pi / 2) ** 2

    return f(u) / f(torch.zeros_like(u))


def make_betas(kind: ScheduleKind, T: int) -> torch.Tensor:
    """β_t for t = 1..T as a float64 tensor [T] (index i is step i + 1)."""
    if kind not in get_args(ScheduleKind):
        raise ValueError(f"unknown schedule {kind!r}; expected one of {get_args(ScheduleKind)}")
    if T < 1:
        raise ValueError(f"T must be >= 1, got {T}")
    start, end = _scaled_endpoints(T)
    if kind == "linear":
        # Ho et al. 2020, Sec. 4 (rescaled for T != 1000 as improved-diffusion)
        betas = torch.linspace(start, end, T, dtype=torch.float64)
    elif kind == "quadratic":
        # official DDPM code "quad": linear in sqrt(β), same (rescaled) endpoints
        betas = torch.linspace(math.sqrt(start), math.sqrt(end), T, dtype=torch.float64) ** 2
    elif kind == "cosine":
        # Nichol & Dhariwal 2021, eq. (17): β_t = 1 − ᾱ(t/T)/ᾱ((t−1)/T), clipped at 0.999
        u = torch.arange(T + 1, dtype=torch.float64) / T
        alpha_bar = cosine_alpha_bar(u)
        betas = 1 - alpha_bar[1:] / alpha_bar[:-1]
    else:
        # official DDPM code "const": β_t = β_T for every t
        betas = torch.full((T,), end, dtype=torch.float64)
    # the clip only binds for the cosine end point and for rescaled schedules with T < 21
    betas = betas.clamp(max=MAX_BETA)
    assert betas.shape == (T,)
    assert bool((betas > 0).all()) and bool((betas < 1).all()), "β must lie in (0, 1)"
    return betas
