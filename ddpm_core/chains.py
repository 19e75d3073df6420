"""The respaced chain: the steps τ_0 < … < τ_{K−1} of a T-step diffusion that a sampler or a
bound visits, and its own diffusion (Nichol & Dhariwal 2021, Sec. 4). Below the samplers, the
bound (likelihood.py) and Analytic-DPM's variance (analytic.py): a chain's β', ᾱ' and β̃' are
the Diffusion of `respace`, written once (diffusion.py).

The network always sees the ORIGINAL index τ_k; index k is the chain's own step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ddpm_core.diffusion import Diffusion
from ddpm_core.modes import DEFAULT_SPACING, SPACINGS, Spacing


# Timestep spacings named as diffusers names them (DDIM code, improved DDPM, Lin et al. 2024)
def timestep_spacing(T: int, S: int, spacing: Spacing = DEFAULT_SPACING) -> list[int]:
    """Increasing indices in 0..T−1 of an S-step chain (0-indexed, index T−1 is step T).

    leading:        0, T//S, 2·(T//S), …, (S − 1)·(T//S): exactly S steps with stride T // S,
                    diffusers' `leading` (steps_offset 0); tops out at T − T//S when S divides T
                    (then it is also the DDIM code's "uniform", range(0, T, T // S), which has
                    more than S steps otherwise: 31 up to 990 for S = 30 at T = 1000, where
                    leading has 30 up to 957).
    ddim_quadratic: int(s) for s in linspace(0, √(0.8 T), S)², the DDIM code's "quadratic";
                    top 0.8T, repeated low indices dropped (96 of S = 100 at T = 1000): a repeat
                    is an identity step of DDIM (ᾱ_τ = ᾱ_prev).
    linspace:       round(linspace(0, T − 1, S)), both ends (improved DDPM; Bao et al.'s even
                    trajectory; diffusers' `linspace`); S = 1 gives [0].
    trailing:       round(arange(T, 0, −T/S)) − 1, i.e. T−1, T−1−T/S, …: starts at T − 1
                    (the first S values of the arange; diffusers' `trailing`).
    Only linspace (S ≥ 2) and trailing start at T − 1; see prior_kl_at for what an early start
    costs.
    """
    assert 1 <= S <= T, f"need 1 <= S <= T, got S={S}, T={T}"  # the api validates steps
    if spacing == "leading":
        # diffusers: (arange(0, S) * (T // S)).round()[::-1], reversed back to increasing
        return [k * (T // S) for k in range(S)]
    if spacing == "ddim_quadratic":
        root = np.linspace(0.0, math.sqrt(0.8 * T), S)
        return sorted({int(v) for v in (root**2).tolist()})
    if spacing == "linspace":
        return [int(v) for v in np.round(np.linspace(0, T - 1, S))]
    if spacing == "trailing":
        # arange's length is float-fragile (T=17, S=7 gives 8 values, the last one −1)
        return sorted(int(v) - 1 for v in np.round(np.arange(T, 0, -T / S)[:S]))
    raise AssertionError(f"unknown spacing {spacing!r}; expected one of {SPACINGS}")


def check_timesteps(diff: Diffusion, timesteps: Sequence[int]) -> list[int]:
    steps = [int(s) for s in timesteps]
    assert len(steps) >= 1, "need at least one timestep"
    assert all(0 <= s < diff.T for s in steps), f"timesteps must lie in 0..{diff.T - 1}"
    assert all(b > a for a, b in zip(steps, steps[1:], strict=False)), "timesteps must increase"
    return steps


# Nichol & Dhariwal 2021, Sec. 4 (eq. 19): β'_i = 1 − ᾱ_{τ_i}/ᾱ_{τ_{i−1}}
def respaced_betas(diff: Diffusion, timesteps: Sequence[int]) -> Tensor:
    """β' [S] float64 of the chain that visits only the steps τ (ᾱ'_i = ᾱ_{τ_i})."""
    steps = check_timesteps(diff, timesteps)
    alpha_bar = diff.alpha_bar[steps]
    prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
    return 1.0 - alpha_bar / prev


def respace(diff: Diffusion, timesteps: Sequence[int]) -> Diffusion:
    """Diffusion over the subsequence τ (same mean/var types; the model still sees τ_i)."""
    steps = check_timesteps(diff, timesteps)
    return Diffusion(respaced_betas(diff, steps), diff.mean_type, diff.var_type,
                     alpha_bar=diff.alpha_bar[steps])


def chain_of(diff: Diffusion, timesteps: Sequence[int] | None) -> tuple[list[int], Diffusion]:
    """The original indices τ and the chain's own Diffusion (None: all T steps, diff itself)."""
    if timesteps is None:
        return list(range(diff.T)), diff
    steps = check_timesteps(diff, timesteps)
    return steps, respace(diff, steps)
