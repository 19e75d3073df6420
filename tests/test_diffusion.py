"""Forward process, posterior and parameterizations against independent computations."""

import math

import numpy as np
import pytest
import torch

from ddpm_core.diffusion import (
    Diffusion,
    extract,
    mean_target,
    p_mean_variance,
    p_mean_variance_from_output,
    p_variance,
    predict_eps_from_x0,
    predict_x0_from_eps,
    predict_x0_from_mu,
    q_mean_variance,
    q_posterior,
    q_sample,
    q_step_mean_variance,
    q_step_sample,
)
from ddpm_core.schedules import make_betas

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(B=6, seed=0, C=2):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(B, C, 3, 3, generator=g, dtype=F64) * 2 - 1
    eps = torch.randn(B, C, 3, 3, generator=g, dtype=F64)
    return x0, eps


def test_coefficients_match_definitions_ho2020_eq4_eq7():
    betas = make_betas("linear", 50)
    d = Diffusion(betas)
    b = betas.numpy()
    ab = np.cumprod(1 - b)
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    np.testing.assert_allclose(d.alpha_bar.numpy(), ab, rtol=1e-14)
    np.testing.assert_allclose(d.beta_tilde.numpy(), b * (1 - ab_prev) / (1 - ab), rtol=1e-12)
    assert float(d.beta_tilde[0]) == 0.0
    np.testing.assert_allclose(d.log_beta_tilde_clipped.numpy()[0], np.log(float(d.beta_tilde[1])))
    np.testing.assert_allclose(d.sigma2_large.numpy(), np.r_[d.beta_tilde[1], b[1:]], rtol=1e-14)


def test_q_marginal_eq4_matches_markov_chain_eq2_monte_carlo():
    d = Diffusion.from_schedule("linear", 100)
    N = 20000
    g = torch.Generator().manual_seed(1)
    x0 = torch.tensor([-0.9, -0.2, 0.4, 1.0], dtype=F64).repeat(N, 1).reshape(N, 4, 1, 1)
    x = x0.clone()
    for step in range(100):
        t = torch.full((N,), step, dtype=torch.long)
        x = q_step_sample(d, x, t, torch.randn(x.shape, generator=g, dtype=F64))
        if step in (0, 9, 49, 99):
            mean, var, log_var = q_mean_variance(d, x0[:1], t[:1])
            mc_mean, mc_var = x.mean(0), x.var(0)
            se_mean = (var[0] / N).sqrt()
            se_var = var[0] * math.sqrt(2 / (N - 1))
            assert bool(((mc_mean - mean[0]).abs() < 5 * se_mean).all()), (step, mc_mean, mean)
            assert bool(((mc_var - var[0]).abs() < 5 * se_var).all()), (step, mc_var, var)
            assert torch.allclose(log_var.exp(), var, rtol=1e-12)


def test_q_step_eq2_mean_variance():
    d = Diffusion.from_schedule("cosine", 20)
    x0, eps = _batch()
    t = torch.arange(6)
    mean, var = q_step_mean_variance(d, x0, t)
    assert torch.allclose(mean, (1 - d.betas[t]).sqrt().reshape(-1, 1, 1, 1) * x0, rtol=1e-14)
    assert torch.allclose(var.flatten(), d.betas[t], rtol=1e-14)


def test_q_sample_eq4_and_predictors_invert_it():
    d = Diffusion.from_schedule("linear", 30)
    x0, eps = _batch()
    t = torch.tensor([0, 3, 10, 20, 28, 29])
    x_t = q_sample(d, x0, t, eps)
    ab = d.alpha_bar[t].reshape(-1, 1, 1, 1)
    assert torch.allclose(x_t, ab.sqrt() * x0 + (1 - ab).sqrt() * eps, rtol=1e-13, atol=0)
    assert torch.allclose(predict_x0_from_eps(d, x_t, t, eps), x0, rtol=0, atol=1e-11)
    assert torch.allclose(predict_eps_from_x0(d, x_t, t, x0), eps, rtol=0, atol=1e-9)
    mu = q_posterior(d, x0, x_t, t)[0]
    assert torch.allclose(predict_x0_from_mu(d, x_t, t, mu), x0, rtol=0, atol=1e-9)


