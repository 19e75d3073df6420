"""KL, discretized decoder, L_simple / L_vlb / L_hybrid (samplers of t: test_resample.py)."""

import math

import pytest
import torch
from analytic import GRID
from scipy import integrate, stats
from torch import nn

from ddpm_core.diffusion import Diffusion, p_mean_variance_from_output, q_posterior, q_sample
from ddpm_core.likelihood import (
    discretized_gaussian_log_likelihood,
    normal_kl,
    standard_normal_cdf,
    vlb_terms,
)
from ddpm_core.losses import Loss
from ddpm_core.resample import make_sampler

F64 = torch.float64


@pytest.mark.parametrize("m1,v1,m2,v2", [(0.0, 1.0, 0.0, 1.0), (0.3, 0.5, -0.2, 2.0),
                                         (1.0, 1e-2, 0.9, 3e-2), (-2.0, 4.0, 0.5, 0.25)])
def test_normal_kl_equals_quad_integral_of_p_log_p_over_q(m1, v1, m2, v2):
    p, q = stats.norm(m1, math.sqrt(v1)), stats.norm(m2, math.sqrt(v2))
    lo, hi = m1 - 30 * math.sqrt(v1), m1 + 30 * math.sqrt(v1)
    numeric, _ = integrate.quad(lambda x: p.pdf(x) * (p.logpdf(x) - q.logpdf(x)), lo, hi,
                                points=[m1], limit=200, epsabs=1e-13)
    kl = normal_kl(*(torch.tensor(v, dtype=F64) for v in (m1, math.log(v1), m2, math.log(v2))))
    assert math.isclose(float(kl), numeric, rel_tol=1e-7, abs_tol=1e-12), (float(kl), numeric)


def test_standard_normal_cdf_is_exact():
    x = torch.linspace(-8, 8, 101, dtype=F64)
    assert torch.allclose(standard_normal_cdf(x), torch.from_numpy(stats.norm.cdf(x.numpy())),
                          rtol=1e-13, atol=0)


@pytest.mark.parametrize("mean,std", [(0.0, 0.3), (0.95, 0.02), (-0.99, 0.004), (0.2, 1e-3)])
def test_discretized_decoder_ho2020_eq13_bins_sum_to_one_and_equal_integrated_mass(mean, std):
    ll = discretized_gaussian_log_likelihood(GRID, torch.full_like(GRID, mean),
                                             torch.full_like(GRID, math.log(std)))
    probs = ll.exp()
    assert abs(float(probs.sum()) - 1.0) < 1e-9
    dist = stats.norm(mean, std)
    for k in range(256):
        lo = -math.inf if k == 0 else float(GRID[k]) - 1 / 255
        hi = math.inf if k == 255 else float(GRID[k]) + 1 / 255
        if hi < mean - 12 * std or lo > mean + 12 * std:
            # mass < 1e-32: the official code's floor of 1e-12 applies
            assert math.isclose(float(probs[k]), 1e-12, rel_tol=1e-9)
            continue
        a, b = max(lo, mean - 40 * std), min(hi, mean + 40 * std)
        mass, _ = integrate.quad(dist.pdf, a, b, epsabs=1e-14, epsrel=1e-10)
        expected = max(mass, 1e-12)
        assert math.isclose(float(probs[k]), expected, rel_tol=1e-6, abs_tol=1e-14), (k, mass)


def test_vlb_term_is_kl_for_t_gt_0_and_decoder_nll_at_t_0():
    d = Diffusion.from_schedule("linear", 20, var_type="fixed_small")
    g = torch.Generator().manual_seed(0)
    x0 = GRID[torch.randint(0, 256, (4, 1, 2, 2), generator=g)]
    t = torch.tensor([0, 1, 0, 19])
    x_t = q_sample(d, x0, t, torch.randn(x0.shape, generator=g, dtype=F64))
    out = torch.randn(x0.shape, generator=g, dtype=F64) * 0.1
    got = vlb_terms(d, out, x0, x_t, t)
    for i in range(4):
        sl = slice(i, i + 1)
        p = p_mean_variance_from_output(d, out[sl], x_t[sl], t[sl], clip_x0=False)
        if t[i] == 0:
            ll = discretized_gaussian_log_likelihood(x0[sl], p["mean"], 0.5 * p["log_variance"])
            expected = -ll.mean() / math.log(2)
        else:
            m, _, lv = q_posterior(d, x0[sl], x_t[sl], t[sl])
            expected = normal_kl(m, lv, p["mean"], p["log_variance"]).mean() / math.log(2)
        assert math.isclose(float(got[i]), float(expected), rel_tol=1e-12)


