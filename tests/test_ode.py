"""Probability-flow ODE likelihood against closed forms (Gaussian data, whose flow is linear)."""

import math

import numpy as np
import pytest
import torch
from analytic import (
    GaussianDenoiser,
    discretize,
    discretized_gaussian_probs,
    entropy_bits,
    full_bound,
    gaussian_gamma,
)
from torch import nn

from ddpm_core.chains import timestep_spacing
from ddpm_core.continuous import ContinuousSchedule, continuous_schedule
from ddpm_core.diffusion import Diffusion
from ddpm_core.ode import (
    T_EPS,
    ode_bits_per_dim,
    ode_flow,
    ode_log_likelihood,
)
from ddpm_core.samplers import sample_ddim
from ddpm_core.unet import UNet, UNetConfig

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (1, 2, 2)  # D = 4
MU = torch.tensor([0.1, -0.2, 0.0, 0.3], dtype=torch.float64)
# AR(1) covariance: not diagonal, so Rademacher probes have a non-zero variance
SIGMA = 0.09 * 0.6 ** (torch.arange(4)[:, None] - torch.arange(4)[None, :]).abs().double()


class ContinuousGaussianEps(nn.Module):
    """Exact ε*(x, t) = E[ε | x_t] for x_0 ~ N(μ, Σ) at the continuous t of its label.

    x_t = √ᾱ x_0 + √(1−ᾱ) ε is jointly Gaussian with ε: Cov(ε, x_t) = √(1−ᾱ) I and
    Var(x_t) = V(t) = ᾱΣ + (1−ᾱ)I, so ε* = √(1−ᾱ) V(t)⁻¹ (x_t − √ᾱ μ).
    """

    def __init__(self, sched: ContinuousSchedule, mu: torch.Tensor, sigma: torch.Tensor):
        super().__init__()
        self.sched, self.mu = sched, mu
        self.lam, self.Q = torch.linalg.eigh(sigma)
        self.calls = 0

    def forward(self, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        assert label.dtype.is_floating_point
        # ᾱ(t) read back from the label (a bijection of t): at integer labels i the chain's ᾱ_i
        ab = torch.from_numpy(self.sched.label_alpha_bar(label.double().cpu().numpy()))[:, None]
        z = x.reshape(x.shape[0], -1).double() - ab.sqrt() * self.mu
        v = ab * self.lam + 1 - ab  # eigenvalues of V(t)
        eps = (1 - ab).sqrt() * (((z @ self.Q) / v) @ self.Q.T)
        return eps.reshape(x.shape).to(x.dtype)


def flow_matrix_log_eigs(sched: ContinuousSchedule, lam: torch.Tensor, t0: float, t1: float):
    """Eigenvalues of log A, A = V(t1)^{1/2} V(t0)^{-1/2}: the linear flow x_t1 − √ᾱ μ = A(...)."""
    ab0, ab1 = (float(sched.alpha_bar(t)) for t in (t0, t1))
    return 0.5 * (torch.log(ab1 * lam + 1 - ab1) - torch.log(ab0 * lam + 1 - ab0))


def closed_form_log_p(sched, mu, sigma, x):
    """log p_ε(x) of the flow with prior N(0, I) at t = 1: the pushforward through the affine map
    x_1 = √ᾱ(1) μ + A (x − √ᾱ(ε) μ), so log p = log N(x_1; 0, I) + log det A."""
    lam, Q = torch.linalg.eigh(sigma)
    log_a = flow_matrix_log_eigs(sched, lam, T_EPS, 1.0)
    A = Q @ torch.diag(log_a.exp()) @ Q.T
    ab0, ab1 = float(sched.alpha_bar(T_EPS)), float(sched.alpha_bar(1.0))
    z = x.reshape(x.shape[0], -1).double() - math.sqrt(ab0) * mu
    x1 = math.sqrt(ab1) * mu + z @ A.T
    D = x1.shape[1]
    return -0.5 * (x1**2).sum(1) - 0.5 * D * math.log(2 * math.pi) + float(log_a.sum()), x1


def gaussian_data(n, seed, mu=MU, sigma=SIGMA):
    g = torch.Generator().manual_seed(seed)
    L = torch.linalg.cholesky(sigma)
    return (mu + torch.randn(n, len(mu), generator=g, dtype=torch.float64) @ L.T).reshape(
        n, *SHAPE)


@pytest.mark.parametrize(("kind", "T", "max_abs"), [
    ("linear", 1000, 1e-3), ("linear", 100, 1e-2), ("cosine", 1000, 3e-8), ("cosine", 100, 3e-6),
    ("quadratic", 1000, 1e-15), ("constant", 100, 1e-15)])
def test_continuous_alpha_bar_is_close_to_the_discrete_chain_on_the_grid(kind, T, max_abs):
    """max_i |ᾱ(t_i) − ᾱ_i| on t_i = (i+1)/T, measured: linear (VP SDE) 8.1e-4 at T = 1000 and
    8.3e-3 at T = 100 (1 − β ≈ e^{−β}: log ᾱ differs by ½Σβ², at most 0.068 and 0.75); cosine
    2.5e-8 / 2.5e-6, all at the last step (the continuous cap of β, where ᾱ ~ 1e-8); the
    interpolated schedules are exact on the grid."""
    d = Diffusion.from_schedule(kind, T)
    s = continuous_schedule(d)
    assert s.kind == {"linear": "vp_linear", "cosine": "cosine"}.get(kind, "interpolated")
    ab, ab_discrete = s.alpha_bar(s.grid()), d.alpha_bar.numpy()
    err = np.abs(ab - ab_discrete)
    print(f"{kind} T={T}: max |ᾱ(t_i) − ᾱ_i| = {err.max():.2e} at i = {err.argmax()}")
    assert err.max() < max_abs
    assert float(s.alpha_bar(0.0)) == 1.0
    # β(t) = −d log ᾱ/dt, by central differences away from the kinks of the interpolation
    t = np.linspace(0.013, 0.987, 40) + 0.3 / T
    h = 1e-7
    fd = -(s.log_alpha_bar(t + h) - s.log_alpha_bar(t - h)) / (2 * h)
    assert np.allclose(s.beta(t), fd, rtol=1e-5)
    if kind == "linear":
        # score_sde's VP SDE: β_min = 0.1, β_max = 20 at T = 1000 and at the rescaled T = 100
        assert math.isclose(s.beta_min, 0.1) and math.isclose(s.beta_max, 20.0)
        assert abs(float(np.log(s.alpha_bar(1.0))) + 0.5 * 19.9 + 0.1) < 1e-12
    if kind == "quadratic":
        # piecewise constant β(t) = −T log(1 − β_i) on (i/T, (i+1)/T]
        i = np.arange(T)
        assert np.allclose(s.beta((i + 0.5) / T), -T * np.log1p(-d.betas.numpy()))


def test_continuous_gaussian_eps_is_the_posterior_mean_of_the_noise():
    """ε*(x_t, t) = E[ε | x_t], checked by least squares on Monte Carlo (x_0, ε) pairs."""
    s = continuous_schedule(Diffusion.from_schedule("linear", 1000))
    model = ContinuousGaussianEps(s, MU, SIGMA)
    t = 0.3
    ab = float(s.alpha_bar(t))
    n = 40000
    x0 = gaussian_data(n, 0).reshape(n, 4)
    eps = torch.randn(n, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    xt = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * eps
    # E[ε | x_t] is affine in x_t: regress ε on (x_t, 1)
    X = torch.cat([xt, torch.ones(n, 1, dtype=torch.float64)], 1)
    coef = torch.linalg.lstsq(X, eps).solution
    probe = gaussian_data(5, 2).reshape(5, 4)
    fit = torch.cat([probe, torch.ones(5, 1, dtype=torch.float64)], 1) @ coef
    exact = model(probe.reshape(5, *SHAPE), torch.full((5,), t * 999.0)).reshape(5, 4)
    assert float((fit - exact).abs().max()) < 0.02


def test_ode_log_likelihood_exact_divergence_matches_the_linear_flow_closed_form():
    """Chen et al. 2018 Thm. 1 with the exact trace: log p_ε equals the affine pushforward of
    N(0, I) to rtol = atol = 1e-5 (measured max error 6.3e-5 nats, NFE 56)."""
    d = Diffusion.from_schedule("linear", 1000)
    s = continuous_schedule(d)
    model = ContinuousGaussianEps(s, MU, SIGMA)
    x = gaussian_data(6, 3)
    res = ode_log_likelihood(d, model, x)
    exact, x1 = closed_form_log_p(s, MU, SIGMA, x)
    err = float((res.log_p[:, 0] - exact).abs().max())
    print(f"exact divergence: max |log p − closed form| = {err:.2e} nats, NFE {res.nfe}")
    assert res.log_p.shape == (6, 1)
    assert err < 1e-4
    assert float((res.x1.reshape(6, 4) - x1).abs().max()) < 1e-4
    # the prior mismatch is part of the closed form: the true marginal at ε differs
    ab = float(s.alpha_bar(T_EPS))
    marginal = torch.distributions.MultivariateNormal(math.sqrt(ab) * MU,
                                                      ab * SIGMA + (1 - ab) * torch.eye(4))
    assert float((marginal.log_prob(x.reshape(6, 4)) - exact).abs().max()) > 1e-6


def test_hutchinson_is_unbiased_and_its_standard_error_shrinks_like_one_over_sqrt_repeats():
    """Skilling–Hutchinson with a probe v fixed over time estimates ∫∇·f dt by vᵀ L v with
    L = log A (the flow is linear): Var = 2 Σ_{i≠j} L_ij² per probe (Rademacher), /R for R
    repeats. Measured (200 images): closed-form SE 1.136 nats (R = 1), 0.568 (R = 4); empirical
    1.205 and 0.588; bias +0.10 ± 0.085 and +0.017 ± 0.042 nats."""
    d = Diffusion.from_schedule("linear", 1000)
    s = continuous_schedule(d)
    lam, Q = torch.linalg.eigh(SIGMA)
    L = Q @ torch.diag(flow_matrix_log_eigs(s, lam, T_EPS, 1.0)) @ Q.T
    var1 = 2 * float((L**2).sum() - (torch.diagonal(L) ** 2).sum())
    n = 200
    images = discretize(gaussian_data(n, 4)).add(1).mul(127.5).round().to(torch.uint8)
    model = ContinuousGaussianEps(s, MU, SIGMA)
    exact = ode_bits_per_dim(d, model, images, seed=7, divergence="exact", batch_size=n)
    to_nats = 4 * math.log(2)
    empirical = {}
    for R in (1, 4):
        h = ode_bits_per_dim(d, model, images, seed=7, repeats=R, batch_size=n)
        err = (h.bpd - exact.bpd) * to_nats
        empirical[R] = float(err.std())
        se_closed = math.sqrt(var1 / R)
        print(f"R={R}: closed-form SE {se_closed:.4f} nats, empirical {empirical[R]:.4f}, "
              f"bias {float(err.mean()):+.4f} ± {empirical[R] / math.sqrt(n):.4f}, "
              f"NFE {float(h.nfe.double().mean()):.0f}")
        assert abs(float(err.mean())) < 4 * se_closed / math.sqrt(n)
        assert abs(empirical[R] / se_closed - 1) < 0.2
        if R > 1:
            # the reported per-image SE (std over repeats / √R) estimates the same quantity
            assert abs(float(h.se.pow(2).mean().sqrt()) * to_nats / se_closed - 1) < 0.2
    assert 1.6 < empirical[1] / empirical[4] < 2.5
    assert torch.isnan(ode_bits_per_dim(d, model, images[:1], repeats=1).se).all()
    assert float(exact.se.abs().max()) == 0.0


@pytest.mark.parametrize("divergence", ["exact", "hutchinson"])
def test_ode_bits_per_dim_is_seeded_per_image_not_per_batch(divergence):
    """With batch_size 1 each image's number depends only on (seed, index); a shared solve
    (batch_size 3) takes one step sequence, so it agrees only within the tolerance."""
    d = Diffusion.from_schedule("linear", 1000)
    model = ContinuousGaussianEps(continuous_schedule(d), MU, SIGMA)
    images = discretize(gaussian_data(3, 5)).add(1).mul(127.5).round().to(torch.uint8)
    kw = {"seed": 11, "divergence": divergence, "repeats": 2 if divergence != "exact" else 1}
    one = ode_bits_per_dim(d, model, images, batch_size=1, **kw)
    alone = ode_bits_per_dim(d, model, images[1:2], start_index=1, **kw)
    three = ode_bits_per_dim(d, model, images, batch_size=3, **kw)
    assert torch.equal(one.per_repeat[1], alone.per_repeat[0])
    assert int(one.nfe[1]) == int(alone.nfe[0])
    diff = float((one.per_repeat - three.per_repeat).abs().max())
    print(f"{divergence}: batch 1 vs 3: max |Δ bpd| = {diff:.1e}")
    assert diff < 1e-4
    # another seed gives other dequantization noise (and probes)
    other = ode_bits_per_dim(d, model, images, batch_size=1, **{**kw, "seed": 12})
    assert not torch.equal(one.per_repeat, other.per_repeat)


def test_ddim_eta0_converges_to_the_probability_flow_ode_as_steps_grow():
    """DDIM §4.3: η = 0 is Euler on the ODE. From the same x_T, DDIM's x_0 (discrete chain, exact
    discrete ε-model) approaches the ODE's decoded x_ε (continuous ε-model) at first order.
    Measured max distance (8 draws of N(0.1, 0.2²)): S = 10: 0.26, 50: 0.067, 250: 0.0145,
    1000: 0.0038 (S · distance 2.6 … 3.8); the ODE itself is 1.2e-5 from the closed-form flow."""
    m, sd = 0.1, 0.2
    d = Diffusion.from_schedule("linear", 1000)
    s = continuous_schedule(d)
    x_T = torch.randn(8, *SHAPE, generator=torch.Generator().manual_seed(6))
    ode = ode_flow(d, ContinuousGaussianEps(s, torch.full((4,), m, dtype=torch.float64),
                                            sd**2 * torch.eye(4, dtype=torch.float64)),
                   x_T.double(), 1.0, T_EPS)
    # the linear flow: x_ε = √ᾱ(ε) m + √(v(ε)/v(1)) (x_1 − √ᾱ(1) m), v = ᾱ sd² + 1 − ᾱ
    ab1, ab0 = float(s.alpha_bar(1.0)), float(s.alpha_bar(T_EPS))
    v1, v0 = ab1 * sd**2 + 1 - ab1, ab0 * sd**2 + 1 - ab0
    flow = math.sqrt(ab0) * m + math.sqrt(v0 / v1) * (x_T.double() - math.sqrt(ab1) * m)
    assert float((ode.x - flow).abs().max()) < 1e-4
    assert float(ode.x.abs().max()) < 1.0  # no clamp of DDIM's output is active
    dist = {}
    for S in (10, 50, 250, 1000):
        x0 = sample_ddim(d, GaussianDenoiser(d, m, sd), x_T, noise=None,
                         timesteps=timestep_spacing(1000, S), eta=0.0, clip_x0=False)
        dist[S] = float((x0.double() - ode.x).abs().max())
    print(f"DDIM vs ODE (NFE {ode.nfe}): {dist}")
    assert dist[10] > dist[50] > dist[250] > dist[1000]
    assert all(1.5 < S * dist[S] < 6.0 for S in dist)  # first order in the step
    assert dist[1000] < 5e-3


def test_ode_encode_then_decode_returns_the_image():
    """x_ε -> x_1 -> x_ε; the error follows the solver tolerance (cosine schedule). Measured
    max error 2.3e-4 at rtol = atol = 1e-5 (NFE 74 + 56), 2.3e-6 at 1e-7."""
    d = Diffusion.from_schedule("cosine", 1000)
    model = ContinuousGaussianEps(continuous_schedule(d), MU, SIGMA)
    x = gaussian_data(4, 8)
    errors = {}
    for tol in (1e-5, 1e-7):
        z = ode_flow(d, model, x, T_EPS, 1.0, rtol=tol, atol=tol)
        back = ode_flow(d, model, z.x, 1.0, T_EPS, rtol=tol, atol=tol)
        errors[tol] = float((back.x - x).abs().max())
        print(f"round trip at tol {tol:.0e}: max error {errors[tol]:.1e}, "
              f"NFE {z.nfe} + {back.nfe}")
        assert float(z.x.std()) > 0.5  # the latent is noise-like, not the image
    assert errors[1e-5] < 1e-3 and errors[1e-7] < 1e-5


def test_ode_bits_per_dim_is_below_the_bound_and_above_the_data_entropy():
    """For x_0 ~ discretize(N(0.1, 0.3²)), D = 4: entropy H = 7.2970 bits/dim ≤ ODE bpd (by
    Gibbs and Jensen: the dequantized bins carry at most the flow's mass) ≤ the bound for
    σ² = β, β̃ and the analytic σ² (the bound is a bound on the same exact model). Measured
    (2000 images, T = 1000): ODE − H = 0.0044 ± 0.0014 (per-image control variate −log2 P(x_0));
    bound − ODE = 0.109 ± 0.022 (β), 0.750 ± 0.026 (β̃), 0.104 ± 0.022 (analytic); NFE 50
    (0.0046, 0.091, 0.739, 0.085 with the old label t·(T − 1))."""
    m, sd = 0.1, 0.3
    probs = discretized_gaussian_probs(m, sd)
    H = entropy_bits(probs)
    d = Diffusion.from_schedule("linear", 1000)
    g = torch.Generator().manual_seed(0)
    n = 2000
    x0 = discretize(m + sd * torch.randn(n, *SHAPE, generator=g, dtype=torch.float64))
    k = torch.round((x0 + 1) * 127.5).long()
    info = -torch.log2(probs[k]).mean(dim=(1, 2, 3))  # each image's −log2 P(x_0) per dim
    model = ContinuousGaussianEps(continuous_schedule(d), torch.full((4,), m, dtype=torch.float64),
                                  sd**2 * torch.eye(4, dtype=torch.float64))
    ode = ode_bits_per_dim(d, model, k.to(torch.uint8), divergence="exact", batch_size=n)
    gap = ode.bpd - info
    ode_gap, ode_se = float(gap.mean()), float(gap.std()) / math.sqrt(n)
    print(f"entropy {H:.4f}; ODE {float(ode.bpd.mean()):.4f} (gap {ode_gap:.4f} ± {ode_se:.4f},"
          f" NFE {int(ode.nfe[0])})")
    assert ode_gap > -3 * ode_se
    bounds = full_bound(d, GaussianDenoiser(d, m, sd), x0.float(),
                          var_types=["fixed_large", "fixed_small", "analytic"], t_batch=100,
                          seed=1, gamma=gaussian_gamma(d, sd))
    for v, r in bounds.items():
        excess = r.total - ode.bpd
        mean, se = float(excess.mean()), float(excess.std()) / math.sqrt(n)
        print(f"{v}: bound {float(r.total.mean()):.4f}, bound − ODE {mean:.4f} ± {se:.4f}")
        assert mean > 3 * se and mean > 0.05


def test_unet_takes_continuous_labels_and_gives_a_finite_ode_bpd():
    """Our U-Net's sinusoidal embedding accepts fractional labels: integer-valued floats give
    the long-index output, and the ODE runs through it (Hutchinson within 4 SE of exact)."""
    cfg = UNetConfig(image_size=4, in_channels=1, out_channels=1, base_channels=8,
                     channel_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.0)
    torch.manual_seed(0)
    net = UNet(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(0.2).add_(0.02 * torch.randn_like(p))
    net.eval()
    x = torch.randn(2, 1, 4, 4)
    with torch.no_grad():
        a = net(x, torch.tensor([3, 70]))
        b = net(x, torch.tensor([3.0, 70.0]))
        c = net(x, torch.tensor([3.5, 70.5]))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    d = Diffusion.from_schedule("linear", 100)
    images = torch.randint(0, 256, (1, 1, 4, 4), generator=torch.Generator().manual_seed(0),
                           dtype=torch.int64).to(torch.uint8)
    exact = ode_bits_per_dim(d, net, images, divergence="exact", rtol=1e-4, atol=1e-4)
    h = ode_bits_per_dim(d, net, images, repeats=8, rtol=1e-4, atol=1e-4)
    print(f"tiny U-Net: exact {float(exact.bpd[0]):.4f}, Hutchinson {float(h.bpd[0]):.4f} ± "
          f"{float(h.se[0]):.4f}, NFE {int(exact.nfe[0])}")
    assert math.isfinite(float(exact.bpd[0])) and int(exact.nfe[0]) > 0
    assert abs(float(h.bpd[0] - exact.bpd[0])) < 4 * float(h.se[0]) + 1e-3
