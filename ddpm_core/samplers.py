"""Samplers: ancestral DDPM sampling (all T steps or a subsequence) and DDIM.

Plain functions: the model is called with the ORIGINAL indices τ_i (0..T−1); a respaced chain
only recomputes β from ᾱ at the kept steps. The caller gives x_T and the noise source (one
stream per image, ddpm_core.seeds), so image b depends only on its own seed and the settings.
chains.timestep_spacing makes the step lists; `prior_kl_at` says how much a chain that starts
before T − 1 loses.

The last sampling step outputs the mean (no noise). On a chain that skips steps (K < T) and on
every DDIM chain, the step before it (to x_{τ_1}, the first kept index) adds noise of std at most
`last_sigma_cap(y)` (ddpm_core.last_sigma: Bao et al.'s code; `last_sigma_cap_y=None`: no cap).
The full T-step ancestral chain is DDPM's Algorithm 2 and is never capped.

The heads' σ² (npr, sn: Bao et al. 2022b, heads.py) need a model that appends the head's h
[B,C,H,W] to its output (heads.WithHeads): σ² per pixel from the same call, in the ancestral
chain (heads.ddpm_sigma2) and in DDIM (heads.ddim_sigma2: noise even at η = 0), capped alike.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor

from ddpm_core.analytic import analytic_sigma2, ddim_analytic_sigma2, eps_from_output
from ddpm_core.chains import chain_of, check_timesteps
from ddpm_core.diffusion import (
    Diffusion,
    Model,
    VarType,
    p_mean_variance_from_output,
    predict_eps_from_x0,
    predict_x0_from_mu,
)
from ddpm_core.heads import cov_x0, ddim_sigma2, ddpm_sigma2
from ddpm_core.last_sigma import DEFAULT_LAST_SIGMA_CAP_Y, last_sigma_cap_of
from ddpm_core.modes import HEAD_KINDS, HeadKind, Sigma2


class Noise(Protocol):
    """A source of the samplers' noise: seeds.ImageNoise (one stream per image)."""

    def randn(self, shape: Sequence[int]) -> Tensor: ...


# Ho et al. 2020, eq. (5), L_T at the chain's first index: KL(q(x_t | x_0) ‖ N(0, I))
def prior_kl_at(diff: Diffusion, t_index: int, x0_mean_square: float = 1.0) -> float:
    """KL(q(x_t | x_0) ‖ N(0, I)) in bits/dim at index t for data with mean of x_0² over dims.

    Per dimension the KL is ½(ᾱ_t x_0² − ᾱ_t − log(1 − ᾱ_t)) nats; it grows with x_0², so the
    default x0_mean_square = 1 (|x_0| = 1 everywhere) is the worst case over x_0 ∈ [−1, 1]^d:
    −½ log(1 − ᾱ_t) / ln 2, an upper bound on the prior term of any data in [−1, 1]. A sampler
    that starts from N(0, I) at index t ignores at least this much signal per dimension for
    such an image; x0_mean_square = 0 gives the best case (x_0 = 0).
    """
    if not 0 <= t_index < diff.T:
        raise ValueError(f"t_index={t_index} must lie in 0..{diff.T - 1}")
    if not 0.0 <= x0_mean_square <= 1.0:
        raise ValueError(f"x0_mean_square={x0_mean_square} must lie in [0, 1] for data in [-1, 1]")
    ab = float(diff.alpha_bar[t_index])
    return 0.5 * (ab * x0_mean_square - ab - math.log1p(-ab)) / math.log(2.0)


def _time(tau: int, n: int, device: torch.device) -> Tensor:
    return torch.full((n,), tau, dtype=torch.long, device=device)


