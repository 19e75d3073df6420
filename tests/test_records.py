"""pipeline.records: the sample sets a variant's sample stage draws (the one list that sample,
fid, report and track read) and what each spec records."""

from __future__ import annotations

import math

import pytest

from pipeline.params import SampleConfig
from pipeline.records import SamplerSpec, sampler_specs


def test_sampler_specs_default_sets_with_analytic_ddim_and_the_last_sigma_cap():
    s = SampleConfig(variances=("fixed_large", "analytic"), steps=(10, 100))
    specs = sampler_specs(s, 100, "fixed_large")
    names = [sp.name for sp in specs]
    assert names == ["ancestral_beta", "ancestral_analytic",
                     "respaced_beta_S10", "respaced_analytic_S10", "ddim_S10",
                     "ddim_analytic_S10",
                     "respaced_beta_S100", "respaced_analytic_S100", "ddim_S100",
                     "ddim_analytic_S100"]
    by = {sp.name: sp for sp in specs}
    # y = 1 (Bao et al.'s, outside CIFAR-10) on every chain of K < T steps and every DDIM
    # chain; the full chains (all T steps, also as S = T) are Algorithm 2: no cap
    for name in ("respaced_beta_S10", "respaced_analytic_S10", "ddim_S10", "ddim_analytic_S10",
                 "ddim_S100", "ddim_analytic_S100"):
        assert by[name].last_sigma_cap_y == 1.0, name
    for name in ("ancestral_beta", "ancestral_analytic", "respaced_beta_S100"):
        assert by[name].last_sigma_cap_y is None, name
    a = by["ddim_analytic_S10"]
    assert (a.kind, a.variance, a.eta, a.sigma2) == ("ddim", "analytic", 0.0, "sigma2_analytic")
    assert a.label() == "Analytic-DDIM η = 0, 10 steps"
    assert by["ddim_S10"].label() == "DDIM η = 0, 10 steps"
    d = a.to_dict()
    assert d["name"] == "ddim_analytic_S10" and d["last_sigma_cap_y"] == 1.0
    assert SamplerSpec.from_dict(d) == a
    assert math.isclose(d["last_sigma_cap"], 2 / 255 * math.sqrt(math.pi / 2))
    assert by["ancestral_beta"].to_dict()["last_sigma_cap"] is None
    # the specs record what the samplers apply (samplers.last_sigma_cap_of: one rule)
    from ddpm_core.samplers import last_sigma_cap_of

    for sp in specs:
        assert sp.last_sigma_cap == last_sigma_cap_of(100, sp.steps, sp.kind == "ddim", 1.0), sp


def test_sampler_specs_cap_y_from_config_and_no_analytic_ddim_without_the_analytic_sigma2():
    s = SampleConfig(variances=("fixed_large",), steps=(10,), ddim_eta=0.5,
                     last_sigma_cap_y=2.0)
    specs = sampler_specs(s, 1000, "fixed_large")
    assert [sp.name for sp in specs] == ["ancestral_beta", "respaced_beta_S10", "ddim_eta0.5_S10"]
    assert [sp.last_sigma_cap_y for sp in specs] == [None, 2.0, 2.0]
    off = sampler_specs(SampleConfig(steps=(10,), last_sigma_cap_y=None,
                                     variances=("analytic",)), 1000, "fixed_large")
    assert [sp.name for sp in off] == ["ancestral_analytic", "respaced_analytic_S10", "ddim_S10",
                                       "ddim_analytic_S10"]
    assert all(sp.last_sigma_cap_y is None for sp in off)
    # a learned σ² samples with its own variance only: no Γ, so no Analytic-DDIM
    learned = sampler_specs(SampleConfig(steps=(10,), variances=("analytic",)), 1000, "learned")
    assert [sp.name for sp in learned] == ["ancestral_learned", "respaced_learned_S10",
                                           "ddim_S10"]


def test_sample_config_last_sigma_cap_y_must_be_positive_or_null():
    from pipeline.params import ConfigError, params_from_dict

    assert params_from_dict({"sample": {"last_sigma_cap_y": None}}).sample.last_sigma_cap_y is None
    assert params_from_dict({"sample": {"last_sigma_cap_y": 2}}).sample.last_sigma_cap_y == 2.0
    assert SampleConfig().last_sigma_cap_y == 1.0
    with pytest.raises(ConfigError, match="sample.last_sigma_cap_y"):
        params_from_dict({"sample": {"last_sigma_cap_y": 0}})


