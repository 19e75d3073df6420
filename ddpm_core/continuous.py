"""Continuous-time view t ∈ [0, 1] of a discrete T-step chain: ᾱ(t) and β(t) = −d log ᾱ/dt.

Conventions and citations ([SDE], the grid t_i = (i + 1)/T, the label): see the notation block
of ddpm_core/ode.py, the one user of this file.

The network's label is a change of clock, not t·(T − 1): the fractional index s at which the
discrete chain's log-SNR λ_i = log(ᾱ_i/(1 − ᾱ_i)), linear in s between integer indices and
continued linearly past both ends, equals λ(t) of the continuous ᾱ(t). A network trained at
ᾱ_i is then told the noise the state has. score_sde's t·(N − 1) (its 999·t for DDPM models) told
it more: up to 0.85 in λ on [t_first, 1] at linear T = 100 (0.71 at T = 1000; 2.4 near t = 1 for
cosine), and that mismatch made the exact Gaussian network's ODE miss the closed form
(tests/test_ode_gap.py). Below t_first (ᾱ(t) > ᾱ_0) the label is negative: noise the network
was never trained on (std √(1 − ᾱ_0) = 0.032 at linear T = 100), an extrapolation whatever
the convention (see benchmarks/ode_gap.py).

Per schedule (continuous_schedule, the kind read from the chain's β):
- linear: score_sde's VP SDE, β(t) = β_min + t(β_max − β_min), β_min = T·β_1, β_max = T·β_T;
- cosine: improved DDPM's ᾱ(t) itself (Nichol & Dhariwal 2021, eq. 17) with β(t) capped at
  −T log(1 − 0.999), the continuous form of the discrete clip β_t ≤ 0.999, so β stays finite at
  t = 1;
- any other chain (quadratic, constant): log ᾱ piecewise linear in t through the grid points
  t_i, with log ᾱ(0) = 0, so β(t) = −T log(1 − β_i) is piecewise constant and ᾱ(t_i) = ᾱ_i
  exactly.
A respaced chain (chains.respace) is not a model's own chain: its labels t·(S − 1) are not the
original indices the network was trained on, so pass the full chain.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ddpm_core.diffusion import Diffusion
from ddpm_core.modes import ContinuousKind
from ddpm_core.schedules import COSINE_S, MAX_BETA, schedule_kind


@dataclass(frozen=True)
class ContinuousSchedule:
    """ᾱ(t) and β(t) for t ∈ [0, 1] of a T-step chain (see the module docstring)."""

    kind: ContinuousKind
    T: int
    beta_min: float = 0.0          # vp_linear
    beta_max: float = 0.0          # vp_linear
    beta_cap: float = math.inf     # cosine: −T log(1 − MAX_BETA)
    log_alpha_bar_grid: tuple[float, ...] = ()  # interpolated: log ᾱ_i, i = 0..T−1
    log_snr_grid: tuple[float, ...] = ()  # the chain's λ_i = log(ᾱ_i/(1 − ᾱ_i)), i = 0..T−1

    def log_alpha_bar(self, t: np.ndarray | float) -> np.ndarray:
        """log ᾱ(t), float64, same shape as t."""
        t = np.asarray(t, dtype=np.float64)
        if self.kind == "vp_linear":
            return vp_log_alpha_bar(t, self.beta_min, self.beta_max)
        if self.kind == "cosine":
            return cosine_log_alpha_bar(t, self.beta_cap)
        return interpolated_log_alpha_bar(t, np.asarray(self.log_alpha_bar_grid))

    def alpha_bar(self, t: np.ndarray | float) -> np.ndarray:
        """ᾱ(t), float64."""
        return np.exp(self.log_alpha_bar(t))

    def beta(self, t: np.ndarray | float) -> np.ndarray:
        """β(t) = −d log ᾱ/dt, float64."""
        t = np.asarray(t, dtype=np.float64)
        if self.kind == "vp_linear":
            return vp_beta(t, self.beta_min, self.beta_max)
        if self.kind == "cosine":
            return cosine_beta(t, self.beta_cap)
        return interpolated_beta(t, np.asarray(self.log_alpha_bar_grid))

    def log_snr(self, t: np.ndarray | float) -> np.ndarray:
        """λ(t) = log(ᾱ(t)/(1 − ᾱ(t))), float64."""
        la = self.log_alpha_bar(t)
        return la - np.log(-np.expm1(la))

    def label(self, t: float) -> float:
        """The network's timestep label: the fractional index s with λ_s = λ(t) (module doc)."""
        g = -np.asarray(self.log_snr_grid)  # increasing in the index
        assert len(g) == self.T >= 2, "log_snr_grid must hold the chain's T ≥ 2 log-SNRs"
        x = -float(self.log_snr(t))
        if x < g[0]:
            return float((x - g[0]) / (g[1] - g[0]))
        if x > g[-1]:
            return float(self.T - 1 + (x - g[-1]) / (g[-1] - g[-2]))
        return float(np.interp(x, g, np.arange(self.T, dtype=np.float64)))

    def label_alpha_bar(self, s: np.ndarray | float) -> np.ndarray:
        """ᾱ the network is told at label s (the inverse of label: ᾱ(t) at s = label(t))."""
        lam = np.asarray(self.log_snr_grid)
        s = np.asarray(s, dtype=np.float64)
        i = np.clip(np.floor(s).astype(np.int64), 0, self.T - 2)
        return 1.0 / (1.0 + np.exp(-(lam[i] + (s - i) * (lam[i + 1] - lam[i]))))

    def t_first(self) -> float:
        """The time where ᾱ(t) = ᾱ_0 (label 0): the least noise the network was trained on."""
        lo, hi, target = 0.0, 1.0, self.log_snr_grid[0]
        for _ in range(100):  # bisection: λ(t) decreases
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if float(self.log_snr(mid)) > target else (lo, mid)
        return 0.5 * (lo + hi)

    def grid(self) -> np.ndarray:
        """t_i = (i + 1)/T of the discrete index i = 0..T−1."""
        return np.arange(1, self.T + 1, dtype=np.float64) / self.T


