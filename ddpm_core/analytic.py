"""The optimal reverse variance of Analytic-DPM (Bao, Li, Zhu & Zhang, ICLR 2022).

For the DDPM reverse process with λ² = β̃ (index convention and notation as in diffusion.py):

    Γ_t  = E_q ‖ε̂(x_t, t)‖² / d                         (one number per step, Monte Carlo)
    σ*_t² = β̃_t + β_t² / (α_t (1 − ᾱ_t)) · (1 − Γ_t)      (Theorem 1)
    β̃_t ≤ σ*_t² ≤ β̃_t + ᾱ_{t−1} β_t² / (1 − ᾱ_t)²        (Theorem 2, data in [−1, 1])

On a respaced chain τ_0 < … < τ_{K−1} every quantity is the chain's own: α'_k = ᾱ_{τ_k}/ᾱ_{τ_{k−1}},
β'_k = 1 − α'_k, ᾱ'_k = ᾱ_{τ_k}, β̃'_k = (1 − ᾱ'_{k−1}) β'_k / (1 − ᾱ'_k), with Γ taken at the
original index τ_k (the network sees τ_k). Γ is estimated once on training images and reused
for every chain.

The σ² choice "analytic" (ddpm_core.modes) needs Γ: samplers and bits/dim take it as an
explicit `gamma` argument (no hidden state). A chain's β', ᾱ' and β̃' are those of
chains.respace.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ddpm_core.chains import chain_of
from ddpm_core.diffusion import Diffusion, Model, predict_eps_from_x0, predict_x0_from_mu, q_sample
from ddpm_core.seeds import keyed_randn


def eps_from_output(diff: Diffusion, out: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
    """ε̂ [B,C,H,W] from the mean channels of the network output, whatever the mean type."""
    C = x_t.shape[1]
    mean_out = out[:, :C].to(torch.float64)
    if diff.mean_type == "eps":
        return mean_out
    x0 = mean_out if diff.mean_type == "x0" else predict_x0_from_mu(diff, x_t, t, mean_out)
    return predict_eps_from_x0(diff, x_t, t, x0)


# Bao et al. 2022, Theorem 1: Γ_n = β̄_n E_q ‖∇log q_n‖² / d, written with ε̂ = −√β̄_n ∇log q_n
@torch.no_grad()
def eps_norms(diff: Diffusion, model: Model, x0: Tensor, *, seed: int, batch_size: int,
              timesteps: Sequence[int] | None = None, indices: Sequence[int] | None = None
              ) -> Tensor:
    """‖ε̂(x_t, t)‖²/d [M, T] float64 of each image m of x0 [M,C,H,W] at each step τ.

    One noise draw per image and timestep τ, from (seed, indices[m], τ) alone (indices default
    0..M-1; seeds.keyed_randn); NaN at the steps not in `timesteps` (default all). Every network
    call holds `batch_size` (image, timestep) pairs, t-major (several timesteps per call when
    M < batch_size).
    """
    assert x0.ndim == 4, f"x0 must be [M,C,H,W], got {tuple(x0.shape)}"
    assert float(x0.min()) >= -1.0 and float(x0.max()) <= 1.0, "x0 must lie in [-1, 1]"
    steps = chain_of(diff, timesteps)[0]
    M, device = x0.shape[0], x0.device
    keys = list(range(M)) if indices is None else [int(i) for i in indices]
    # (t, image) pairs, t-major: pair p is image p % M at step steps[p // M]
    pairs = [(m, tau) for tau in steps for m in range(M)]
    norms = torch.full((M, diff.T), float("nan"), dtype=torch.float64)
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        t = torch.tensor([tau for _, tau in chunk], device=device)
        x0_b = x0[[m for m, _ in chunk]].to(torch.float64)
        eps = keyed_randn(seed, [(keys[m], tau) for m, tau in chunk], x0.shape[1:],
                          device=device)
        x_t = q_sample(diff, x0_b, t, eps)
        eps_hat = eps_from_output(diff, model(x_t.to(x0.dtype), t), x_t, t)
        norms[[m for m, _ in chunk], t.cpu()] = eps_hat.pow(2).mean(dim=(1, 2, 3)).cpu()
    return norms


def gamma_of(norms: Tensor) -> Tensor:
    """Γ_t [T] float64: the mean over images of eps_norms' rows, added in image order."""
    sums = torch.zeros(norms.shape[1], dtype=torch.float64)
    for row in norms:
        sums += row
    return sums / len(norms)


def estimate_gamma(diff: Diffusion, model: Model, x0: Tensor, *, seed: int, batch_size: int,
                   timesteps: Sequence[int] | None = None) -> Tensor:
    """Γ_t = E‖ε̂(x_t, t)‖²/d [T] float64 by Monte Carlo over the M images x0 [M,C,H,W]
    (eps_norms' draws; NaN at the indices not in `timesteps`)."""
    return gamma_of(eps_norms(diff, model, x0, seed=seed, batch_size=batch_size,
                              timesteps=timesteps))


