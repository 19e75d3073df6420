"""Closed-form denoisers and discretized Gaussian data shared by the maths tests."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ddpm_core.diffusion import (
    Diffusion,
    extract,
    predict_x0_from_eps,
    q_posterior,
)

GRID = torch.arange(256, dtype=torch.float64) / 127.5 - 1.0  # the 256 levels of [-1, 1]


def discretize(x: Tensor) -> Tensor:
    """Round x to the nearest of the 256 levels of [-1, 1] (uint8 data mapped to [-1, 1])."""
    return torch.round((x + 1.0) * 127.5).clamp(0, 255) / 127.5 - 1.0


def discretized_gaussian_probs(m: float, s: float) -> Tensor:
    """P(bin k) [256] of discretize(N(m, s²)): bins are grid ± 1/255 with open edge bins."""
    upper = torch.cat([GRID[:-1] + 1.0 / 255.0, torch.tensor([math.inf], dtype=torch.float64)])
    lower = torch.cat([torch.tensor([-math.inf], dtype=torch.float64), GRID[1:] - 1.0 / 255.0])
    cdf = torch.special.ndtr
    return cdf((upper - m) / s) - cdf((lower - m) / s)


def entropy_bits(p: Tensor) -> float:
    """Exact entropy −Σ p log2 p of a discrete distribution."""
    p = p[p > 0]
    return float(-(p * torch.log2(p)).sum())


class GaussianDenoiser(nn.Module):
    """Exact E[ε | x_t] for x_0 ~ N(m, s²) per dimension, in the diffusion's parameterization.

    x_t = √ᾱ x_0 + √(1−ᾱ) ε is jointly Gaussian with ε, so
    E[ε | x_t] = √(1−ᾱ) (x_t − √ᾱ m) / (ᾱ s² + 1 − ᾱ).
    For learned variances the variance channels are `var_value` everywhere, except that with
    var_type "learned" they are the exact log Var(x_{t−1} | x_t) of the one-step chain,
    log(β̃_t + c_t² Var(x_0 | x_t)) with c_t the x_0 coefficient of μ̃_t: the true reverse kernel
    of Gaussian data is Gaussian, so sampling with it is exact for any T.
    """

    def __init__(self, diff: Diffusion, m: float, s: float, var_value: float = 0.0) -> None:
        super().__init__()
        self.diff, self.m, self.s, self.var_value = diff, m, s, var_value
        self.calls = 0
        self.seen_t: list[Tensor] = []

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        self.calls += 1
        self.seen_t.append(t.detach().cpu())
        diff, x = self.diff, x_t.to(torch.float64)
        ab = extract(diff.alpha_bar, t, x.shape)
        eps = (1 - ab).sqrt() * (x - ab.sqrt() * self.m) / (ab * self.s**2 + 1 - ab)
        if diff.mean_type == "eps":
            out = eps
        else:
            x0 = predict_x0_from_eps(diff, x, t, eps)
            out = x0 if diff.mean_type == "x0" else q_posterior(diff, x0, x, t)[0]
        if diff.var_type == "learned":
            var_x0 = self.s**2 * (1 - ab) / (ab * self.s**2 + 1 - ab)
            c0, bt = (extract(v, t, x.shape) for v in (diff.posterior_coef_x0, diff.beta_tilde))
            out = torch.cat([out, torch.log(bt + c0**2 * var_x0).expand_as(out)], dim=1)
        elif diff.var_type == "learned_range":
            out = torch.cat([out, torch.full_like(out, self.var_value)], dim=1)
        return out.to(x_t.dtype)


def gaussian_gamma(diff: Diffusion, s: float) -> Tensor:
    """Γ_t = E‖E[ε | x_t]‖²/d [T] for x_0 ~ N(m, s²): Var(E[ε | x_t]) = (1−ᾱ)/(ᾱ s² + 1 − ᾱ)."""
    ab = diff.alpha_bar
    return (1 - ab) / (ab * s**2 + 1 - ab)


def gaussian_reverse_variance(ab: Tensor, ab_prev: Tensor, s: float) -> Tensor:
    """Var(x_prev | x_t) of one step ᾱ_prev -> ᾱ for x_0 ~ N(m, s²), by Gaussian conditioning.

    (x_0, x_prev, x_t) are jointly Gaussian: condition x_prev on x_t directly (no DDPM formulas).
    """
    var_prev = ab_prev * s**2 + 1 - ab_prev
    var_t = ab * s**2 + 1 - ab
    # x_t = √(ᾱ/ᾱ_prev) x_prev + noise of variance 1 − ᾱ/ᾱ_prev
    cov = (ab / ab_prev).sqrt() * var_prev
    return var_prev - cov**2 / var_t


class GenNoise:
    """The samplers' noise source as one torch.Generator's draws in call order."""

    def __init__(self, g: torch.Generator) -> None:
        self.g = g

    def randn(self, shape) -> Tensor:
        return torch.randn(tuple(shape), generator=self.g, device=self.g.device)


def ancestral(diff, model, shape, g, timesteps=None, *, x_T=None, **kw) -> Tensor:
    """samplers.sample_ancestral from x_T (default: g's first draw), its noise g's next ones."""
    from ddpm_core.samplers import sample_ancestral

    x_T = torch.randn(tuple(shape), generator=g) if x_T is None else x_T
    return sample_ancestral(diff, model, x_T, noise=GenNoise(g), timesteps=timesteps, **kw)


def ddim(diff, model, shape, timesteps, eta, g, *, x_T=None, sigma2=None, gamma=None,
         **kw) -> Tensor:
    """samplers.sample_ddim the same way; sigma2="analytic" adds the σ̂² noise of gamma."""
    from ddpm_core.samplers import sample_ddim

    x_T = torch.randn(tuple(shape), generator=g) if x_T is None else x_T
    return sample_ddim(diff, model, x_T, noise=GenNoise(g), timesteps=timesteps, eta=eta,
                       gamma=gamma if sigma2 == "analytic" else None, **kw)


def full_bound(diff, model, x0, **kw):
    """likelihood.bits_per_dim_at_steps of the full chain alone: {σ²: BpdResult}."""
    from ddpm_core.likelihood import bits_per_dim_at_steps

    return bits_per_dim_at_steps(diff, model, x0, steps=[diff.T], **kw)[diff.T]
