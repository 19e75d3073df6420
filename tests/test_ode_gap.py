"""The network's label in the probability-flow ODE tells it the noise of the state (issue 19's
ODE-above-bound finding on digits), and the ODE bound with variational dequantization through
the chain's first step."""

import math

import numpy as np
import pytest
import torch
from test_ode import MU, SHAPE, SIGMA, closed_form_log_p, gaussian_data

from ddpm_core.continuous import continuous_schedule
from ddpm_core.diffusion import Diffusion
from ddpm_core.ode import ode_log_likelihood

pytestmark = pytest.mark.usefixtures("one_thread")


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