def test_sample_stage_draws_each_spec_with_its_cap_and_analytic_ddim(tmp_path, one_thread):
    """pipeline.sample.engine_args: each spec is the engine call it names (ddpm_core.sample,
    which the stage calls), its last_sigma_cap_y and Analytic-DDIM included."""
    import numpy as np
    import torch
    from tiny import OURS_TINY, random_net

    import ddpm_core
    from ddpm_core.api import save_model_file
    from ddpm_core.diffusion import Diffusion
    from ddpm_core.modelfile import load_model_file
    from pipeline.params import params_from_dict
    from pipeline.sample import engine_args

    diff = Diffusion.from_schedule("linear", 10)
    save_model_file(random_net(OURS_TINY), diff, tmp_path / "m.pt")
    m = load_model_file(tmp_path / "m.pt")
    p = params_from_dict({"diffusion": {"timesteps": 10},
                          "sample": {"num_samples": 3, "batch_size": 2, "steps": [4],
                                     "variances": ["fixed_large", "analytic"], "seed": 5},
                          "fid": {"kid_subset_size": 2}})
    gamma = torch.full((10,), 0.5, dtype=torch.float64)
    specs = {s.name: s for s in sampler_specs(p.sample, 10, "fixed_large")}
    cases = {"ddim_analytic_S4": dict(sampler="ddim_analytic", steps=4, gamma=gamma),
             "respaced_beta_S4": dict(steps=4, sigma2="beta"),
             "ddim_S4": dict(sampler="ddim", steps=4),
             "ancestral_beta": dict(sigma2="beta")}
    def draw(spec):
        return ddpm_core.sample(m.net, m.diffusion, 3, seed=5, batch_size=2, gamma=gamma,
                                last_sigma_cap_y=spec.last_sigma_cap_y, **engine_args(spec))

    for name, kw in cases.items():
        want = ddpm_core.sample(m.net, m.diffusion, 3, seed=5, batch_size=2, **kw)
        assert np.array_equal(draw(specs[name]), want), name
    uncapped = SamplerSpec(**{**specs["ddim_analytic_S4"].__dict__, "last_sigma_cap_y": None})
    got = draw(uncapped)
    want = ddpm_core.sample(m.net, m.diffusion, 3, seed=5, batch_size=2, sampler="ddim_analytic",
                            steps=4, gamma=gamma, last_sigma_cap_y=None)
    assert np.array_equal(got, want)


def test_fid_steps_csv_gives_analytic_ddim_its_own_column():
    """plots/fid_steps: DDIM and Analytic-DDIM at the same S are two columns (the analytic set
    once overwrote plain DDIM's FID)."""
    from pipeline.fid import steps_csv

    specs = sampler_specs(SampleConfig(variances=("fixed_large", "analytic"), steps=(10,)), 100,
                          "fixed_large")
    fids = {s.name: float(i) for i, s in enumerate(specs)}
    lines = steps_csv(specs, fids).splitlines()
    head = lines[0].split(",")
    assert head == ["steps", "ddim", "ddim_analytic", "ddim_npr", "ddim_sn", "respaced",
                    "respaced_beta_tilde", "respaced_analytic", "respaced_npr", "respaced_sn"]
    row = dict(zip(head, lines[1].split(","), strict=True))
    assert row["steps"] == "10"
    assert float(row["ddim"]) == fids["ddim_S10"]
    assert float(row["ddim_analytic"]) == fids["ddim_analytic_S10"]
    assert float(row["respaced_analytic"]) == fids["respaced_analytic_S10"]


def test_sampler_names_metric_keys_and_labels_come_from_the_sigma2_table():
    from ddpm_core.modes import SIGMA2_MODES
    from pipeline.records import bpd_key

    for var, m in SIGMA2_MODES.items():
        spec = SamplerSpec("respaced", 10, var, "trailing")
        assert spec.name == f"respaced_{m.short}_S10" and spec.sigma2 == m.key
        assert spec.label() == f"respaced ancestral {m.label}, 10 steps"
        assert bpd_key(var, 10) == f"bpd_{m.key}_K10"
