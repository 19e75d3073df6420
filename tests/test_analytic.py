"""Analytic-DPM's Γ and optimal reverse variance against Gaussian closed forms."""

import math

import numpy as np
import pytest
import torch
from analytic import GaussianDenoiser, gaussian_gamma, gaussian_reverse_variance

from ddpm_core.analytic import (
    analytic_sigma2,
    estimate_gamma,
    optimal_sigma2,
    optimal_sigma2_bounds,
)
from ddpm_core.chains import timestep_spacing
from ddpm_core.diffusion import Diffusion

pytestmark = pytest.mark.usefixtures("one_thread")

M_DATA, S_DATA = 0.1, 0.2  # x_0 ~ N(0.1, 0.2²): inside [-1, 1] up to 4.5 standard deviations


def _full_chain_beta_tilde_1(d):
    """β̃ at index 1 of the full chain from ᾱ: (1 − ᾱ_1)/(1 − ᾱ_2) · (1 − ᾱ_2/ᾱ_1)."""
    ab1, ab2 = float(d.alpha_bar[0]), float(d.alpha_bar[1])
    return (1 - ab1) / (1 - ab2) * (1 - ab2 / ab1)


def _gaussian_images(n, g):
    return (M_DATA + S_DATA * torch.randn(n, 1, 2, 2, generator=g, dtype=torch.float64)).float()


@pytest.mark.parametrize("mean_type", ["eps", "x0", "mu"])
def test_gamma_bao2022_monte_carlo_matches_closed_form(mean_type):
    """Γ_t = E‖ε̂‖²/d; per dimension ε̂ ~ N(0, Γ_t), so ε̂² has mean Γ_t and variance 2Γ_t²."""
    d = Diffusion.from_schedule("linear", 200, mean_type=mean_type)
    g = torch.Generator().manual_seed(0)
    M = 2000
    x0 = _gaussian_images(M + 10, g)
    model = GaussianDenoiser(d, M_DATA, S_DATA)
    gamma = estimate_gamma(d, model, x0[:M], seed=1, batch_size=1500)
    assert gamma.shape == (200,) and gamma.dtype == torch.float64
    assert model.calls == math.ceil(200 * M / 1500)  # several timesteps per call
    exact = gaussian_gamma(d, S_DATA)
    se = exact * math.sqrt(2 / (M * 4))
    z = (gamma - exact) / se
    print(f"{mean_type}: max |z| over 200 steps {float(z.abs().max()):.2f}, "
          f"Γ range {float(exact.min()):.4f}-{float(exact.max()):.4f}")
    assert float(z.abs().max()) < 5.0  # measured 3.3 (eps)
    assert abs(float(z.mean())) < 5 / math.sqrt(200)  # no bias across steps


def test_gamma_on_a_subset_of_timesteps_and_argument_errors():
    d = Diffusion.from_schedule("cosine", 50)
    x0 = _gaussian_images(64, torch.Generator().manual_seed(0))
    model = GaussianDenoiser(d, M_DATA, S_DATA)
    steps = timestep_spacing(50, 5)
    gamma = estimate_gamma(d, model, x0, seed=0, batch_size=1000, timesteps=steps)
    assert model.calls == 1 and sorted({int(v) for t in model.seen_t for v in t}) == steps
    assert bool(torch.isfinite(gamma[steps]).all())
    assert int(torch.isnan(gamma).sum()) == 50 - 5
    analytic_sigma2(d, gamma, steps)  # a chain on the estimated steps is fine
    with pytest.raises(ValueError, match="missing"):
        analytic_sigma2(d, gamma)
    with pytest.raises(AssertionError, match=r"\[-1, 1\]"):
        estimate_gamma(d, model, x0 * 255, seed=0, batch_size=10)
    with pytest.raises(ValueError, match="shape"):
        analytic_sigma2(d, gamma[:10])