# Ho et al. 2020, Algorithm 2 (on a subsequence: Nichol & Dhariwal 2021, Sec. 4; σ² = σ̂²:
# Bao et al. 2022, Theorem 1)
@torch.no_grad()
def sample_ancestral(diff: Diffusion, model: Model, x_T: Tensor, *, noise: Noise,
                     timesteps: Sequence[int] | None = None, clip_x0: bool = True,
                     sigma2: Sigma2 | None = None, gamma: Tensor | None = None,
                     last_sigma_cap_y: float | None = DEFAULT_LAST_SIGMA_CAP_Y) -> Tensor:
    """x_0 ~ p_θ by ancestral sampling from x_T [B,C,H,W]; returns [B,C,H,W] in [-1, 1].

    Each noisy step draws noise.randn(shape) (seeds.ImageNoise: image b's own stream). sigma2
    picks the reverse variance (default diff.var_type); "analytic" uses σ̂² of
    analytic.analytic_sigma2 with gamma = Γ [T]; "npr"/"sn" the head's σ²(x_t) of a model that
    appends that head's h (heads.WithHeads). With K < T steps the step to x_{τ_1} adds noise of
    std at most last_sigma_cap(last_sigma_cap_y). The api validates the choices.
    """
    chosen: Sigma2 = diff.var_type if sigma2 is None else sigma2
    steps, sub = chain_of(diff, timesteps)
    cap = last_sigma_cap_of(diff.T, len(steps), False, last_sigma_cap_y)
    if diff.mean_type == "mu" and timesteps is not None:
        # μ̃ outputs belong to the original one-step chain: read them as x̂_0 in the new chain
        sub = sub.with_mean_type("x0")
    log_sigma2 = None
    if chosen == "analytic":
        log_sigma2 = torch.log(analytic_sigma2(diff, gamma, None if timesteps is None else steps))
    head = chosen if chosen in HEAD_KINDS else None
    var_type: VarType = "fixed_small" if chosen in ("analytic", *HEAD_KINDS) else chosen
    x = x_T.float()
    C = x.shape[1]
    for i in range(len(steps) - 1, -1, -1):
        t_model = _time(steps[i], x.shape[0], x.device)
        out = model(x, t_model).float()
        if head is not None:  # an ε-model of fixed variance (the api checks): C channels
            out, h = out[:, :C], out[:, C:]
            eps_hat = eps_from_output(diff, out, x, t_model)
        if sub is not diff and diff.mean_type == "mu":
            x0 = predict_x0_from_mu(diff, x, t_model, out[:, :C])
            out = torch.cat([x0, out[:, C:]], dim=1)
        p = p_mean_variance_from_output(sub, out, x, _time(i, x.shape[0], x.device), clip_x0,
                                        var_type=var_type)
        x = p["mean"]
        if i > 0:  # no noise on the last step (Algorithm 2, z = 0 for t = 1)
            z = noise.randn(x.shape).to(x.device)
            if head is not None:
                k = _time(i, x.shape[0], x.device)
                cov = cov_x0(sub, k, h.double(), eps_hat, kind=head, clip=clip_x0)
                std = ddpm_sigma2(sub, k, cov).sqrt().to(x.dtype)
            else:
                std = (torch.exp(0.5 * p["log_variance"]) if log_sigma2 is None
                       else math.exp(0.5 * float(log_sigma2[i])))
            if i == 1 and cap is not None:  # the step to x_{τ_1}
                std = std.clamp(max=cap) if isinstance(std, Tensor) else min(std, cap)
            x = x + std * z
    return x.clamp(-1.0, 1.0)


# Song et al. 2021, eq. (16)
def ddim_sigma(alpha_bar: float, alpha_bar_prev: float, eta: float) -> float:
    """σ_τ(η) = η √((1−ᾱ_prev)/(1−ᾱ)) √(1 − ᾱ/ᾱ_prev) of one DDIM step."""
    return eta * math.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * math.sqrt(
        1 - alpha_bar / alpha_bar_prev)


def _pred_x0_eps(diff: Diffusion, model: Model, x: Tensor, tau: int,
                 clip_x0: bool) -> tuple[Tensor, Tensor]:
    t = _time(tau, x.shape[0], x.device)
    return _x0_eps_of(diff, model(x, t).float(), x, t, clip_x0)