# Bao et al. 2022, Theorem 1 with λ² = β̃: σ*² = β̃ + β²/(α(1−ᾱ)) · (1 − Γ)
def optimal_sigma2(diff: Diffusion, gamma: Tensor, timesteps: Sequence[int] | None = None
                   ) -> Tensor:
    """Unclipped σ*² [K] float64 of the chain τ (default all T steps); Γ [T] at original indices."""
    steps, c = chain_of(diff, timesteps)
    g = _gamma_at(gamma, diff, steps)
    return c.beta_tilde + c.betas**2 / (c.alphas * (1.0 - c.alpha_bar)) * (1.0 - g)


# Bao et al. 2022, Theorem 2: β̃ ≤ σ*² ≤ β̃ + ᾱ_{t−1} β² / (1 − ᾱ)² for data in [−1, 1]
def optimal_sigma2_bounds(diff: Diffusion, timesteps: Sequence[int] | None = None
                          ) -> tuple[Tensor, Tensor]:
    """Lower and upper bound [K] float64 of σ*² on the chain τ for data in [−1, 1]^d."""
    c = chain_of(diff, timesteps)[1]
    return c.beta_tilde, c.beta_tilde + c.alpha_bar_prev * c.betas**2 / (1.0 - c.alpha_bar) ** 2


def _gamma_at(gamma: Tensor, diff: Diffusion, steps: list[int]) -> Tensor:
    gamma = torch.as_tensor(gamma, dtype=torch.float64).cpu()
    if gamma.shape != (diff.T,):
        raise ValueError(f"gamma must have shape [T] = [{diff.T}], got {tuple(gamma.shape)}")
    g = gamma[steps]
    if not bool(torch.isfinite(g).all()):
        raise ValueError("gamma is missing (NaN) at some timesteps of this chain; "
                         "estimate_gamma with timesteps=None or these timesteps")
    return g


# Bao et al. 2022, Theorems 1-2 (their code clips σ*² to the bounds); index 0 as their ll/elbo.py
def analytic_sigma2(diff: Diffusion, gamma: Tensor, timesteps: Sequence[int] | None = None
                    ) -> Tensor:
    """σ̂² [K] float64 per step of the chain τ: σ*² clipped to its bounds.

    Index 0 (the decoder p(x_0 | x_{τ_0}); sampling adds no noise there) is the FULL chain's
    diff.decoder_variance (β̃ at index 1) for every chain, as for every σ² choice of the bound
    (likelihood.py) and in Bao et al.'s code: not the respaced chain's own β̃' at index 1.
    """
    lower, upper = optimal_sigma2_bounds(diff, timesteps)
    sigma2 = torch.minimum(torch.maximum(optimal_sigma2(diff, gamma, timesteps), lower), upper)
    sigma2[0] = diff.decoder_variance
    return sigma2


# Bao et al. 2022, Theorems 1-2 for the DDIM family: λ² = σ_τ(η)² (Song et al. 2021, eq. 16)
def ddim_analytic_sigma2(diff: Diffusion, gamma: Tensor, timesteps: Sequence[int],
                         eta: float) -> Tensor:
    """σ̂² [K] float64 of DDIM steps τ_k -> τ_{k−1} with λ = σ_τ(η): σ*² clipped to its bounds.

    σ*² = λ² + (√((1−ᾱ_k)/α'_k) − √(1−ᾱ_{k−1}−λ²))² (1 − Γ), clipped to [λ², λ² + the smaller
    of (√((1−ᾱ_k)/α'_k) − √(1−ᾱ_{k−1}−λ²))² and (√ᾱ_{k−1} − √(1−ᾱ_{k−1}−λ²) √(ᾱ_k/(1−ᾱ_k)))²]
    (data in [−1, 1]). η = 1 is analytic_sigma2; index 0 (the deterministic last step) is unused.
    """
    steps, c = chain_of(diff, timesteps)
    alpha_bar, alpha_bar_prev, alpha = c.alpha_bar, c.alpha_bar_prev, c.alphas
    lam2 = eta**2 * (1.0 - alpha_bar_prev) * (1.0 - alpha) / (1.0 - alpha_bar)
    rest = (1.0 - alpha_bar_prev - lam2).clamp(min=0.0).sqrt()
    coef_eps = ((1.0 - alpha_bar) / alpha).sqrt() - rest
    coef_x0 = alpha_bar_prev.sqrt() - rest * (alpha_bar / (1.0 - alpha_bar)).sqrt()
    sigma2 = lam2 + coef_eps**2 * (1.0 - _gamma_at(gamma, diff, steps))
    upper = lam2 + torch.minimum(coef_eps**2, coef_x0**2)
    return torch.minimum(torch.maximum(sigma2, lam2), upper)
