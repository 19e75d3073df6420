"""Schedules of β_t: endpoints, rescaling, the cosine formula, clipping."""

import math

import pytest
import torch

from ddpm_core.schedules import MAX_BETA, cosine_alpha_bar, make_betas


def test_linear_schedule_endpoints_ho2020_sec4():
    betas = make_betas("linear", 1000)
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert abs(float(betas[0]) - 1e-4) < 1e-15 and abs(float(betas[-1]) - 0.02) < 1e-15
    assert torch.allclose(betas.diff(), torch.full((999,), (0.02 - 1e-4) / 999,
                                                   dtype=torch.float64), rtol=1e-9, atol=0)


def test_linear_schedule_rescaled_by_1000_over_T_improved_ddpm():
    b4000 = make_betas("linear", 4000)
    assert math.isclose(float(b4000[0]), 2.5e-5, rel_tol=1e-12)
    assert math.isclose(float(b4000[-1]), 0.005, rel_tol=1e-12)
    # the point of the rescaling: Σβ is the same for every T, so log ᾱ_T ≈ −Σβ barely moves
    for T in (250, 1000, 4000):
        assert math.isclose(float(make_betas("linear", T).sum()), 10.05, rel_tol=1e-9)
    log_ab = {T: float(torch.log1p(-make_betas("linear", T)).sum()) for T in (250, 1000, 4000)}
    for T in (250, 4000):  # differs only through the O(Σβ²) term: 2.1% at T = 250
        assert abs(log_ab[T] / log_ab[1000] - 1) < 0.03, log_ab


def test_quadratic_schedule_is_linear_in_sqrt_beta():
    betas = make_betas("quadratic", 1000)
    root = betas.sqrt()
    assert math.isclose(float(betas[0]), 1e-4, rel_tol=1e-12)
    assert math.isclose(float(betas[-1]), 0.02, rel_tol=1e-12)
    assert float(root.diff().diff().abs().max()) < 1e-14


def test_cosine_alpha_bar_matches_nichol_dhariwal_eq17():
    T, s = 1000, 0.008
    betas = make_betas("cosine", T)
    alpha_bar = torch.cumprod(1 - betas, 0)
    t = torch.arange(1, T + 1, dtype=torch.float64)
    f0 = math.cos(s / (1 + s) * math.pi / 2) ** 2
    f = torch.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2 / f0
    unclipped = betas < MAX_BETA
    assert int((~unclipped).sum()) >= 1, "the last β of the cosine schedule is clipped"
    first_clipped = int((~unclipped).nonzero()[0])
    assert torch.allclose(alpha_bar[:first_clipped], f[:first_clipped], rtol=1e-10, atol=1e-15)
    assert float(betas.max()) <= MAX_BETA
    assert float(cosine_alpha_bar(torch.tensor(0.0))) == 1.0


def test_constant_schedule_and_small_T_clip():
    assert torch.equal(make_betas("constant", 1000), torch.full((1000,), 0.02, dtype=torch.float64))
    small = make_betas("linear", 10)  # rescaled β_T = 2 is clipped to 0.999
    assert float(small.max()) == MAX_BETA and float(small.min()) > 0


def test_make_betas_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown schedule"):
        make_betas("sigmoid", 10)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="T must be"):
        make_betas("linear", 0)


@pytest.mark.parametrize("T", [1000, 100, 7])
def test_quadratic_is_the_official_codes_sqrt_linear_and_quadratic_beta_the_write_ups(T):
    """quadratic: √β_t = √β_min + (√β_max − √β_min)(t−1)/(T−1) (DDPM code's "quad");
    quadratic_beta: β_t = β_min + (β_max − β_min)((t−1)/(T−1))²; both with β_min, β_max × 1000/T."""
    lo, hi = 1e-4 * 1000 / T, 0.02 * 1000 / T
    u = torch.tensor([(t - 1) / (T - 1) for t in range(1, T + 1)], dtype=torch.float64)
    sqrt_linear = (math.sqrt(lo) + (math.sqrt(hi) - math.sqrt(lo)) * u) ** 2
    beta_quadratic = lo + (hi - lo) * u**2
    assert torch.allclose(make_betas("quadratic", T), sqrt_linear.clamp(max=MAX_BETA), rtol=1e-12)
    assert torch.allclose(make_betas("quadratic_beta", T), beta_quadratic.clamp(max=MAX_BETA),
                          rtol=1e-12)
    if T == 1000:  # the difference the docs state: 6.6e-4 at most, 13 % of β there
        gap = (sqrt_linear - beta_quadratic).abs()
        i = int(gap.argmax())
        assert 6.5e-4 < float(gap[i]) < 6.7e-4 and 0.12 < float(gap[i] / beta_quadratic[i]) < 0.14


def test_cosine_with_improved_ddpm_one_plus_s_is_a_valid_schedule_and_without_it_is_not():
    T, s = 1000, 0.008
    betas = make_betas("cosine", T)
    assert bool((betas > 0).all()) and bool((betas <= MAX_BETA).all())
    assert bool((betas.diff() >= 0).all())  # β grows with t
    # the common write-up, f(u) = cos²((u + s) π/2) without /(1 + s), for comparison
    u = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((u + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    beta = 1 - alpha_bar[1:] / alpha_bar[:-1]
    assert float(alpha_bar[992]) < 1e-30 and bool((beta[992:] < 0).all())


@pytest.mark.parametrize("kind", ["quadratic", "quadratic_beta", "constant", "linear"])
def test_every_schedule_but_cosine_is_rescaled_by_1000_over_T(kind):
    for T in (250, 4000):
        assert math.isclose(float(make_betas(kind, T)[-1]), 0.02 * 1000 / T, rel_tol=1e-12)
        assert math.isclose(float(make_betas(kind, T)[0]),
                            (0.02 if kind == "constant" else 1e-4) * 1000 / T, rel_tol=1e-12)