class TableModel(nn.Module):
    """Returns a trainable output tensor, ignoring its inputs."""

    def __init__(self, out):
        super().__init__()
        self.out = nn.Parameter(out)

    def forward(self, x, t):
        return self.out


def _setup(mean_type, var_type, C=2, B=8, T=50):
    d = Diffusion.from_schedule("linear", T, mean_type=mean_type, var_type=var_type)
    g = torch.Generator().manual_seed(3)
    x0 = GRID[torch.randint(0, 256, (B, C, 2, 2), generator=g)].float()
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, T, (B,), generator=g)
    model = TableModel(torch.randn(B, d.out_channels(C), 2, 2, generator=g) * 0.5)
    return d, x0, noise, t, model


@pytest.mark.parametrize("mean_type", ["eps", "x0", "mu"])
def test_L_simple_ho2020_eq14_is_mse_to_the_parameterization_target(mean_type):
    d, x0, noise, t, model = _setup(mean_type, "fixed_large")
    terms = Loss(d, "simple").losses(model, x0, t, noise)
    x_t = q_sample(d, x0, t, noise)
    target = {"eps": noise, "x0": x0, "mu": q_posterior(d, x0, x_t, t)[0]}[mean_type]
    expected = ((target - model.out) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(terms["loss"], expected, rtol=1e-6) and terms["loss"].shape == (8,)


def test_L_hybrid_nichol_sec3_1_stops_mean_gradient_in_vlb():
    d, x0, noise, t, model = _setup("eps", "learned_range")
    terms = Loss(d, "hybrid").losses(model, x0, t, noise)
    assert torch.allclose(terms["vlb"], d.T * terms["vlb_term"])
    assert torch.allclose(terms["loss"], terms["mse"] + 0.001 * terms["vlb"])
    terms["vlb"].sum().backward()
    grad = model.out.grad
    assert float(grad[:, :2].abs().max()) == 0.0, "mean channels must get no VLB gradient"
    assert float(grad[:, 2:].abs().max()) > 0.0
    model.out.grad = None
    terms = Loss(d, "vlb").losses(model, x0, t, noise)  # pure L_vlb trains the mean too
    terms["loss"].sum().backward()
    assert float(model.out.grad[:, :2].abs().max()) > 0.0


def test_L_vlb_is_T_times_the_term_for_fixed_variance():
    d, x0, noise, t, model = _setup("eps", "fixed_small")
    terms = Loss(d, "vlb").losses(model, x0, t, noise)
    x_t = q_sample(d, x0, t, noise)
    term = vlb_terms(d, model.out.detach(), x0, x_t, t)
    assert torch.allclose(terms["loss"], d.T * term, rtol=1e-6)


def test_loss_rejects_inconsistent_settings():
    d = Diffusion.from_schedule("linear", 10)
    with pytest.raises(ValueError, match="hybrid"):
        Loss(d, "hybrid")
    with pytest.raises(ValueError, match="untrained"):
        Loss(d.with_var_type("learned"), "simple")
    with pytest.raises(ValueError, match="loss_type"):
        Loss(d, "l1")  # type: ignore[arg-type]


class TinyMLP(nn.Module):
    """x_t [B, 2, 1, 1] and a learned embedding of t -> [B, out, 1, 1]."""

    def __init__(self, T, out_channels):
        super().__init__()
        self.emb = nn.Embedding(T, 32)
        self.net = nn.Sequential(nn.Linear(2 + 32, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(),
                                 nn.Linear(64, out_channels))

    def forward(self, x, t):
        h = torch.cat([x.flatten(1), self.emb(t)], dim=1)
        return self.net(h)[:, :, None, None]


pytestmark = pytest.mark.usefixtures("one_thread")


def _two_blob_data(n, g):
    centres = torch.tensor([[0.5, 0.5], [-0.5, -0.25]])
    x0 = centres[torch.randint(0, 2, (n,), generator=g)] + 0.05 * torch.randn(n, 2, generator=g)
    return (torch.round((x0.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1)[:, :, None, None]


@pytest.mark.parametrize("loss_type,mean_type,var_type", [
    ("simple", "eps", "fixed_large"), ("vlb", "eps", "fixed_small"),
    ("hybrid", "eps", "learned_range"), ("vlb", "x0", "learned_range"),
    ("vlb", "mu", "learned")])
def test_tiny_mlp_training_lowers_each_loss(loss_type, mean_type, var_type):
    torch.manual_seed(0)
    T = 50
    d = Diffusion.from_schedule("linear", T, mean_type=mean_type, var_type=var_type)
    obj = Loss(d, loss_type)
    sampler = make_sampler("importance" if loss_type == "vlb" else "uniform", T)
    model = TinyMLP(T, d.out_channels(2))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    # fixed evaluation batch with uniform t: the same estimate before and after training
    x_eval = _two_blob_data(2000, g)
    t_eval = torch.arange(2000) % T
    n_eval = torch.randn(x_eval.shape, generator=g)

    def eval_loss():
        with torch.no_grad():
            return float(obj.losses(model, x_eval, t_eval, n_eval)["loss"].mean())

    before = eval_loss()
    for _ in range(150):
        x0 = _two_blob_data(128, g)
        t, w = sampler.sample(128, g)
        terms = obj.losses(model, x0, t, torch.randn(x0.shape, generator=g))
        sampler.update(t, terms["loss"])
        opt.zero_grad()
        (terms["loss"] * w).mean().backward()
        opt.step()
    after = eval_loss()
    print(f"{loss_type}/{mean_type}/{var_type}: loss {before:.4f} -> {after:.4f}")
    assert math.isfinite(after) and after < 0.7 * before, (before, after)


@pytest.mark.parametrize("x", [-1.0, 0.2, 1.0])  # first bin, an inner bin, last bin
def test_discretized_decoder_gradient_is_finite_when_bin_mass_underflows(x):
    """Bins far in the tail have mass 0 in float64: the floor must come before the log."""
    xs = torch.full((4,), x, dtype=F64)
    mean = torch.tensor([0.0, 0.5, -0.9, x + 0.002], dtype=F64, requires_grad=True)
    log_scale = torch.full((4,), math.log(1e-3), dtype=F64, requires_grad=True)
    ll = discretized_gaussian_log_likelihood(xs, mean, log_scale)
    assert bool(torch.isfinite(ll).all())
    ll.sum().backward()
    assert bool(torch.isfinite(mean.grad).all()), mean.grad
    assert bool(torch.isfinite(log_scale.grad).all()), log_scale.grad
    # the floored bins (mass < 1e-12) get no gradient; the one near its mean does
    floored = ll <= math.log(1e-12) + 1e-9
    assert bool(floored[:3].all()) and not bool(floored[3])
    assert float(mean.grad[3].abs()) > 0.0


@pytest.mark.parametrize("mean_type", ["eps", "x0", "mu"])
def test_L_vlb_at_T1000_trains_digits_unet_with_finite_gradients(mean_type):
    """Ho et al. 2020, eq. (5) with t = 0 in the batch: x0 / μ heads at init put x_0 far away."""
    from ddpm_core.unet import PRESETS, UNet

    torch.manual_seed(0)
    d = Diffusion.from_schedule("linear", 1000, mean_type=mean_type, var_type="fixed_large")
    obj = Loss(d, "vlb")
    net = UNet(PRESETS["digits"])
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x0 = GRID[torch.randint(0, 256, (8, 1, 8, 8), generator=g)].float()
        t = torch.randint(0, 1000, (8,), generator=g)
        t[:3] = 0  # the decoder term, where the NaN came from
        loss = obj.losses(net, x0, t, torch.randn(x0.shape, generator=g))["loss"].mean()
        opt.zero_grad()
        loss.backward()
        grad_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in net.parameters()))
        assert math.isfinite(float(loss.detach())) and math.isfinite(float(grad_norm)), grad_norm
        opt.step()
