"""The network's label in the probability-flow ODE tells it the noise of the state (issue 19's
ODE-above-bound finding on digits), and the ODE bound with variational dequantization through
the chain's first step."""

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
)
from test_ode import MU, SHAPE, SIGMA, ContinuousGaussianEps, closed_form_log_p, gaussian_data

from ddpm_core.continuous import continuous_schedule
from ddpm_core.diffusion import Diffusion
from ddpm_core.likelihood import vlb_terms
from ddpm_core.ode import (
    first_step_log_likelihood_bound,
    first_step_noise,
    ode_bits_per_dim,
    ode_log_likelihood,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def se(v: torch.Tensor) -> float:
    """Standard error of the mean of v [N]."""
    return float(v.std()) / math.sqrt(len(v))


def discrete_log_snr(diff: Diffusion) -> np.ndarray:
    """log(ᾱ_i / (1 − ᾱ_i)) of the discrete chain, i = 0..T−1 (float64)."""
    ab = diff.alpha_bar.double().numpy()
    return np.log(ab) - np.log1p(-ab)


def log_snr_at_index(log_snr: np.ndarray, s: np.ndarray) -> np.ndarray:
    """The chain's log-SNR at a fractional index s: linear between integer indices, continued
    linearly past both ends (an independent implementation, not the library's)."""
    s = np.asarray(s, dtype=np.float64)
    T = len(log_snr)
    i = np.clip(np.floor(s).astype(np.int64), 0, T - 2)
    return log_snr[i] + (s - i) * (log_snr[i + 1] - log_snr[i])


class DiscreteGaussianEps(torch.nn.Module):
    """A perfectly trained network of N(μ, Σ) data: E[ε | x] at the noise of the DISCRETE chain
    at its (fractional) label, as a network trained at integer indices i (ᾱ_i) knows it."""

    def __init__(self, diff: Diffusion, mu: torch.Tensor, sigma: torch.Tensor):
        super().__init__()
        self.log_snr, self.mu = discrete_log_snr(diff), mu
        self.lam, self.Q = torch.linalg.eigh(sigma)

    def forward(self, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        ls = log_snr_at_index(self.log_snr, label.double().cpu().numpy())
        ab = torch.from_numpy(1.0 / (1.0 + np.exp(-ls)))[:, None]
        z = x.reshape(x.shape[0], -1).double() - ab.sqrt() * self.mu
        v = ab * self.lam + 1 - ab
        return ((1 - ab).sqrt() * (((z @ self.Q) / v) @ self.Q.T)).reshape(x.shape).to(x.dtype)


@pytest.mark.parametrize(("kind", "T"), [("linear", 100), ("linear", 1000), ("cosine", 100),
                                         ("quadratic", 100)])
def test_label_tells_the_network_the_noise_of_the_state(kind, T):
    """log-SNR of the chain at the label = log-SNR(t) of the continuous ᾱ(t), for all t ∈ (0, 1]
    (measured ≤ 1e-10). The old label t·(T − 1) (score_sde's 999·t) told the network more
    noise than the state has: on [t_first, 1] up to 0.85 in log-SNR at linear T = 100 (at
    t_first = 0.0062, where ᾱ(t) = ᾱ_0; 0.71 at T = 1000), 2.4 near t = 1 for cosine."""
    d = Diffusion.from_schedule(kind, T)
    s = continuous_schedule(d)
    t = np.concatenate([np.geomspace(1e-5, 0.05, 50), np.linspace(0.05, 1.0, 200)[1:]])
    ab = s.alpha_bar(t)
    want = np.log(ab) - np.log1p(-ab)
    labels = np.array([s.label(float(ti)) for ti in t])
    got = log_snr_at_index(discrete_log_snr(d), labels)
    err = np.abs(got - want)
    print(f"{kind} T={T}: max |log-SNR(label) − log-SNR(t)| = {err.max():.2e}")
    assert err.max() < 1e-8
    assert np.all(np.diff(labels) > 0)  # monotone: the label is a change of clock


@pytest.mark.parametrize("T", [100, 1000])
def test_ode_of_a_perfectly_trained_discrete_network_is_the_linear_flow_closed_form(T):
    """The exact ε of N(μ, Σ) data, known at the chain's noise levels only (as a trained network
    is), gives the closed-form log p_ε of the continuous flow within the solver tolerance.
    Measured: 1e-6 nats; with the old label t·(T − 1): 0.036 at T = 100, 0.0086 at T = 1000."""
    d = Diffusion.from_schedule("linear", T)
    s = continuous_schedule(d)
    x = gaussian_data(8, seed=3)
    model = DiscreteGaussianEps(d, MU, SIGMA)
    res = ode_log_likelihood(d, model, x.reshape(8, *SHAPE), rtol=1e-7, atol=1e-7)
    want, _ = closed_form_log_p(s, MU, SIGMA, x)
    err = (res.log_p[:, 0] - want).abs().max()
    print(f"T={T}: max |log p − closed form| = {float(err):.2e} nats, NFE {res.nfe}")
    assert float(err) < 1e-3
    assert math.isfinite(float(res.log_p.sum()))


def test_variational_dequantization_bound_lies_between_the_entropy_and_the_ddpm_bound():
    """For x_0 ~ discretize(N(0.1, 0.3²)), D = 4, and its exact ε-model at T = 100: the
    first-step bound (flow from t_first + the chain's decoder) is a bound on −log2 P(x_0)/D, so
    ≥ the entropy H (by Gibbs, per-image control variate −log2 P(x_0)), and below the DDPM bound
    for σ² = β of the same model. Its decoder term is the bound's L_0 at the same x_1.
    Measured (4000 images): variational − H = 0.031 ± 0.003, bound − variational 0.063 ± 0.014,
    uniform 7.315 (smooth data: both dequantizations are near H here), NFE 51."""
    m, sd, n = 0.1, 0.3, 4000
    probs = discretized_gaussian_probs(m, sd)
    d = Diffusion.from_schedule("linear", 100)
    g = torch.Generator().manual_seed(0)
    x0 = discretize(m + sd * torch.randn(n, *SHAPE, generator=g, dtype=torch.float64))
    k = torch.round((x0 + 1) * 127.5).long()
    info = -torch.log2(probs[k]).mean(dim=(1, 2, 3))
    model = ContinuousGaussianEps(continuous_schedule(d), torch.full((4,), m, dtype=torch.float64),
                                  sd**2 * torch.eye(4, dtype=torch.float64))
    vd = ode_bits_per_dim(d, model, k.to(torch.uint8), divergence="exact", batch_size=n,
                          dequantization="variational")
    uni = ode_bits_per_dim(d, model, k.to(torch.uint8), divergence="exact", batch_size=n)
    gap = vd.bpd - info
    bound = full_bound(d, GaussianDenoiser(d, m, sd), x0.float(), var_types=["fixed_large"],
                       t_batch=100, seed=1)["fixed_large"].total
    excess = bound - vd.bpd
    print(f"H {entropy_bits(probs):.4f}; variational {float(vd.bpd.mean()):.4f} (− H "
          f"{float(gap.mean()):.4f} ± {se(gap):.4f}); uniform {float(uni.bpd.mean()):.4f}; "
          f"bound β {float(bound.mean()):.4f} (− variational {float(excess.mean()):.4f} ± "
          f"{se(excess):.4f}); NFE {int(vd.nfe[0])}")
    assert float(gap.mean()) > -3 * se(gap)
    assert float(excess.mean()) > 3 * se(excess)
    # the decoder term is the DDPM bound's L_0 (Ho et al. eq. 13) at the same x_1
    eps = torch.stack([first_step_noise(SHAPE, 0, j) for j in range(3)])
    x1 = float(d.sqrt_alpha_bar[0]) * x0[:3] + float(d.sqrt_one_minus_alpha_bar[0]) * eps
    t = torch.zeros(3, dtype=torch.int64)
    l0 = vlb_terms(d, model(x1, t.double()), x0[:3], x1, t, clip_x0=True) * 4 * math.log(2.0)
    res = first_step_log_likelihood_bound(d, model, x0[:3], eps)
    flow = ode_log_likelihood(d, model, x1, t_eps=continuous_schedule(d).t_first())
    log_q = (-0.5 * eps**2).sum((1, 2, 3)) - 2 * math.log(2 * math.pi * float(d.betas[0]))
    assert torch.allclose(res.log_p[:, 0], -l0 + flow.log_p[:, 0] - log_q, atol=1e-9)