@pytest.mark.parametrize("K", [None, 10, 100])
def test_optimal_sigma2_bao2022_thm1_is_the_true_reverse_variance(K):
    """For Gaussian data q(x_{τ_{k−1}} | x_{τ_k}) is Gaussian: σ*² with exact Γ is its variance."""
    d = Diffusion.from_schedule("linear", 1000)
    steps = list(range(1000)) if K is None else timestep_spacing(1000, K, "linspace")
    ab = d.alpha_bar[steps]
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    true_var = gaussian_reverse_variance(ab, ab_prev, S_DATA)
    chain = None if K is None else steps
    sigma2 = optimal_sigma2(d, gaussian_gamma(d, S_DATA), chain)
    assert torch.allclose(sigma2, true_var, rtol=1e-9, atol=0)
    # Theorem 2: β̃ ≤ σ*² ≤ β/α, and ≤ β̃ + ᾱ_{t−1} β²/(1−ᾱ)² for data in [−1, 1]
    lower, upper = optimal_sigma2_bounds(d, chain)
    beta = 1 - ab / ab_prev
    assert bool((lower[1:] <= true_var[1:]).all()) and bool((true_var <= upper).all())
    assert bool((true_var <= beta / (1 - beta)).all())
    # the clipped σ̂² leaves it alone (clipping is inactive); index 0 is the decoder's variance,
    # the FULL chain's β̃ at index 1 for every chain (Bao et al.'s ll/elbo.py)
    clipped = analytic_sigma2(d, gaussian_gamma(d, S_DATA), chain)
    assert torch.allclose(clipped[1:], true_var[1:], rtol=1e-9, atol=0)
    assert math.isclose(float(clipped[0]), _full_chain_beta_tilde_1(d), rel_tol=1e-12)
    # at small K the true variance is far above β̃ (why σ² = β̃ fails at 10 steps)
    if K == 10:
        ratio = float((true_var[1:] / lower[1:]).max())
        print(f"K=10: max σ*²/β̃ = {ratio:.1f}")
        assert ratio > 10


def test_analytic_sigma2_with_monte_carlo_gamma_is_within_monte_carlo_error():
    d = Diffusion.from_schedule("linear", 1000)
    steps = timestep_spacing(1000, 100, "linspace")
    M = 1000
    x0 = _gaussian_images(M, torch.Generator().manual_seed(2))
    gamma = estimate_gamma(d, GaussianDenoiser(d, M_DATA, S_DATA), x0, seed=3, batch_size=4000,
                           timesteps=steps)
    sigma2 = analytic_sigma2(d, gamma, steps)
    ab = d.alpha_bar[steps]
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    true_var = gaussian_reverse_variance(ab, ab_prev, S_DATA)
    alpha = ab / ab_prev
    # σ̂² − σ*² = β²/(α(1−ᾱ)) (Γ − Γ̂); clipping only moves σ̂² towards σ*² (inside the bounds)
    se = (1 - alpha) ** 2 / (alpha * (1 - ab)) * gaussian_gamma(d, S_DATA)[steps] * math.sqrt(
        2 / (M * 4))
    z = ((sigma2 - true_var) / se)[1:]
    rel = ((sigma2 - true_var) / true_var)[1:].abs()
    print(f"K=100, M={M}: max |z| {float(z.abs().max()):.2f}, max rel. error "
          f"{float(rel.max()):.3f}")
    assert float(z.abs().max()) < 5.0


def test_analytic_sigma2_clips_to_bao2022_thm2_bounds():
    d = Diffusion.from_schedule("cosine", 100)
    steps = timestep_spacing(100, 10, "linspace")
    lower, upper = optimal_sigma2_bounds(d, steps)
    ab = d.alpha_bar[steps]
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    beta = 1 - ab / ab_prev
    # Γ > 1 would make σ*² < β̃: clipped to β̃; Γ = 0 gives β/α, clipped to the data bound
    high = analytic_sigma2(d, torch.full((100,), 1.5, dtype=torch.float64), steps)
    low = analytic_sigma2(d, torch.zeros(100, dtype=torch.float64), steps)
    assert torch.equal(high[1:], lower[1:])
    assert torch.allclose(low[1:], torch.minimum(upper, beta / (1 - beta))[1:], rtol=1e-12)
    assert bool((low[1:] > lower[1:]).all())
    assert float(high[0]) == float(low[0])
    assert math.isclose(float(low[0]), _full_chain_beta_tilde_1(d), rel_tol=1e-12)
    assert not math.isclose(float(low[0]), float(lower[1]), rel_tol=1e-3)  # not the chain's own


