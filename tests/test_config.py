"""params.yaml validation: every bad value is one ConfigError that names its key."""

import dataclasses

import pytest

from pipeline.params import (
    ConfigError,
    Params,
    TrainConfig,
    load_params,
    params_from_dict,
    to_dict,
)


def test_defaults_are_the_papers():
    t = TrainConfig()
    assert (t.lr, t.batch_size, t.warmup_steps, t.grad_clip, t.ema_decay) == (
        2e-4, 128, 5000, 1.0, 0.9999)
    p = Params()
    assert p.schedule == "linear" and p.diffusion.timesteps == 1000
    assert {k: v.loss for k, v in p.variants.items()} == {"simple": "simple", "vlb": "vlb"}
    assert all(k == v.name for k, v in p.variants.items())


def test_round_trip_through_dict_gives_equal_tree():
    raw = {"schedule": "cosine", "train": {"steps": 5, "lr": 1}, "sample": {"steps": [3, 7]},
           "variants": {"h": {"loss": "hybrid", "var_type": "learned_range"}}}
    p = params_from_dict(raw)
    assert p.train.lr == 1.0 and isinstance(p.train.lr, float)
    assert p.sample.steps == (3, 7)
    assert p.variants["h"].var_type == "learned_range" and p.variants["h"].name == "h"
    assert params_from_dict(to_dict(p)) == p


def test_tree_is_frozen():
    p = Params()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.train.lr = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"schedul": "cosine"}, "schedul: unknown key; did you mean 'schedule'?"),
        ({"train": {"lrr": 1e-4}}, "train.lrr: unknown key; did you mean 'train.lr'?"),
        ({"schedule": "cosin"}, "did you mean 'cosine'?"),
        ({"train": {"lr": "fast"}}, "train.lr: expected a number"),
        ({"train": {"steps": 1.5}}, "train.steps: expected an integer"),
        ({"train": {"steps": True}}, "train.steps: expected an integer"),
        ({"train": {"hflip": "yes"}}, "train.hflip: expected true or false or 'auto'"),
        ({"train": {"lr": -1}}, "train.lr: must be > 0"),
        ({"train": {"ema_decay": 1.0}}, "train.ema_decay: must be in [0, 1)"),
        ({"train": {"batch_size": 5, "nproc": 2}}, "train.batch_size: must be divisible"),
        ({"diffusion": {"timesteps": 1}}, "diffusion.timesteps: must be >= 2"),
        ({"sample": {"steps": [10, "x"]}}, "sample.steps[1]: expected an integer"),
        ({"sample": {"ddim_eta": 2}}, "sample.ddim_eta: must be in [0, 1]"),
        ({"sample": {"variances": ["learned"]}}, "sample.variances: 'learned' is not a σ² choice"),
        ({"bpd": {"num_images": 0}}, "bpd.num_images: must be > 0 or null"),
        ({"nll": {"rtol": 0}}, "nll.rtol: must lie in (0, 1), got 0"),
        ({"nll": {"atol": -1e-5}}, "nll.atol: must lie in (0, 1)"),
        ({"nll": {"repeats": 0}}, "nll.repeats: must be > 0"),
        ({"nll": {"batch_size": 0}}, "nll.batch_size: must be > 0"),
        ({"data": {"dataset": "npz"}}, "data.path: is required for dataset=npz"),
        ({"data": {"test_fraction": 1.5}}, "data.test_fraction: must be in (0, 1)"),
        ({"model": {"dropout": 1.0}}, "model.dropout: must be in [0, 1)"),
        ({"variants": [{"name": "a"}]}, "variants: expected a mapping"),
        ({"variants": {}}, "variants: give at least one variant"),
        ({"variants": {"a/b": {}}}, "variants.a/b: a variant name must be"),
        ({"variants": {"a b": {}}}, "variants.a b: a variant name must be"),
        ({"variants": {1: {}}}, "variants.1: a variant name must be a string; quote it ('1')"),
        ({"variants": {"h": {"loss": "hybrid", "var_type": "fixed_large"}}},
         "variants.h.var_type: loss 'hybrid' trains a learned variance"),
        ({"bpd": {"steps": [1, 10]}}, "bpd.steps: K = 1"),
        # chains of the T steps: checked once, when params.yaml loads (every stage refuses it)
        ({"diffusion": {"timesteps": 20}, "sample": {"steps": [10, 30, 40]}},
         "sample.steps: 30 exceeds diffusion.timesteps=20"),
        ({"diffusion": {"timesteps": 20}, "sample": {"steps": [10]}, "bpd": {"steps": [25]}},
         "bpd.steps: 25 exceeds diffusion.timesteps=20"),
        ({"sample": {"num_samples": "1e9"}}, "sample.num_samples: expected an integer, got '1e9' "
         "(YAML reads 1e9 as text: write 1000000000)"),
        ({"variants": {"a": {"name": "b"}}}, "variants.a.name: unknown key; delete it or use "
         "one of variants.a's keys: format, loss, mean_type, pretrained, t_sampling, var_type"),
        ({"bogus": 1}, "bogus: unknown key; delete it or use one of params.yaml's keys: bpd, "
         "data, diffusion, fid, gamma, mlflow, model, nll, nnhead, sample, schedule, train, "
         "variants"),
        ({"variants": {"a": {"var_type": "learned"}}}, "variants.a.loss: a learned"),
        ({"variants": {"a": {"t_sampling": "importance"}}}, "variants.a.t_sampling"),
        ({"variants": {"a": {"format": "onnx"}}}, "variants.a.format"),
        ({"variants": "simple"}, "variants: expected a mapping"),
        ({"train": 3}, "train: expected a mapping"),
        ([1, 2], "params.yaml: expected a mapping"),
        ({"bpd": {"seed": -1}}, "bpd.seed: must be >= 0"),
        ({"data": {"test_fraction": 3, "tets": 1}}, "data.tets: unknown key"),  # the typo first
        ({"sample": {"variances": ["fixd_large"]}}, "did you mean 'fixed_large'?"),
        ({"mlflow": {"tracking_uri": "localhost"}}, "mlflow.tracking_uri: 'localhost' is not a "
         "tracking URI; give http://<host>:<port>"),
    ],
)
def test_bad_params_name_the_key(raw, message):
    with pytest.raises(ConfigError) as e:
        params_from_dict(raw)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_load_params_reports_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("train:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+"):
        load_params(bad)
    bad.write_text("schedule: cosine\ntrain:\n  steps: 3\n")
    assert load_params(bad).train.steps == 3


def test_the_presets_literal_names_the_unet_presets():
    import typing

    from ddpm_core import modes
    from ddpm_core.unet import PRESETS

    assert set(typing.get_args(modes.Preset)) == set(PRESETS)
