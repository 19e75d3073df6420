"""Ancestral and DDIM samplers on Gaussian data with the exact denoiser."""

import math

import numpy as np
import pytest
import torch
from analytic import GaussianDenoiser, GenNoise, ancestral, ddim, discretize, gaussian_gamma

from ddpm_core.analytic import analytic_sigma2, ddim_analytic_sigma2
from ddpm_core.chains import respace, respaced_betas, timestep_spacing
from ddpm_core.diffusion import Diffusion, p_mean_variance_from_output
from ddpm_core.modes import SPACINGS
from ddpm_core.samplers import ddim_encode, ddim_sigma, ddim_step, prior_kl_at

M, S = 0.1, 0.25  # data N(M, S²): |x| > 1 is > 3.6 standard deviations away


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("T,S", [(1000, 10), (1000, 50), (1000, 300), (1000, 1000), (4000, 100),
                                 (17, 7), (200, 17), (10, 1)])
def test_timestep_spacing_equals_each_definition(T, S):
    """The definitions of REFERENCE.md "Timestep spacing", written out independently."""
    leading = [k * (T // S) for k in range(S)]  # diffusers' leading
    quad = sorted({int(v) for v in np.linspace(0, math.sqrt(0.8 * T), S) ** 2})
    lin = [int(round(v)) for v in np.linspace(0, T - 1, S)]
    trailing = sorted(int(round(T - i * T / S)) - 1 for i in range(S))
    assert timestep_spacing(T, S, "leading") == leading
    assert timestep_spacing(T, S, "ddim_quadratic") == quad
    assert timestep_spacing(T, S, "linspace") == lin
    assert timestep_spacing(T, S, "trailing") == trailing
    assert timestep_spacing(T, S) == trailing  # the default starts at T − 1
    for spacing in SPACINGS:
        steps = timestep_spacing(T, S, spacing)
        assert all(b > a for a, b in zip(steps, steps[1:], strict=False)) and steps[0] >= 0
    assert len(leading) == len(lin) == len(trailing) == S and trailing[-1] == T - 1
    if S > 1:
        assert lin[0] == 0 and lin[-1] == T - 1
        # leading and the DDIM code's quadratic stop early: at (S − 1)·(T//S) (T − T/S when S
        # divides T) and at 0.8T
        assert leading[-1] == (S - 1) * (T // S)
        if T % S == 0 and S < T:
            assert leading[-1] == T - T // S < T - 1
        assert timestep_spacing(T, S, "ddim_quadratic")[-1] == int(0.8 * T) < T - 1


def test_timestep_spacing_known_lists_and_errors():
    assert timestep_spacing(1000, 10, "trailing") == list(range(99, 1000, 100))
    assert timestep_spacing(1000, 10, "leading") == list(range(0, 1000, 100))
    assert timestep_spacing(1000, 4, "linspace") == [0, 333, 666, 999]
    # leading has exactly S steps when S does not divide T (stride 1000 // 300 = 3; the DDIM
    # code's range(0, 1000, 3) would have 334)
    assert timestep_spacing(1000, 300, "leading") == list(range(0, 900, 3))
    # the DDIM code repeats indices at S = 100 (identity steps); we drop the repeats
    ddim_code = (np.linspace(0, np.sqrt(1000 * 0.8), 100) ** 2).astype(int).tolist()
    assert timestep_spacing(1000, 100, "ddim_quadratic") == sorted(set(ddim_code))
    assert len(ddim_code) == 100 and len(set(ddim_code)) == 96
    # the api validates (api.timesteps_for, test_api); the library asserts
    with pytest.raises(AssertionError, match="1 <= S <= T"):
        timestep_spacing(10, 11)
    with pytest.raises(AssertionError, match="unknown spacing"):
        timestep_spacing(10, 5, "uniform")  # type: ignore[arg-type]


def test_prior_kl_at_chain_start_ho2020_L_T():
    lin = Diffusion.from_schedule("linear", 1000)
    cos = Diffusion.from_schedule("cosine", 1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4000, dtype=torch.float64, generator=g) * 2 - 1
    for d, t in ((lin, 999), (lin, 900), (cos, 800)):
        # worst case |x_0| = 1 bounds the KL of every x_0 in [-1, 1]; closed form vs quadrature
        ab = float(d.alpha_bar[t])
        kl = prior_kl_at(d, t)
        per_x0 = [0.5 * (ab * v**2 - ab - math.log1p(-ab)) / math.log(2) for v in x0.tolist()]
        assert max(per_x0) <= kl + 1e-15
        assert math.isclose(kl, -0.5 * math.log1p(-ab) / math.log(2), rel_tol=1e-12)
        mean_sq = float((x0**2).mean())
        assert math.isclose(prior_kl_at(d, t, mean_sq), sum(per_x0) / len(per_x0),
                            rel_tol=1e-9)
    start_trailing = prior_kl_at(lin, timestep_spacing(1000, 50)[-1])
    start_leading = prior_kl_at(lin, timestep_spacing(1000, 10, "leading")[-1])
    start_quad_cos = prior_kl_at(cos, timestep_spacing(1000, 50, "ddim_quadratic")[-1])
    print(f"prior KL at the chain start: linear trailing {start_trailing:.3e}, linear leading S=10 "
          f"{start_leading:.3e}, cosine ddim_quadratic {start_quad_cos:.4f} bits/dim")
    assert 1e-6 < start_trailing < 1e-4  # the paper's L_T ≈ 1e-5 bits/dim
    assert start_leading > 3 * start_trailing
    assert start_quad_cos > 0.05  # ᾱ_{0.8T} = 0.093 under the cosine schedule
    with pytest.raises(ValueError, match="t_index"):
        prior_kl_at(lin, 1000)


def test_respaced_betas_nichol_eq19_keep_alpha_bar_at_kept_steps():
    d = Diffusion.from_schedule("cosine", 200)
    steps = timestep_spacing(200, 17, "ddim_quadratic")
    sub = respace(d, steps)
    assert torch.allclose(sub.alpha_bar, d.alpha_bar[steps], rtol=1e-12, atol=0)
    assert torch.allclose(respaced_betas(d, range(200)), d.betas, rtol=1e-10, atol=1e-15)
    with pytest.raises(AssertionError):
        respaced_betas(d, [0, 5, 5])
    with pytest.raises(AssertionError):
        respaced_betas(d, [0, 200])


def test_respace_keeps_alpha_bar_exactly_when_one_minus_the_ratio_rounds_to_one():
    # T = 10 linear (β range rescaled, clipped at 0.999): ᾱ_9/ᾱ_0 = 1.5e-17, so 1 − ratio is 1.0
    # in float64 and a cumprod of 1 − β' would give ᾱ' = 0 (x̂_0 = x_t/√0: NaN in the K = 2 bound).
    d = Diffusion.from_schedule("linear", 10)
    sub = respace(d, [0, 9])
    assert torch.equal(sub.alpha_bar, d.alpha_bar[[0, 9]])
    assert float(sub.alphas[1]) > 0 and bool(torch.isfinite(sub.sqrt_recipm1_alpha_bar).all())
    x = ancestral(d, lambda x, t: torch.zeros_like(x), (4, 1, 2, 2),
                         torch.Generator().manual_seed(0), timesteps=[0, 9], sigma2="fixed_small")
    assert bool(torch.isfinite(x).all())


def _predicted_moments(d, steps, exact_var=False):
    """Mean and variance of the ancestral sampler's output by the linear-Gaussian recursion."""
    mean, var = 0.0, 1.0
    for i in range(len(steps) - 1, -1, -1):
        ab = float(d.alpha_bar[steps[i]])
        ab_prev = float(d.alpha_bar[steps[i - 1]]) if i > 0 else 1.0
        D = ab * S**2 + 1 - ab
        c0 = math.sqrt(ab_prev) * (1 - ab / ab_prev) / (1 - ab)
        ct = math.sqrt(ab / ab_prev) * (1 - ab_prev) / (1 - ab)
        slope = c0 * math.sqrt(ab) * S**2 / D + ct  # x_{i-1} mean = slope · x_i + offset
        offset = c0 * (M - math.sqrt(ab) * S**2 * math.sqrt(ab) * M / D)
        sigma2 = (1 - ab / ab_prev) * (1 - ab_prev) / (1 - ab) if i > 0 else 0.0
        if exact_var and i > 0:
            sigma2 += c0**2 * S**2 * (1 - ab) / D
        mean, var = slope * mean + offset, slope**2 * var + sigma2
    return mean, var


@pytest.mark.parametrize("S_steps", [None, 25])
def test_ancestral_sampling_ho2020_alg2_matches_gaussian_recursion(S_steps):
    d = Diffusion.from_schedule("linear", 200, var_type="fixed_small")
    steps = list(range(200)) if S_steps is None else timestep_spacing(200, S_steps)
    N = 16000
    x = ancestral(d, GaussianDenoiser(d, M, S), (N, 1, 2, 2),
                         torch.Generator().manual_seed(1),
                         timesteps=None if S_steps is None else steps,
                         last_sigma_cap_y=None).double()
    mean, var = _predicted_moments(d, steps)
    se_mean, se_var = math.sqrt(var / x.numel()), var * math.sqrt(2 / x.numel())
    print(f"S={len(steps)}: sample mean {float(x.mean()):.5f} (pred {mean:.5f}), "
          f"var {float(x.var()):.5f} (pred {var:.5f}, data {S**2})")
    assert abs(float(x.mean()) - mean) < 5 * se_mean and abs(mean - M) < 0.005
    assert abs(float(x.var()) - var) < 5 * se_var
    # σ² = β̃ is narrower than the true reverse kernel: 12% low at T = 200, about half the
    # data variance with 25 respaced steps
    assert (0.85 if S_steps is None else 0.4) * S**2 < var < S**2


def test_ancestral_sampling_with_exact_reverse_variance_reproduces_data():
    d = Diffusion.from_schedule("linear", 200, var_type="learned")
    N = 16000
    x = ancestral(d, GaussianDenoiser(d, M, S), (N, 1, 2, 2),
                         torch.Generator().manual_seed(2)).double()
    mean, var = _predicted_moments(d, list(range(200)), exact_var=True)
    # exact kernels: the output is E[x_0 | x_1] (no noise on the last step), of variance
    # S² − Var(x_0 | x_1), up to the prior mismatch N(0, I) vs q(x_T) (ᾱ_T = 4.5e-5)
    ab1 = float(d.alpha_bar[0])
    expected_var = S**2 - S**2 * (1 - ab1) / (ab1 * S**2 + 1 - ab1)
    assert abs(var - expected_var) < 1e-6 and abs(mean - M) < 1e-6
    se_mean, se_var = S / math.sqrt(x.numel()), S**2 * math.sqrt(2 / x.numel())
    print(f"exact-variance ancestral: mean {float(x.mean()):.5f} var {float(x.var()):.5f} "
          f"(expected {expected_var:.5f})")
    assert abs(float(x.mean()) - M) < 5 * se_mean
    assert abs(float(x.var()) - expected_var) < 5 * se_var, (float(x.var()), expected_var)


@pytest.mark.parametrize("K", [10, 25])
def test_analytic_variance_sampling_bao2022_matches_the_exact_reverse_kernel(K):
    """With exact Γ, σ̂² is the true Var(x_{τ_{k−1}} | x_{τ_k}) of Gaussian data on any chain."""
    d = Diffusion.from_schedule("linear", 200, var_type="fixed_small")
    steps = timestep_spacing(200, K, "linspace")  # ends at 0: the output should be the data
    model = GaussianDenoiser(d, M, S)
    N = 16000
    x = ancestral(d, model, (N, 1, 2, 2), torch.Generator().manual_seed(3),
                         timesteps=steps, sigma2="analytic", gamma=gaussian_gamma(d, S),
                         last_sigma_cap_y=None).double()
    mean, var = _predicted_moments(d, steps, exact_var=True)
    small_var = _predicted_moments(d, steps)[1]
    se_mean, se_var = math.sqrt(var / x.numel()), var * math.sqrt(2 / x.numel())
    print(f"K={K} analytic: sample var {float(x.var()):.5f} (exact-kernel recursion {var:.5f}, "
          f"σ² = β̃ gives {small_var:.5f}, data {S**2})")
    assert abs(float(x.mean()) - mean) < 5 * se_mean
    assert abs(float(x.var()) - var) < 5 * se_var
    assert small_var < 0.75 * var  # β̃ undershoots on a short chain; σ̂² does not
    assert abs(var - S**2) < 0.01 * S**2


def _ddim_moments(d, steps, eta, noise_var):
    """Mean and variance of DDIM's output on N(M, S²) data by the linear-Gaussian recursion."""
    mean, var = 0.0, 1.0
    for i in range(len(steps) - 1, -1, -1):
        ab = float(d.alpha_bar[steps[i]])
        ab_prev = float(d.alpha_bar[steps[i - 1]]) if i > 0 else 1.0
        D = ab * S**2 + 1 - ab
        a, b = math.sqrt(ab) * S**2 / D, (1 - ab) * M / D  # x̂_0 = a x + b
        lam2 = ddim_sigma(ab, ab_prev, eta) ** 2
        r = math.sqrt(max(1 - ab_prev - lam2, 0.0)) / math.sqrt(1 - ab)
        # x_prev = √ᾱ_prev x̂_0 + r (x − √ᾱ x̂_0) + noise
        slope = math.sqrt(ab_prev) * a + r * (1 - math.sqrt(ab) * a)
        offset = (math.sqrt(ab_prev) - r * math.sqrt(ab)) * b
        mean, var = slope * mean + offset, slope**2 * var + (noise_var[i] if i > 0 else 0.0)
    return mean, var


def test_ddim_analytic_variance_bao2022_is_the_true_kernel_variance_of_song_eq7():
    """q_λ(x_prev | x_t) = ∫ q_λ(x_prev | x_t, x_0) q(x_0 | x_t) dx_0, Gaussian for Gaussian x_0."""
    d = Diffusion.from_schedule("linear", 1000)
    steps = timestep_spacing(1000, 20, "linspace")
    gamma = gaussian_gamma(d, S)
    ab = d.alpha_bar[steps]
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    for eta in (0.3, 1.0):
        lam2 = torch.tensor([ddim_sigma(float(a), float(p), eta) ** 2
                             for a, p in zip(ab, ab_prev, strict=True)], dtype=torch.float64)
        # Song et al. 2021, eq. (7): the x_0 coefficient of q_λ's mean given x_t
        c0 = ab_prev.sqrt() - (1 - ab_prev - lam2).sqrt() * (ab / (1 - ab)).sqrt()
        true_var = lam2 + c0**2 * S**2 * (1 - ab) / (ab * S**2 + 1 - ab)
        got = ddim_analytic_sigma2(d, gamma, steps, eta)
        assert torch.allclose(got[1:], true_var[1:], rtol=1e-9, atol=0)
        assert bool((got[1:] > lam2[1:]).all())
    assert torch.allclose(ddim_analytic_sigma2(d, gamma, steps, 1.0)[1:],
                          analytic_sigma2(d, gamma, steps)[1:], rtol=1e-10)


def test_ddim_eta_half_with_analytic_variance_matches_recursion():
    d = Diffusion.from_schedule("linear", 200)
    steps = timestep_spacing(200, 10, "linspace")
    model = GaussianDenoiser(d, M, S)
    gamma = gaussian_gamma(d, S)
    N = 16000
    x = ddim(d, model, (N, 1, 2, 2), steps, 0.5, torch.Generator().manual_seed(4),
                    sigma2="analytic", gamma=gamma, last_sigma_cap_y=None).double()
    noise_var = ddim_analytic_sigma2(d, gamma, steps, 0.5).tolist()
    mean, var = _ddim_moments(d, steps, 0.5, noise_var)
    plain = _ddim_moments(d, steps, 0.5, [ddim_sigma(float(d.alpha_bar[steps[i]]),
                                                     float(d.alpha_bar[steps[i - 1]]), 0.5) ** 2
                                          if i > 0 else 0.0 for i in range(len(steps))])[1]
    se_mean, se_var = math.sqrt(var / x.numel()), var * math.sqrt(2 / x.numel())
    print(f"DDIM η=0.5 K=10 analytic: sample var {float(x.var()):.5f} (recursion {var:.5f}, "
          f"σ_τ(η)² noise gives {plain:.5f}, data {S**2})")
    assert abs(float(x.mean()) - mean) < 5 * se_mean
    assert abs(float(x.var()) - var) < 5 * se_var
    assert abs(var - S**2) < 0.01 * S**2 < abs(plain - S**2)


def test_ancestral_is_reproducible_and_calls_model_with_original_indices():
    d = Diffusion.from_schedule("linear", 100, var_type="fixed_large")
    steps = timestep_spacing(100, 7, "ddim_quadratic")
    model = GaussianDenoiser(d, M, S)
    a = ancestral(d, model, (4, 1, 2, 2), torch.Generator().manual_seed(0), steps)
    assert [int(t[0]) for t in model.seen_t] == steps[::-1]
    b = ancestral(d, model, (4, 1, 2, 2), torch.Generator().manual_seed(0), steps)
    c = ancestral(d, model, (4, 1, 2, 2), torch.Generator().manual_seed(1), steps)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.abs().max()) <= 1.0


def test_respaced_mu_parameterization_equals_eps_parameterization():
    base = Diffusion.from_schedule("linear", 100, var_type="fixed_small")
    steps = timestep_spacing(100, 10, "leading")
    x_T = torch.randn(8, 1, 2, 2, generator=torch.Generator().manual_seed(4))
    outs = []
    for mean_type in ("eps", "mu"):
        d = base.with_mean_type(mean_type)
        outs.append(ancestral(d, GaussianDenoiser(d, M, S), x_T.shape,
                                     torch.Generator().manual_seed(5), steps, x_T=x_T))
    assert torch.allclose(outs[0], outs[1], atol=1e-5)


def test_ddim_sigma_song_eq16_eta1_is_posterior_variance():
    d = Diffusion.from_schedule("linear", 1000)
    for t in (1, 10, 500, 999):
        s2 = ddim_sigma(float(d.alpha_bar[t]), float(d.alpha_bar[t - 1]), 1.0) ** 2
        assert math.isclose(s2, float(d.beta_tilde[t]), rel_tol=1e-9)
    steps = timestep_spacing(1000, 20, "ddim_quadratic")
    sub = respace(d, steps)
    for i in range(1, 20):
        s2 = ddim_sigma(float(d.alpha_bar[steps[i]]), float(d.alpha_bar[steps[i - 1]]), 1.0) ** 2
        assert math.isclose(s2, float(sub.beta_tilde[i]), rel_tol=1e-9)
    assert ddim_sigma(0.5, 0.7, 0.0) == 0.0


@pytest.mark.parametrize("tau,tau_prev", [(500, 499), (500, 300)])
def test_ddim_eta1_step_song_eq12_has_ancestral_mean_and_posterior_variance(tau, tau_prev):
    d = Diffusion.from_schedule("linear", 1000, var_type="fixed_small")
    model = GaussianDenoiser(d, M, S)
    N = 40000
    x = torch.full((N, 1, 1, 1), 0.4)
    out = ddim_step(d, model, x, tau=tau, tau_prev=tau_prev, eta=1.0,
                    noise=GenNoise(torch.Generator().manual_seed(0))).double()
    sub = respace(d, [tau_prev, tau])
    t1 = torch.ones(1, dtype=torch.long)
    p = p_mean_variance_from_output(sub, model(x[:1], torch.tensor([tau])), x[:1], t1)
    var = float(p["variance"])
    assert math.isclose(var, ddim_sigma(float(d.alpha_bar[tau]), float(d.alpha_bar[tau_prev]),
                                        1.0) ** 2, rel_tol=1e-5)
    assert abs(float(out.mean()) - float(p["mean"])) < 5 * math.sqrt(var / N)
    assert abs(float(out.var()) - var) < 5 * var * math.sqrt(2 / N)


def test_ddim_eta0_is_deterministic_and_eta1_is_not():
    d = Diffusion.from_schedule("linear", 100)
    model = GaussianDenoiser(d, M, S)
    steps = timestep_spacing(100, 8, "ddim_quadratic")
    x_T = torch.randn(16, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    a = ddim(d, model, x_T.shape, steps, 0.0, torch.Generator().manual_seed(1), x_T=x_T)
    b = ddim(d, model, x_T.shape, steps, 0.0, torch.Generator().manual_seed(2), x_T=x_T)
    c = ddim(d, model, x_T.shape, steps, 1.0, torch.Generator().manual_seed(1), x_T=x_T)
    e = ddim(d, model, x_T.shape, steps, 1.0, torch.Generator().manual_seed(2), x_T=x_T)
    assert torch.equal(a, b) and not torch.equal(c, e)


@pytest.mark.parametrize("mean_type", ["eps", "x0"])
def test_ddim_encode_decode_round_trip_song_eq13(mean_type):
    d = Diffusion.from_schedule("linear", 1000, mean_type=mean_type)
    model = GaussianDenoiser(d, M, S)
    g = torch.Generator().manual_seed(0)
    x0 = discretize(M + S * torch.randn(256, 1, 2, 2, generator=g)).float()
    errors = {}
    for n in (200, 1000):
        steps = timestep_spacing(1000, n, "leading")
        x_T = ddim_encode(d, model, x0, timesteps=steps)
        x_rec = ddim(d, model, x0.shape, steps, 0.0, g, clip_x0=False, x_T=x_T)
        errors[n] = float((x_rec - x0).abs().max())
    print(f"DDIM round trip max |error|: {errors}")  # measured 0.045 (S=200), 0.0081 (S=1000)
    assert errors[1000] < 0.02 and errors[1000] < errors[200] < 0.1


class _OracleEps(torch.nn.Module):
    """ε of q(x_t | x_0) for a known x_0: the DDIM step then samples q_σ(x_prev | x_t, x_0)."""

    def __init__(self, diff, x0):
        super().__init__()
        self.diff, self.x0 = diff, x0

    def forward(self, x_t, t):
        ab = self.diff.alpha_bar[t].reshape(-1, 1, 1, 1)
        return ((x_t.double() - ab.sqrt() * self.x0) / (1 - ab).sqrt()).float()


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("tau,tau_prev", [(500, 499), (399, 299), (999, 899), (0, None)])
def test_ddim_song2021_eq7_q_sigma_composed_with_q_xt_given_x0_is_q_xprev_given_x0(
        eta, tau, tau_prev):
    """Song et al. 2021, Lemma 1: for every σ = σ_τ(η), ∫ q_σ(x_prev | x_t, x_0) q(x_t | x_0) dx_t
    = N(√ᾱ_prev x_0, (1 − ᾱ_prev) I): the library's DDIM step from x_t ~ q(x_t | x_0) with the
    exact ε gives that marginal (Monte Carlo), while Cov(x_prev, x_t) = √(1−ᾱ_prev−σ²)√(1−ᾱ)
    shows η still changes the joint. A pair τ_prev < τ − 1 is a respaced chain's step."""
    d = Diffusion.from_schedule("linear", 1000)
    N = 50000
    g = torch.Generator().manual_seed(int(10 * eta) + tau)
    x0 = torch.tensor([-0.8, 0.3, 1.0], dtype=torch.float64).reshape(1, 3, 1, 1).expand(
        N, 3, 1, 1)
    ab = float(d.alpha_bar[tau])
    ab_prev = 1.0 if tau_prev is None else float(d.alpha_bar[tau_prev])
    sigma2 = ddim_sigma(ab, ab_prev, eta) ** 2
    assert sigma2 <= 1 - ab_prev + 1e-15  # σ_τ(η)² ≤ 1 − ᾱ_prev for η ≤ 1: the step exists
    x_t = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * torch.randn(x0.shape, generator=g,
                                                               dtype=torch.float64)
    out = ddim_step(d, _OracleEps(d, x0), x_t.float(), tau=tau, tau_prev=tau_prev, eta=eta,
                    noise=GenNoise(g), clip_x0=False).double()
    var = 1 - ab_prev
    mean_err = (out.mean(0) - math.sqrt(ab_prev) * x0[0]).flatten()
    if var == 0:  # ᾱ_prev = 1: the step returns x_0 itself
        assert float(mean_err.abs().max()) < 1e-5 and float(out.var(0).max()) < 1e-10
        return
    var_got = out.var(0).flatten()
    cov = ((out - out.mean(0)) * (x_t - x_t.mean(0))).mean(0).flatten()
    cov_want = math.sqrt(max(1 - ab_prev - sigma2, 0.0)) * math.sqrt(1 - ab)
    print(f"η={eta}, step {tau} -> {tau_prev}: var {float(var_got.mean()):.5f} vs "
          f"{var:.5f}, cov {float(cov.mean()):.5f} vs {cov_want:.5f}")
    assert float(mean_err.abs().max()) < 5 * math.sqrt(var / N)
    assert float((var_got - var).abs().max()) < 5 * var * math.sqrt(2 / N)
    assert float((cov - cov_want).abs().max()) < 5 * math.sqrt(var * (1 - ab) / N) + 1e-6


@pytest.mark.parametrize("S", [30, 50, 7, 1000])
def test_timestep_spacing_matches_diffusers_set_timesteps(S):
    """leading / linspace / trailing are diffusers' DDIMScheduler and DDPMScheduler names: the
    same S steps (S = 30 at T = 1000: leading is 0, 33, …, 957, not the DDIM code's 31 steps)."""
    from diffusers import DDIMScheduler, DDPMScheduler

    T = 1000
    for spacing in ("leading", "linspace", "trailing"):
        ours = timestep_spacing(T, S, spacing)
        for cls in (DDIMScheduler, DDPMScheduler):
            sched = cls(num_train_timesteps=T, timestep_spacing=spacing)
            sched.set_timesteps(S)
            assert ours == sorted(int(v) for v in sched.timesteps), (cls.__name__, spacing)
        assert len(ours) == S
    if S == 30:
        assert timestep_spacing(T, S, "leading")[-1] == 957


# ----------------------------------------------------------------------------- issue 16:
# the last sampling step's σ cap and Analytic-DDIM (Bao et al. 2022 and their code)


class _Recorder(torch.nn.Module):
    """The Gaussian denoiser, keeping every input x_t (the sampler's state before each step)."""

    def __init__(self, inner: GaussianDenoiser) -> None:
        super().__init__()
        self.inner, self.inputs = inner, []

    def forward(self, x, t):
        self.inputs.append(x.clone())
        return self.inner(x, t)


def _step_noise(g: torch.Generator, shape, n_noisy: int) -> list[torch.Tensor]:
    """The noise draws z_i of steps i = K−1 … 1, in the sampler's order (x_T given)."""
    return [torch.randn(shape, generator=g) for _ in range(n_noisy)]


def _ancestral_stds(d, steps, sigma2, gamma=None, **kw):
    """Noise std of each step i = K−1 … 1 of sample_ancestral: (x_{i−1} − μ_i(x_i)) / z_i."""
    rec = _Recorder(GaussianDenoiser(d, M, S))
    shape = (64, 1, 2, 2)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(9))
    ancestral(d, rec, shape, torch.Generator().manual_seed(5), timesteps=steps,
                     x_T=x_T, sigma2=sigma2, gamma=gamma, clip_x0=False, **kw)
    full = steps is None
    sub = d if full else respace(d, steps)
    K = d.T if full else len(steps)
    zs = _step_noise(torch.Generator().manual_seed(5), shape, K - 1)
    out = {}
    for j, i in enumerate(range(K - 1, 0, -1)):
        x = rec.inputs[j]
        tau = i if full else steps[i]
        o = rec.inner(x, torch.full((64,), tau))
        mean = p_mean_variance_from_output(sub, o, x, torch.full((64,), i), False,
                                           var_type="fixed_small")["mean"]
        r = (rec.inputs[j + 1] - mean) / zs[j]
        assert float(r.std()) < 1e-4 * float(r.mean().abs()) + 1e-6  # one std for all pixels
        out[i] = float(r.mean())
    return out


def _cap(y: float) -> float:
    """Bao et al.'s code: σ² ≤ (2y/255 · √(π/2))², i.e. E|σ ε| ≤ 2y/255."""
    return 2 * y / 255 * math.sqrt(math.pi / 2)


@pytest.mark.parametrize("sigma2", ["fixed_large", "analytic"])
def test_respaced_last_noisy_step_sigma_is_capped_bao2022_clip_sigma_idx_1(sigma2):
    """K < T: the step to x_{τ_1} adds min(σ, 2y/255·√(π/2)) (y = 1 by default), every other
    step its full σ (√β' for σ² = β, √σ̂² for analytic)."""
    d = Diffusion.from_schedule("linear", 1000, var_type="fixed_large")
    steps = timestep_spacing(1000, 10, "linspace")  # Bao et al.'s even trajectory
    gamma = gaussian_gamma(d, S)
    ab = d.alpha_bar[steps].tolist()
    beta = [None] + [1 - ab[i] / ab[i - 1] for i in range(1, 10)]
    full = ({i: math.sqrt(beta[i]) for i in range(1, 10)} if sigma2 == "fixed_large" else
            {i: math.sqrt(float(v)) for i, v in
             enumerate(analytic_sigma2(d, gamma, steps).tolist()) if i > 0})
    assert full[1] > 0.2  # σ = 0.36 (β) and 0.24 (analytic) for real data: here the same scale
    for y, kw in ((1.0, {}), (2.0, {"last_sigma_cap_y": 2.0}), (None, {"last_sigma_cap_y": None})):
        got = _ancestral_stds(d, steps, sigma2, gamma if sigma2 == "analytic" else None, **kw)
        want = {i: (min(s, _cap(y)) if i == 1 and y is not None else s) for i, s in full.items()}
        for i in want:
            assert math.isclose(got[i], want[i], rel_tol=1e-4), (y, i, got[i], want[i])
    assert abs(_cap(2.0) - 0.0197) < 1e-4  # the CIFAR-10 figure


def test_full_chain_ho2020_alg2_is_never_capped():
    """All T steps: DDPM's Algorithm 2, σ_t = √β_t at every t ≥ 2, also at t = 2 (> cap)."""
    d = Diffusion.from_schedule("linear", 100, var_type="fixed_large")
    got = _ancestral_stds(d, None, None)
    beta = d.betas.tolist()
    assert math.sqrt(beta[1]) > 2 * _cap(1.0)
    for i in range(1, 100):
        assert math.isclose(got[i], math.sqrt(beta[i]), rel_tol=1e-4), i
    # the same chain given as an explicit list of all T steps is the full chain too
    assert _ancestral_stds(d, list(range(100)), None)[1] == pytest.approx(got[1], rel=1e-6)


def _ddim_stds(d, steps, eta, gamma=None, **kw):
    """Noise std of each DDIM step i = K−1 … 1: residual from the η-mean, over z_i."""
    rec = _Recorder(GaussianDenoiser(d, M, S))
    shape = (64, 1, 2, 2)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(9))
    ddim(d, rec, shape, steps, eta, torch.Generator().manual_seed(5), clip_x0=False,
                x_T=x_T, gamma=gamma, **kw)
    zs = _step_noise(torch.Generator().manual_seed(5), shape, len(steps) - 1)
    out = {}
    for j, i in enumerate(range(len(steps) - 1, 0, -1)):
        x = rec.inputs[j]
        t = torch.full((64,), steps[i])
        x0 = p_mean_variance_from_output(d, rec.inner(x, t), x, t, clip_x0=False)["pred_x0"]
        ab, ab_prev = float(d.alpha_bar[steps[i]]), float(d.alpha_bar[steps[i - 1]])
        eps = (x - math.sqrt(ab) * x0) / math.sqrt(1 - ab)
        lam = ddim_sigma(ab, ab_prev, eta)
        mean = math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev - lam**2) * eps
        out[i] = float(((rec.inputs[j + 1] - mean) / zs[j]).mean())
    return out