def _x0_eps_of(diff: Diffusion, out: Tensor, x: Tensor, t: Tensor,
               clip_x0: bool) -> tuple[Tensor, Tensor]:
    p = p_mean_variance_from_output(diff, out, x, t, clip_x0=clip_x0)
    # ε re-derived from the (possibly clipped) x̂_0, as improved-diffusion does
    return p["pred_x0"], predict_eps_from_x0(diff, x, t, p["pred_x0"])


# Song et al. 2021, eq. (12) without its noise: √ᾱ_prev x̂_0 + √(1 − ᾱ_prev − σ_τ(η)²) ε
def _ddim_mean(diff: Diffusion, x0: Tensor, eps: Tensor, tau: int, tau_prev: int | None,
               eta: float) -> Tensor:
    ab = float(diff.alpha_bar[tau])
    ab_prev = 1.0 if tau_prev is None else float(diff.alpha_bar[tau_prev])
    sigma = ddim_sigma(ab, ab_prev, eta)
    return math.sqrt(ab_prev) * x0 + math.sqrt(max(1.0 - ab_prev - sigma**2, 0.0)) * eps


# Song et al. 2021, eq. (12)
@torch.no_grad()
def ddim_step(diff: Diffusion, model: Model, x: Tensor, *, tau: int, tau_prev: int | None,
              eta: float, noise: Noise, clip_x0: bool = True,
              noise_sigma2: float | None = None) -> Tensor:
    """One DDIM step x_τ -> x_{τ_prev} [B,C,H,W]; tau_prev=None means ᾱ_prev = 1 (x̂_0).

    The mean uses λ = σ_τ(η); the added noise has variance noise_sigma2 (default λ², e.g.
    Bao et al.'s optimal σ*² from analytic.ddim_analytic_sigma2).
    """
    ab = float(diff.alpha_bar[tau])
    ab_prev = 1.0 if tau_prev is None else float(diff.alpha_bar[tau_prev])
    x0, eps = _pred_x0_eps(diff, model, x, tau, clip_x0)
    x = _ddim_mean(diff, x0, eps, tau, tau_prev, eta)
    std = ddim_sigma(ab, ab_prev, eta) if noise_sigma2 is None else math.sqrt(noise_sigma2)
    if std > 0:
        x = x + std * noise.randn(x.shape).to(x.device)
    return x


@torch.no_grad()
def sample_ddim(diff: Diffusion, model: Model, x_T: Tensor, *, noise: Noise,
                timesteps: Sequence[int], eta: float, clip_x0: bool = True,
                gamma: Tensor | None = None, head: HeadKind | None = None,
                last_sigma_cap_y: float | None = DEFAULT_LAST_SIGMA_CAP_Y) -> Tensor:
    """x_0 by DDIM from x_T [B,C,H,W] on the increasing steps τ, η ∈ [0, 1]; [B,C,H,W] in [-1,1].

    gamma None: each step adds noise of variance σ_τ(η)² (none at η = 0: deterministic);
    gamma = Γ [T]: Bao et al.'s optimal variance for λ = σ_τ(η) instead (at η = 0 their
    Analytic-DDIM, which adds σ̂² noise); head "npr"/"sn": the head's σ²(x_t) of a model that
    appends its h (heads.WithHeads) instead, noise even at η = 0 (Bao et al. 2022b). The step to
    x_{τ_1} adds noise of std at most last_sigma_cap(last_sigma_cap_y); the last step adds
    none. The api validates η, Γ and the head.
    """
    steps = check_timesteps(diff, timesteps)
    cap = last_sigma_cap_of(diff.T, len(steps), True, last_sigma_cap_y)
    if head is not None:
        return _sample_ddim_head(diff, model, x_T, noise=noise, steps=steps, eta=eta,
                                 clip_x0=clip_x0, head=head, cap=cap)
    noise_sigma2: list[float | None] = [None] * len(steps)
    if gamma is not None:
        noise_sigma2 = ddim_analytic_sigma2(diff, gamma, steps, eta).tolist()
    if cap is not None and len(steps) > 1:
        # σ of the step to x_{τ_1}: √σ̂² (analytic) or σ_τ(η), at most the cap
        lam = ddim_sigma(float(diff.alpha_bar[steps[1]]), float(diff.alpha_bar[steps[0]]), eta)
        sigma = lam if noise_sigma2[1] is None else math.sqrt(noise_sigma2[1])
        noise_sigma2[1] = min(sigma, cap) ** 2
    x = x_T.float()
    for i in range(len(steps) - 1, -1, -1):
        prev = steps[i - 1] if i > 0 else None
        x = ddim_step(diff, model, x, tau=steps[i], tau_prev=prev, eta=eta, noise=noise,
                      clip_x0=clip_x0, noise_sigma2=noise_sigma2[i] if i > 0 else None)
    return x.clamp(-1.0, 1.0)


