"""Noise schedules β_1..β_T of the forward process, computed in float64.

Index ``i = 0..T-1`` of every returned tensor is the paper's step ``t = i + 1``. With
β_min = 1e-4 and β_max = 0.02 (Ho et al. 2020 at T = 1000), times 1000/T (below):

    linear          β_t = β_min + (β_max − β_min)(t−1)/(T−1)         Ho et al. 2020, Sec. 4
    quadratic       √β_t = √β_min + (√β_max − √β_min)(t−1)/(T−1)     official DDPM code's "quad"
                    (linear in √β; diffusers' "scaled_linear")
    quadratic_beta  β_t = β_min + (β_max − β_min)((t−1)/(T−1))²       write-ups' "quadratic"
    cosine          ᾱ_t = f(t/T)/f(0), f(u) = cos²((u + s)/(1 + s) · π/2), s = 0.008,
                    β_t = 1 − ᾱ_t/ᾱ_{t−1} clipped at 0.999           Nichol & Dhariwal 2021 (17)
    constant        β_t = β_max                                       official DDPM code's "const"

Where these differ from common write-ups (tutorials, notes):
- "quadratic": many write-ups give the β-quadratic formula (our `quadratic_beta`). The official
  DDPM code's `quad` is linear in √β; we keep that one as `quadratic`.
  Same endpoints; at T = 1000 they differ by up to 6.6e-4 in β (13 % of β there, mid-chain).
- cosine: write-ups often drop improved DDPM's /(1 + s), f(u) = cos²((u + s) · π/2). That is no
  schedule at T = 1000: f reaches 0 at u = 1 − s (ᾱ = 3.7e-33 at t = 992) and grows again after
  it, so β turns negative for t > 992. We keep the paper's /(1 + s) (0 < β ≤ 0.999).

Rescaling by 1000/T: β_min and β_max are multiplied by 1000/T for every schedule but cosine
(which is defined by ᾱ(t/T) and needs none), so Σβ and ᾱ_T stay about the same when T changes.
improved-diffusion rescales only `linear`; the official DDPM code rescales none (it has T = 1000
only). So at T ≠ 1000 our quadratic and constant are this project's, not the official code's;
at T = 1000 the factor is 1 and every schedule is the official one.
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
    # improved-diffusion (linear only there; here every schedule but cosine): scale = 1000 / T
    # keeps ᾱ_T roughly fixed when T changes.
    start, end = 1000.0 / T * BETA_START, 1000.0 / T * BETA_END
    if kind == "linear":
        # Ho et al. 2020, Sec. 4 (rescaled for T != 1000 as improved-diffusion)
        betas = torch.linspace(start, end, T, dtype=torch.float64)
    elif kind == "quadratic":
        # official DDPM code "quad": linear in sqrt(β), same (rescaled) endpoints
        betas = torch.linspace(math.sqrt(start), math.sqrt(end), T, dtype=torch.float64) ** 2
    elif kind == "quadratic_beta":
        # the common write-ups' "quadratic": quadratic in β itself (not the official code's)
        betas = start + (end - start) * torch.linspace(0.0, 1.0, T, dtype=torch.float64) ** 2
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


def schedule_kind(betas: torch.Tensor) -> ScheduleKind | None:
    """Which of our schedules (at T = len(betas)) these β are, None if none (float64 exact)."""
    betas = torch.as_tensor(betas, dtype=torch.float64)
    for kind in get_args(ScheduleKind):
        if torch.allclose(make_betas(kind, len(betas)), betas, rtol=1e-12, atol=0):
            return kind
    return None