@pytest.mark.parametrize("t_index", [1, 5, 60, 99])
def test_posterior_eq6_eq7_equals_bayes_rule_on_a_grid(t_index):
    d = Diffusion.from_schedule("linear", 100)
    x0_val, xt_val = 0.3, 0.7
    mean, var, log_var = q_posterior(d, torch.full((1, 1, 1, 1), x0_val, dtype=F64),
                                     torch.full((1, 1, 1, 1), xt_val, dtype=F64),
                                     torch.tensor([t_index]))
    beta = float(d.betas[t_index])
    ab_prev = float(d.alpha_bar[t_index - 1])
    grid = np.linspace(-4, 4, 2_000_001)
    # Bayes: q(x_{t-1} | x_t, x_0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x_0)
    log_w = (-(xt_val - math.sqrt(1 - beta) * grid) ** 2 / (2 * beta)
             - (grid - math.sqrt(ab_prev) * x0_val) ** 2 / (2 * (1 - ab_prev)))
    w = np.exp(log_w - log_w.max())
    w /= w.sum()
    num_mean = float((w * grid).sum())
    num_var = float((w * (grid - num_mean) ** 2).sum())
    assert math.isclose(float(mean), num_mean, rel_tol=1e-7, abs_tol=1e-9)
    assert math.isclose(float(var), num_var, rel_tol=1e-5)
    assert math.isclose(float(log_var), math.log(num_var), abs_tol=1e-5)


def test_posterior_at_index0_is_x0_with_clipped_log_variance():
    d = Diffusion.from_schedule("linear", 100)
    x0, eps = _batch(B=1)
    t = torch.tensor([0])
    mean, var, log_var = q_posterior(d, x0, q_sample(d, x0, t, eps), t)
    assert torch.allclose(mean, x0, atol=1e-12) and float(var) == 0.0
    assert math.isclose(float(log_var), math.log(float(d.beta_tilde[1])), rel_tol=1e-12)


@pytest.mark.parametrize("var_type", ["fixed_large", "fixed_small", "learned_range"])
def test_parameterizations_ho2020_table2_give_same_mu(var_type):
    base = Diffusion.from_schedule("linear", 40, var_type=var_type)
    x0, eps = _batch(C=2)
    t = torch.tensor([0, 1, 7, 20, 38, 39])
    x_t = q_sample(base, x0, t, eps)
    true_mu = q_posterior(base, x0, x_t, t)[0]
    v = torch.rand(x0.shape, dtype=F64) * 2 - 1
    results = []
    for mean_type in ("eps", "x0", "mu"):
        d = base.with_mean_type(mean_type)
        target = mean_target(d, x0, x_t, t, eps)
        out = torch.cat([target, v], 1) if var_type == "learned_range" else target
        results.append(p_mean_variance_from_output(d, out, x_t, t, clip_x0=False))
    for r in results:
        assert torch.allclose(r["mean"], true_mu, rtol=0, atol=1e-9)
        assert torch.allclose(r["pred_x0"], x0, rtol=0, atol=1e-8)
        assert torch.equal(r["log_variance"], results[0]["log_variance"])


def test_pred_x0_clipped_to_data_range():
    d = Diffusion.from_schedule("linear", 40)
    x_t = torch.full((2, 1, 2, 2), 3.0, dtype=F64)
    t = torch.tensor([5, 30])
    p = p_mean_variance_from_output(d, torch.zeros_like(x_t), x_t, t, clip_x0=True)
    assert float(p["pred_x0"].max()) == 1.0
    assert torch.allclose(p["mean"], q_posterior(d, torch.ones_like(x_t), x_t, t)[0])
    mu = p_mean_variance_from_output(d.with_mean_type("mu"), x_t, x_t, t, clip_x0=True)
    assert float(mu["pred_x0"].abs().max()) <= 1.0 and torch.equal(mu["mean"], x_t)


