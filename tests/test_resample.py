"""Timestep samplers: uniform, and importance sampling p_t ∝ √E[L_t²] (Nichol & Dhariwal 2021)."""

import pytest
import torch

from ddpm_core.resample import (
    HISTORY_PER_T,
    UNIFORM_PROB,
    ImportanceSampler,
    UniformSampler,
    make_sampler,
)

F64 = torch.float64


def test_uniform_t_sampling_has_unit_weights_and_update_is_noop():
    obj = UniformSampler(7)
    t, w = obj.sample(1000, torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and int(t.min()) == 0 and int(t.max()) == 6
    assert torch.equal(w, torch.ones(1000))
    obj.update(t, torch.ones(1000))
    assert obj.state_dict() == {}
    assert torch.equal(obj.probabilities(), torch.full((7,), 1 / 7, dtype=F64))


def test_importance_sampling_nichol_sec3_3_p_proportional_to_rms_loss():
    T = 5
    obj = ImportanceSampler(T)
    g = torch.Generator().manual_seed(0)
    # each t sees losses t+1, t+2, ... (15 of them): only the last 10 are kept
    for k in range(15):
        obj.update(torch.arange(T), torch.arange(T, dtype=F64) + 1 + k)
        if k < HISTORY_PER_T - 1:
            assert torch.allclose(obj.probabilities(), torch.full((T,), 1 / T, dtype=F64))
    kept = torch.arange(T, dtype=F64)[:, None] + 1 + torch.arange(5, 15, dtype=F64)[None]
    rms = kept.pow(2).mean(1).sqrt()
    expected = rms / rms.sum() * (1 - UNIFORM_PROB) + UNIFORM_PROB / T
    assert torch.allclose(obj.probabilities(), expected, rtol=1e-12)
    t, w = obj.sample(200_000, g)
    freq = torch.bincount(t, minlength=T).double() / 200_000
    se = (expected * (1 - expected) / 200_000).sqrt()
    assert bool(((freq - expected).abs() < 5 * se).all()), (freq, expected)
    assert torch.allclose(w.double(), 1 / (T * expected[t]), rtol=1e-6)


def test_importance_state_dict_round_trip_resumes_exactly():
    T = 4
    obj = ImportanceSampler(T)
    gen = torch.Generator().manual_seed(5)
    for _ in range(12):
        obj.update(torch.arange(T), torch.rand(T, generator=gen, dtype=F64))
    obj.update(torch.tensor([2]), torch.tensor([0.5]))
    other = ImportanceSampler(T)
    other.load_state_dict(obj.state_dict())
    assert torch.equal(other.probabilities(), obj.probabilities())
    a = obj.sample(50, torch.Generator().manual_seed(9))
    b = other.sample(50, torch.Generator().manual_seed(9))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="does not match"):
        ImportanceSampler(5).load_state_dict(obj.state_dict())


def test_make_sampler_follows_the_mode_name():
    assert type(make_sampler("uniform", 3)) is UniformSampler
    assert type(make_sampler("importance", 3)) is ImportanceSampler
    with pytest.raises(KeyError, match="stratified"):
        make_sampler("stratified", 10)  # type: ignore[arg-type]