# Bao et al. 2022b: DDIM's mean (λ = σ_τ(η)) with the noise σ² = λ² + c² Cov[x_0|x_t] per pixel
def _sample_ddim_head(diff: Diffusion, model: Model, x_T: Tensor, *, noise: Noise,
                      steps: list[int], eta: float, clip_x0: bool, head: HeadKind,
                      cap: float | None) -> Tensor:
    chain = chain_of(diff, steps)[1]
    x = x_T.float()
    C = x.shape[1]
    for i in range(len(steps) - 1, -1, -1):
        t = _time(steps[i], x.shape[0], x.device)
        out = model(x, t).float()
        out, h = out[:, :C], out[:, C:]  # an ε-model of fixed variance (the api checks)
        x0, eps = _x0_eps_of(diff, out, x, t, clip_x0)
        mean = _ddim_mean(diff, x0, eps, steps[i], steps[i - 1] if i > 0 else None, eta)
        if i > 0:  # the last step adds no noise
            k = _time(i, x.shape[0], x.device)
            cov = cov_x0(chain, k, h.double(), eps_from_output(diff, out, x, t), kind=head,
                         clip=clip_x0)
            std = ddim_sigma2(chain, k, cov, eta=eta).sqrt().to(x.dtype)
            if i == 1 and cap is not None:  # the step to x_{τ_1}
                std = std.clamp(max=cap)
            mean = mean + std * noise.randn(x.shape).to(x.device)
        x = mean
    return x.clamp(-1.0, 1.0)


# Song et al. 2021, eq. (13): the η = 0 ODE integrated forward, x_0 -> x_T
@torch.no_grad()
def ddim_encode(diff: Diffusion, model: Model, x0: Tensor, *,
                timesteps: Sequence[int]) -> Tensor:
    """Deterministic latent x_{τ_S} [B,C,H,W] of x_0 (inverse of sample_ddim with η=0, no clip).

    Step i maps ᾱ_{τ_{i−1}} (ᾱ = 1 for i = 0) to ᾱ_{τ_i} with ε̂ evaluated at the current point
    (x_{τ_{i−1}}, τ_{i−1}); the first step evaluates the model at (x_0, τ_0).
    """
    steps = check_timesteps(diff, timesteps)
    x = x0.float()
    for i in range(len(steps)):
        ab_next = float(diff.alpha_bar[steps[i]])
        if i == 0:
            # the model evaluated at x_0 taken as a point of step τ_0 gives the first ε̂
            x0_hat, eps = x, _pred_x0_eps(diff, model, x, steps[0], clip_x0=False)[1]
        else:
            x0_hat, eps = _pred_x0_eps(diff, model, x, steps[i - 1], clip_x0=False)
        x = math.sqrt(ab_next) * x0_hat + math.sqrt(1.0 - ab_next) * eps
    return x