def test_reverse_variances_fixed_and_learned_range_nichol_eq15():
    d = Diffusion.from_schedule("linear", 50, var_type="learned_range")
    shape = torch.Size([3, 1, 1, 1])
    t = torch.tensor([0, 1, 49])
    lb, lbt = torch.log(d.betas[t]), d.log_beta_tilde_clipped[t]
    for v, expected in ((1.0, lb), (-1.0, lbt), (0.0, 0.5 * (lb + lbt))):
        var, log_var = p_variance(d, torch.full(shape, v, dtype=F64), t, shape)
        assert torch.allclose(log_var.flatten(), expected, rtol=1e-12)
        assert torch.allclose(var, log_var.exp())
    _, raw = p_variance(d.with_var_type("learned"), torch.full(shape, -3.0, dtype=F64), t, shape)
    assert torch.equal(raw, torch.full(shape, -3.0, dtype=F64))
    large, _ = p_variance(d, None, t, shape, "fixed_large", F64)
    small, _ = p_variance(d, None, t, shape, "fixed_small", F64)
    assert torch.allclose(large.flatten(), torch.stack([d.beta_tilde[1], d.betas[1], d.betas[49]]))
    assert torch.allclose(small.flatten()[1:], d.beta_tilde[t[1:]])
    assert math.isclose(float(small.flatten()[0]), float(d.beta_tilde[1]))


def test_model_output_channels_and_var_type_override():
    d = Diffusion.from_schedule("linear", 10, var_type="learned")
    assert d.out_channels(3) == 6 and d.with_var_type("fixed_small").out_channels(3) == 3
    x = torch.zeros(2, 3, 2, 2)
    t = torch.tensor([1, 2])
    with pytest.raises(AssertionError, match="channels"):
        p_mean_variance_from_output(d, torch.zeros(2, 3, 2, 2), x, t)
    # a learned-variance model evaluated with a fixed σ² uses only its mean channels
    p = p_mean_variance_from_output(d, torch.zeros(2, 6, 2, 2), x, t, var_type="fixed_small")
    assert torch.allclose(p["variance"].double().flatten()[::12], d.beta_tilde[t])
    fixed = d.with_var_type("fixed_small")
    with pytest.raises(ValueError, match="needs a model trained"):
        p_mean_variance_from_output(fixed, torch.zeros_like(x), x, t, var_type="learned")
    assert "learned" in repr(d) and d.T == 10


def test_p_mean_variance_calls_model_and_bf16_is_promoted():
    d = Diffusion.from_schedule("linear", 10)
    x = torch.randn(2, 1, 2, 2)
    t = torch.tensor([3, 4])
    p = p_mean_variance(d, lambda x_t, t_: torch.zeros_like(x_t, dtype=torch.bfloat16), x, t)
    assert p["mean"].dtype == torch.float32 and p["mean"].shape == x.shape


def test_extract_asserts_batch_shape():
    coef = torch.arange(10, dtype=F64)
    assert extract(coef, torch.tensor([2, 3]), (2, 1, 4, 4)).shape == (2, 1, 1, 1)
    with pytest.raises(AssertionError):
        extract(coef, torch.tensor([2, 3, 4]), (2, 1, 4, 4))
    with pytest.raises(AssertionError):
        extract(coef, torch.tensor([2.0, 3.0]), (2, 1, 4, 4))


def test_diffusion_rejects_unknown_types():
    with pytest.raises(ValueError, match="mean_type"):
        Diffusion(make_betas("linear", 10), mean_type="v")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="var_type"):
        Diffusion(make_betas("linear", 10), var_type="big")  # type: ignore[arg-type]
    one = Diffusion(torch.tensor([0.5], dtype=F64))  # T = 1 falls back to β for the clip
    assert math.isclose(float(one.log_beta_tilde_clipped[0]), math.log(0.5))


def test_with_decoder_variance_sets_index_0_of_every_fixed_variance_only():
    d = Diffusion.from_schedule("linear", 20)
    other = d.with_decoder_variance(0.25)
    t = torch.tensor([0, 5])
    for v in ("fixed_large", "fixed_small"):
        var = p_variance(other, None, t, (2, 1, 1, 1), v, F64)[0].flatten()
        ref = p_variance(d, None, t, (2, 1, 1, 1), v, F64)[0].flatten()
        assert float(var[0]) == 0.25 and float(var[1]) == float(ref[1])
    assert other.decoder_variance == 0.25 and d.decoder_variance == float(d.beta_tilde[1])
    assert torch.equal(other.betas, d.betas) and torch.equal(other.beta_tilde, d.beta_tilde)
    with pytest.raises(ValueError, match="> 0"):
        d.with_decoder_variance(0.0)