def _two_point_true_reverse_variance(ab, ab_prev, n_nodes=80):
    """E_{x_t} Var(x_prev | x_t) for data uniform on {−1, 1}, by brute-force Gaussian algebra.

    Given x_0, (x_prev, x_t) is Gaussian: condition x_prev on x_t; given x_t alone x_prev is a
    mixture of the two conditionals with the posterior weights of x_0 = ±1; average the
    mixture's variance over x_t by Gauss-Hermite quadrature (x_0 = 1 by symmetry).
    """
    a = ab / ab_prev  # x_t = √a x_prev + √(1 − a) noise
    cond_var = (1 - ab_prev) - a * (1 - ab_prev) ** 2 / (1 - ab)
    # E[x_prev | x_t, x_0] = √ᾱ_prev x_0 + √a (1 − ᾱ_prev)/(1 − ᾱ) (x_t − √ᾱ x_0): its jump
    gap = 2 * (ab_prev.sqrt() - a.sqrt() * (1 - ab_prev) * ab.sqrt() / (1 - ab))
    nodes, weights = np.polynomial.hermite_e.hermegauss(n_nodes)
    nodes = torch.tensor(nodes, dtype=torch.float64)[None]
    weights = torch.tensor(weights / weights.sum(), dtype=torch.float64)[None]
    x_t = ab.sqrt()[:, None] + (1 - ab).sqrt()[:, None] * nodes
    p_plus = torch.sigmoid(2 * ab.sqrt()[:, None] * x_t / (1 - ab)[:, None])
    w_w = (weights * p_plus * (1 - p_plus)).sum(1)  # E_{x_t}[w₊ w₋]
    return cond_var + w_w * gap**2


@pytest.mark.parametrize("schedule,T,K", [("linear", 1000, None), ("linear", 1000, 10),
                                          ("cosine", 100, 20)])
def test_theorem2_upper_bound_bao2022_against_independent_formulas(schedule, T, K):
    """Bao et al. 2022, Theorem 2 with λ² = β̃ and data in [a, b] = [−1, 1]:
    σ*² ≤ λ² + (√ᾱ_{n−1} − √(1 − ᾱ_{n−1} − λ²) √(ᾱ_n/(1 − ᾱ_n)))² (b − a)²/4, written out here
    from ᾱ alone; and it is tight: data on {−1, 1} reach it where x_t forgets x_0 (ᾱ_n → 0)."""
    d = Diffusion.from_schedule(schedule, T)
    steps = list(range(T)) if K is None else timestep_spacing(T, K, "linspace")
    ab = d.alpha_bar[steps]
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    lam2 = (1 - ab_prev) * (1 - ab / ab_prev) / (1 - ab)
    paper = lam2 + (ab_prev.sqrt() - (1 - ab_prev - lam2).clamp(min=0).sqrt()
                    * (ab / (1 - ab)).sqrt()) ** 2 * (1 - (-1)) ** 2 / 4
    lower, upper = optimal_sigma2_bounds(d, None if K is None else steps)
    assert torch.allclose(lower, lam2, rtol=1e-12, atol=0)
    assert torch.allclose(upper, paper, rtol=1e-9, atol=1e-15)
    # two-point data: the true reverse variance lies in the bounds and meets the upper one
    true_var = _two_point_true_reverse_variance(ab, ab_prev)
    excess = ((true_var - lower) / (upper - lower))[1:]  # E Var(x_0 | x_t) ∈ [0, 1]
    assert bool((excess >= -1e-9).all()) and bool((excess <= 1 + 1e-9).all())
    noisy = ab[1:] < 1e-3
    print(f"{schedule} T={T} K={K}: E Var(x_0|x_t) at the noisy end "
          f"{float(excess[noisy].min()):.5f} ({int(noisy.sum())} steps), at step 1 "
          f"{float(excess[0]):.2e}")
    assert int(noisy.sum()) >= 1 and float(excess[noisy].min()) > 0.99