# [SDE] eq. (11) and App. B: log ᾱ(t) = −½t²(β_max − β_min) − tβ_min
def vp_log_alpha_bar(t: np.ndarray, beta_min: float, beta_max: float) -> np.ndarray:
    """log ᾱ(t) of the VP SDE with linear β(t)."""
    return -0.5 * t**2 * (beta_max - beta_min) - t * beta_min


# [SDE] eq. (11): β(t) = β_min + t(β_max − β_min)
def vp_beta(t: np.ndarray, beta_min: float, beta_max: float) -> np.ndarray:
    """β(t) of the VP SDE."""
    return beta_min + t * (beta_max - beta_min)


def _cosine_theta(t: np.ndarray) -> np.ndarray:
    return (t + COSINE_S) / (1 + COSINE_S) * math.pi / 2


def _cosine_clip_time(beta_cap: float) -> float:
    # β(t) = π/(1+s) tan θ(t) reaches beta_cap at θ = atan(beta_cap (1+s)/π)
    theta = math.atan(beta_cap * (1 + COSINE_S) / math.pi)
    return theta * 2 / math.pi * (1 + COSINE_S) - COSINE_S


# Nichol & Dhariwal 2021, eq. (17): ᾱ(t) = f(t)/f(0), f(t) = cos²θ(t); β capped at beta_cap
def cosine_log_alpha_bar(t: np.ndarray, beta_cap: float) -> np.ndarray:
    """log ᾱ(t) of the cosine schedule, continued with slope −beta_cap past the cap."""
    t_c = min(_cosine_clip_time(beta_cap), 1.0)
    s = np.minimum(t, t_c)
    log_f = 2 * np.log(np.cos(_cosine_theta(s))) - 2 * math.log(math.cos(_cosine_theta(0.0)))
    return log_f - beta_cap * np.maximum(t - t_c, 0.0) if t_c < 1.0 else log_f


# Nichol & Dhariwal 2021, eq. (17) differentiated: β(t) = π/(1+s) tan θ(t)
def cosine_beta(t: np.ndarray, beta_cap: float) -> np.ndarray:
    """β(t) = −d log ᾱ/dt of the cosine schedule, capped at beta_cap."""
    return np.minimum(math.pi / (1 + COSINE_S) * np.tan(_cosine_theta(t)), beta_cap)


def interpolated_log_alpha_bar(t: np.ndarray, log_ab: np.ndarray) -> np.ndarray:
    """log ᾱ(t) piecewise linear through (0, 0) and (t_i, log ᾱ_i), t_i = (i + 1)/T."""
    T = len(log_ab)
    knots = np.arange(T + 1, dtype=np.float64) / T
    return np.interp(t, knots, np.concatenate([[0.0], log_ab]))


def interpolated_beta(t: np.ndarray, log_ab: np.ndarray) -> np.ndarray:
    """β(t) = −T (log ᾱ_i − log ᾱ_{i−1}) = −T log(1 − β_i) on (i/T, (i+1)/T]."""
    T = len(log_ab)
    slopes = -T * np.diff(np.concatenate([[0.0], log_ab]))
    i = np.clip(np.ceil(t * T).astype(np.int64) - 1, 0, T - 1)
    return slopes[i]


def continuous_schedule(diff: Diffusion) -> ContinuousSchedule:
    """The continuous-time ᾱ(t), β(t) of diff's chain (kind read from its β, one source)."""
    kind, T = schedule_kind(diff.betas), diff.T
    ab = diff.alpha_bar.double()
    lam = tuple((torch.log(ab) - torch.log1p(-ab)).tolist())
    if kind == "linear" and T > 1:
        return ContinuousSchedule("vp_linear", T, beta_min=T * float(diff.betas[0]),
                                  beta_max=T * float(diff.betas[-1]), log_snr_grid=lam)
    if kind == "cosine":
        return ContinuousSchedule("cosine", T, beta_cap=-T * math.log1p(-MAX_BETA),
                                  log_snr_grid=lam)
    return ContinuousSchedule("interpolated", T, log_snr_grid=lam,
                              log_alpha_bar_grid=tuple(torch.log(diff.alpha_bar).tolist()))
