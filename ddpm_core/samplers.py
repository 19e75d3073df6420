"""Samplers: ancestral DDPM sampling (all T steps or a subsequence) and DDIM.

Plain functions: the model is called with the ORIGINAL indices τ_i (0..T−1); a respaced chain
only recomputes β from ᾱ at the kept steps. Every random draw (x_T and each step's noise) uses
the explicit generator, so (seed, shape, timesteps) fixes the samples.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ddpm_core.diffusion import (
    Diffusion,
    Model,
    p_mean_variance_from_output,
    predict_eps_from_x0,
    predict_x0_from_mu,
)

SpacingKind = Literal["uniform", "quadratic"]


def spaced_timesteps(T: int, S: int, kind: SpacingKind) -> list[int]:
    """Up to S increasing indices in 0..T−1, always starting at 0 (the decoder step).

    uniform:   round(i · T/S), i = 0..S−1: exactly S indices; equals DDIM's range(0, T, T//S)
               when S divides T (which, when it does not, has more than S).
    quadratic: int((linspace(0, √(0.8 T), S))²) as in the DDIM paper's code, with repeated
               indices dropped (e.g. 96 of S = 100 at T = 1000). A repeated index is an identity
               step of DDIM (ᾱ_τ = ᾱ_prev), so the samples are the same with fewer network calls.
    """
    if not 1 <= S <= T:
        raise ValueError(f"need 1 <= S <= T, got S={S}, T={T}")
    if kind == "uniform":
        return [int(math.floor(i * T / S + 0.5)) for i in range(S)]
    if kind == "quadratic":
        root = torch.linspace(0.0, math.sqrt(0.8 * T), S, dtype=torch.float64)
        return sorted({int(v) for v in (root**2).tolist()})
    raise ValueError(f"unknown spacing {kind!r}; expected 'uniform' or 'quadratic'")


def _check_timesteps(diff: Diffusion, timesteps: Sequence[int]) -> list[int]:
    steps = [int(s) for s in timesteps]
    assert len(steps) >= 1, "need at least one timestep"
    assert all(0 <= s < diff.T for s in steps), f"timesteps must lie in 0..{diff.T - 1}"
    assert all(b > a for a, b in zip(steps, steps[1:], strict=False)), "timesteps must increase"
    return steps


# Nichol & Dhariwal 2021, Sec. 4 (eq. 19): β'_i = 1 − ᾱ_{τ_i}/ᾱ_{τ_{i−1}}
def respaced_betas(diff: Diffusion, timesteps: Sequence[int]) -> Tensor:
    """β' [S] float64 of the chain that visits only the steps τ (ᾱ'_i = ᾱ_{τ_i})."""
    steps = _check_timesteps(diff, timesteps)
    alpha_bar = diff.alpha_bar[steps]
    prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
    return 1.0 - alpha_bar / prev


def respace(diff: Diffusion, timesteps: Sequence[int]) -> Diffusion:
    """Diffusion over the subsequence τ (same mean/var types; the model still sees τ_i)."""
    return Diffusion(respaced_betas(diff, timesteps), diff.mean_type, diff.var_type)


def _progress(it: range, progress: bool, desc: str) -> Iterable[int]:
    return tqdm(it, desc=desc, leave=False) if progress else it


def _initial_noise(shape: Sequence[int], generator: torch.Generator,
                   x_T: Tensor | None) -> Tensor:
    if x_T is not None:
        assert tuple(x_T.shape) == tuple(shape), f"x_T {tuple(x_T.shape)} vs shape {shape}"
        return x_T.to(generator.device, torch.float32)
    return torch.randn(tuple(shape), generator=generator, device=generator.device)


def _time(tau: int, n: int, device: torch.device) -> Tensor:
    return torch.full((n,), tau, dtype=torch.long, device=device)


# Ho et al. 2020, Algorithm 2 (on a subsequence: Nichol & Dhariwal 2021, Sec. 4)
@torch.no_grad()
def sample_ancestral(diff: Diffusion, model: Model, shape: Sequence[int],
                     generator: torch.Generator, timesteps: Sequence[int] | None = None,
                     clip_x0: bool = True, progress: bool = False,
                     x_T: Tensor | None = None) -> Tensor:
    """x_0 ~ p_θ by ancestral sampling from x_T ~ N(0, I); returns [B,C,H,W] in [-1, 1]."""
    steps = list(range(diff.T)) if timesteps is None else _check_timesteps(diff, timesteps)
    sub = diff if timesteps is None else respace(diff, steps)
    if diff.mean_type == "mu" and timesteps is not None:
        # μ̃ outputs belong to the original one-step chain: read them as x̂_0 in the new chain
        sub = sub.with_mean_type("x0")
    x = _initial_noise(shape, generator, x_T)
    C = x.shape[1]
    for i in _progress(range(len(steps) - 1, -1, -1), progress, "ancestral"):
        t_model = _time(steps[i], x.shape[0], x.device)
        out = model(x, t_model).float()
        if sub is not diff and diff.mean_type == "mu":
            x0 = predict_x0_from_mu(diff, x, t_model, out[:, :C])
            out = torch.cat([x0, out[:, C:]], dim=1)
        p = p_mean_variance_from_output(sub, out, x, _time(i, x.shape[0], x.device), clip_x0)
        x = p["mean"]
        if i > 0:  # no noise on the last step (Algorithm 2, z = 0 for t = 1)
            noise = torch.randn(x.shape, generator=generator, device=generator.device)
            x = x + torch.exp(0.5 * p["log_variance"]) * noise
    return x.clamp(-1.0, 1.0)


# Song et al. 2021, eq. (16)
def ddim_sigma(alpha_bar: float, alpha_bar_prev: float, eta: float) -> float:
    """σ_τ(η) = η √((1−ᾱ_prev)/(1−ᾱ)) √(1 − ᾱ/ᾱ_prev) of one DDIM step."""
    return eta * math.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * math.sqrt(
        1 - alpha_bar / alpha_bar_prev)


def _pred_x0_eps(diff: Diffusion, model: Model, x: Tensor, tau: int,
                 clip_x0: bool) -> tuple[Tensor, Tensor]:
    t = _time(tau, x.shape[0], x.device)
    p = p_mean_variance_from_output(diff, model(x, t).float(), x, t, clip_x0=clip_x0)
    # ε re-derived from the (possibly clipped) x̂_0, as improved-diffusion does
    return p["pred_x0"], predict_eps_from_x0(diff, x, t, p["pred_x0"])


# Song et al. 2021, eq. (12)
@torch.no_grad()
def ddim_step(diff: Diffusion, model: Model, x: Tensor, tau: int, tau_prev: int | None,
              eta: float, generator: torch.Generator, clip_x0: bool = True) -> Tensor:
    """One DDIM step x_τ -> x_{τ_prev} [B,C,H,W]; tau_prev=None means ᾱ_prev = 1 (x̂_0)."""
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must lie in [0, 1], got {eta}")
    ab = float(diff.alpha_bar[tau])
    ab_prev = 1.0 if tau_prev is None else float(diff.alpha_bar[tau_prev])
    x0, eps = _pred_x0_eps(diff, model, x, tau, clip_x0)
    sigma = ddim_sigma(ab, ab_prev, eta)
    x = math.sqrt(ab_prev) * x0 + math.sqrt(max(1.0 - ab_prev - sigma**2, 0.0)) * eps
    if sigma > 0:
        x = x + sigma * torch.randn(x.shape, generator=generator, device=generator.device)
    return x


@torch.no_grad()
def sample_ddim(diff: Diffusion, model: Model, shape: Sequence[int], timesteps: Sequence[int],
                eta: float, generator: torch.Generator, clip_x0: bool = True,
                progress: bool = False, x_T: Tensor | None = None) -> Tensor:
    """x_0 by DDIM on the increasing steps τ with stochasticity η ∈ [0, 1]; [B,C,H,W] in [-1,1]."""
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must lie in [0, 1], got {eta}")
    steps = _check_timesteps(diff, timesteps)
    x = _initial_noise(shape, generator, x_T)
    for i in _progress(range(len(steps) - 1, -1, -1), progress, "ddim"):
        prev = steps[i - 1] if i > 0 else None
        x = ddim_step(diff, model, x, steps[i], prev, eta, generator, clip_x0)
    return x.clamp(-1.0, 1.0)


# Song et al. 2021, eq. (13): the η = 0 ODE integrated forward, x_0 -> x_T
@torch.no_grad()
def ddim_encode(diff: Diffusion, model: Model, x0: Tensor, timesteps: Sequence[int],
                progress: bool = False) -> Tensor:
    """Deterministic latent x_{τ_S} [B,C,H,W] of x_0 (inverse of sample_ddim with η=0, no clip).

    Step i maps ᾱ_{τ_{i−1}} (ᾱ = 1 for i = 0) to ᾱ_{τ_i} with ε̂ evaluated at the current point
    (x_{τ_{i−1}}, τ_{i−1}); the first step evaluates the model at (x_0, τ_0).
    """
    steps = _check_timesteps(diff, timesteps)
    x = x0.float()
    for i in _progress(range(len(steps)), progress, "ddim_encode"):
        ab_next = float(diff.alpha_bar[steps[i]])
        if i == 0:
            # the model evaluated at x_0 taken as a point of step τ_0 gives the first ε̂
            x0_hat, eps = x, _pred_x0_eps(diff, model, x, steps[0], clip_x0=False)[1]
        else:
            x0_hat, eps = _pred_x0_eps(diff, model, x, steps[i - 1], clip_x0=False)
        x = math.sqrt(ab_next) * x0_hat + math.sqrt(1.0 - ab_next) * eps
    return x