def test_ddim_analytic_sigma2_eta0_is_bao2022_formula():
    """λ = 0: σ̂² = (√((1−ᾱ_k)/α_{k|k−1}) − √(1−ᾱ_{k−1}))² (1 − Γ_k), written out here."""
    d = Diffusion.from_schedule("linear", 1000)
    steps = timestep_spacing(1000, 10, "linspace")
    gamma = gaussian_gamma(d, S)
    got = ddim_analytic_sigma2(d, gamma, steps, 0.0)
    for k in range(1, 10):
        ab, ab_prev = float(d.alpha_bar[steps[k]]), float(d.alpha_bar[steps[k - 1]])
        paper = (math.sqrt((1 - ab) / (ab / ab_prev)) - math.sqrt(1 - ab_prev)) ** 2 * (
            1 - float(gamma[steps[k]]))
        assert math.isclose(float(got[k]), paper, rel_tol=1e-9), k
        assert paper > 0


def test_analytic_ddim_eta0_adds_sigma_hat_noise_capped_on_the_last_step():
    """Analytic-DDIM (η = 0, σ² analytic) adds √σ̂² at every step but the last two, and
    min(√σ̂², cap) on the step to x_{τ_1}; plain DDIM η = 0 adds none and stays deterministic."""
    d = Diffusion.from_schedule("linear", 1000)
    steps = timestep_spacing(1000, 10, "linspace")
    gamma = gaussian_gamma(d, S)
    s2 = ddim_analytic_sigma2(d, gamma, steps, 0.0).tolist()
    got = _ddim_stds(d, steps, 0.0, gamma, sigma2="analytic")
    for i in range(1, 10):
        want = math.sqrt(s2[i]) if i > 1 else min(math.sqrt(s2[1]), _cap(1.0))
        assert math.isclose(got[i], want, rel_tol=1e-4), (i, got[i], want)
    assert math.sqrt(s2[1]) > _cap(1.0)  # the cap is active
    uncapped = _ddim_stds(d, steps, 0.0, gamma, sigma2="analytic", last_sigma_cap_y=None)
    assert math.isclose(uncapped[1], math.sqrt(s2[1]), rel_tol=1e-4)
    # plain DDIM η = 0: no noise, whatever the generator
    model = GaussianDenoiser(d, M, S)
    x_T = torch.randn(16, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    a, b = (ddim(d, model, x_T.shape, steps, 0.0, torch.Generator().manual_seed(s),
                        x_T=x_T) for s in (1, 2))
    c, e = (ddim(d, model, x_T.shape, steps, 0.0, torch.Generator().manual_seed(s),
                        x_T=x_T, sigma2="analytic", gamma=gamma) for s in (1, 2))
    assert torch.equal(a, b) and not torch.equal(c, e)
