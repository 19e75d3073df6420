"""The public API: ddpm_core.load_model / sample / bits_per_dim / check_matches."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from analytic import full_bound
from tiny import OURS_TINY, make_diffusers_folder, random_net

import ddpm_core
import ddpm_core.api
from ddpm_core.analytic import estimate_gamma
from ddpm_core.api import NET_BATCH, FixedRows, ModelMismatch, bits_per_dim_per_image
from ddpm_core.chains import timestep_spacing
from ddpm_core.data import DataError, from_unit, to_numpy_images, to_unit
from ddpm_core.diffusion import Diffusion
from ddpm_core.likelihood import bits_per_dim_at_steps
from ddpm_core.samplers import sample_ancestral, sample_ddim
from ddpm_core.seeds import ImageNoise

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model() -> tuple[torch.nn.Module, Diffusion]:
    return random_net(OURS_TINY), Diffusion.from_schedule("linear", 10)


def _by_hand(n: int, seed: int, draw) -> np.ndarray:
    """The seeding contract: image i's stream (seed, i) draws x_T, then each step's noise; the
    network sees calls of NET_BATCH rows (draw(x_T, noise, net))."""
    noise = ImageNoise(seed, range(n))
    return to_numpy_images(from_unit(draw(noise.randn((n, 1, 8, 8)), noise)))


@pytest.mark.parametrize("kind", ["ancestral_beta", "respaced_beta_tilde", "ddim"])
def test_sample_is_the_sampler_of_each_images_own_stream(model, kind, one_thread) -> None:
    net, diff = model
    fixed = FixedRows(net, NET_BATCH)
    if kind == "ancestral_beta":
        got = ddpm_core.sample(net, diff, n=5, sigma2="beta", seed=7, batch_size=2)
        want = _by_hand(5, 7, lambda x, z: sample_ancestral(diff, fixed, x, noise=z))
    elif kind == "respaced_beta_tilde":
        got = ddpm_core.sample(net, diff, n=5, steps=4, sigma2="beta_tilde", spacing="leading",
                               seed=7, batch_size=2)
        small = diff.with_var_type("fixed_small")
        ts = timestep_spacing(10, 4, "leading")
        want = _by_hand(5, 7, lambda x, z: sample_ancestral(small, fixed, x, noise=z,
                                                            timesteps=ts))
    else:
        got = ddpm_core.sample(net, diff, n=5, sampler="ddim", steps=4, eta=0.5, seed=7,
                               batch_size=2)  # default spacing: trailing, from T − 1
        ts = timestep_spacing(10, 4, "trailing")
        assert ts[-1] == 9
        want = _by_hand(5, 7, lambda x, z: sample_ddim(diff, fixed, x, noise=z, timesteps=ts,
                                                       eta=0.5))
    assert got.dtype == np.uint8 and got.shape == (5, 8, 8, 1)
    assert np.array_equal(got, want)
    assert len({im.tobytes() for im in got}) == 5  # every image its own noise


def test_sample_choices_change_the_images(model, one_thread) -> None:
    net, diff = model
    base = ddpm_core.sample(net, diff, n=3, steps=5, seed=0)
    assert np.array_equal(base, ddpm_core.sample(net, diff, n=3, steps=5, seed=0))
    for other in (dict(seed=1), dict(sigma2="beta_tilde"), dict(spacing="leading")):
        assert not np.array_equal(base, ddpm_core.sample(net, diff, n=3, steps=5,
                                                         **{"seed": 0, **other})), other


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(sampler="euler"), "unknown sampler 'euler'"),
    (dict(sampler="ddim", sigma2="beta"), "DDIM's noise is set by eta"),
    (dict(sigma2="learned"), "needs a model with a learned variance"),
    (dict(sigma2="sigma"), "unknown σ² 'sigma'"),
    (dict(sigma2="analytic"), "needs gamma"),
    (dict(sampler="ddim", sigma2="analytic", gamma=torch.ones(10)), "needs eta > 0"),
    (dict(sampler="ddim_analytic"), "needs gamma"),
    (dict(spacing="uniform"), "unknown spacing 'uniform'"),
    (dict(steps=11), r"steps must lie in 1..T = 10"),
    (dict(sampler="ddim", eta=1.5), r"eta must lie in \[0, 1\]"),
    (dict(n=0), "n and batch_size must be >= 1"),
])
def test_sample_rejects_bad_arguments_by_name(model, kwargs, match) -> None:
    net, diff = model
    with pytest.raises(ValueError, match=match):
        ddpm_core.sample(net, diff, **{"n": 2, **kwargs})


def test_bits_per_dim_is_the_bound_with_each_images_own_noise(model, one_thread) -> None:
    net, diff = model
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 1), dtype=np.uint8)
    per = bits_per_dim_per_image(net, diff, images, sigma2="beta_tilde", batch_size=2,
                                 t_batch=3, seed=4)
    x = to_unit(torch.from_numpy(images).permute(0, 3, 1, 2))
    small = diff.with_var_type("fixed_small")
    # all five images in one batch, the noise of image i at τ from (4, i, τ)
    want = full_bound(small, FixedRows(net, NET_BATCH), x, t_batch=10, seed=4)["fixed_small"].total
    np.testing.assert_array_equal(per, want.numpy())
    mean = ddpm_core.bits_per_dim(net, diff, images, sigma2="beta_tilde", batch_size=2,
                                  t_batch=3, seed=4)
    assert mean == pytest.approx(float(want.mean()), rel=1e-12)
    assert ddpm_core.bits_per_dim(net, diff, images, batch_size=2, t_batch=3,
                                  seed=4) != mean  # σ² = β


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(sigma2=["learned"]), "needs a model with a learned variance"),
    (dict(sigma2=["sigma"]), "unknown σ² 'sigma'"),
    (dict(sigma2=["beta", "analytic"]), "needs gamma"),
    (dict(steps=[1]), "2 <= K"),
    (dict(steps=[]), "steps is empty"),
    (dict(t_batch=0), "t_batch must be >= 1"),
])
def test_bound_rejects_bad_arguments_by_name(model, kwargs, match) -> None:
    net, diff = model
    with pytest.raises(ValueError, match=match):
        ddpm_core.api.bound(net, diff, np.zeros((2, 8, 8, 1), np.uint8), **kwargs)


def test_bound_of_a_learned_variance_model_takes_its_own_sigma2_only(one_thread) -> None:
    cfg = dataclasses.replace(OURS_TINY, out_channels=2)
    net = random_net(cfg)
    images = np.zeros((2, 8, 8, 1), np.uint8)
    for var_type in ("learned", "learned_range"):
        diff = Diffusion.from_schedule("linear", 10, var_type=var_type)
        with pytest.raises(ValueError, match="learned its variance"):
            ddpm_core.api.bound(net, diff, images, sigma2=["beta"])
        own = ddpm_core.api.bound(net, diff, images, sigma2=["learned"])[10]
        assert set(own) == {var_type}
    with pytest.raises(ValueError, match="one-step variance"):
        ddpm_core.api.bound(net, diff.with_var_type("learned"), images, steps=[4])
    assert set(ddpm_core.api.bound(net, diff, images, steps=[4])) == {4}  # learned_range: K < T


def test_analytic_sigma2_uses_gamma_from_training_images(model, one_thread) -> None:
    """estimate_gamma = analytic.estimate_gamma on the first M images in [-1, 1], seeded; the
    analytic sampler and K-step bound are the library's with that Γ."""
    net, diff = model
    train = np.random.default_rng(1).integers(0, 256, (12, 8, 8, 1), dtype=np.uint8)
    gamma = ddpm_core.estimate_gamma(net, diff, train, M=8, seed=3, batch_size=16)
    x = to_unit(torch.from_numpy(train[:8]).permute(0, 3, 1, 2))
    want = estimate_gamma(diff, FixedRows(net, NET_BATCH), x, seed=3, batch_size=16)
    assert torch.equal(gamma, want) and gamma.shape == (10,) and bool(torch.isfinite(gamma).all())
    got = ddpm_core.sample(net, diff, n=3, steps=5, sigma2="analytic", gamma=gamma, seed=2,
                           batch_size=2)
    ts = timestep_spacing(10, 5, "trailing")
    by_hand = _by_hand(3, 2, lambda x, z: sample_ancestral(
        diff, FixedRows(net, NET_BATCH), x, noise=z, timesteps=ts, sigma2="analytic",
        gamma=gamma))
    assert np.array_equal(got, by_hand)
    # this random net's images saturate: only the (uncapped) last noisy step tells σ² apart
    assert not np.array_equal(
        *(ddpm_core.sample(net, diff, n=3, steps=5, seed=2, batch_size=2, last_sigma_cap_y=None,
                           **kw) for kw in ({"sigma2": "analytic", "gamma": gamma}, {})))
    images = train[8:]
    bpd = bits_per_dim_per_image(net, diff, images, sigma2="analytic", gamma=gamma, steps=4,
                                 batch_size=4, t_batch=2)
    x0 = to_unit(torch.from_numpy(images).permute(0, 3, 1, 2))
    ref = bits_per_dim_at_steps(diff, FixedRows(net, NET_BATCH), x0, steps=[4],
                                var_types=["analytic"], gamma=gamma, t_batch=2,
                                seed=0, indices=range(4))[4]["analytic"]
    np.testing.assert_array_equal(bpd, ref.total.numpy())


def test_bits_per_dim_takes_the_uint8_images_sample_returns(model, one_thread) -> None:
    net, diff = model
    with pytest.raises(DataError, match=r"images: expected uint8 numpy images, got float32"):
        ddpm_core.bits_per_dim(net, diff, np.zeros((2, 8, 8, 1), np.float32))
    with pytest.raises(DataError, match=r"\(8, 8, 3\) \(H, W, C\); the model takes \(8, 8, 1\)"):
        ddpm_core.bits_per_dim(net, diff, np.zeros((2, 8, 8, 3), np.uint8))


# ----------------------------------------------------------------------------- load_model


def test_load_model_from_a_diffusers_folder_and_a_weight_file(tmp_path: Path) -> None:
    net, diff = make_diffusers_folder(tmp_path / "d", T=16, schedule="quadratic",
                                      var_type="fixed_small")
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([0, 15])
    for src in (tmp_path / "d", tmp_path / "d" / "diffusion_pytorch_model.safetensors",
                str(tmp_path / "d")):
        got, got_diff = ddpm_core.load_model(src)
        assert not got.training and not any(p.requires_grad for p in got.parameters())
        with torch.no_grad():
            assert torch.equal(got(x, t), net(x, t))
        assert torch.equal(got_diff.betas, diff.betas)
        assert (got_diff.mean_type, got_diff.var_type) == ("eps", "fixed_small")


def test_load_model_errors_name_the_problem(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        ddpm_core.load_model(tmp_path / "absent.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="a folder without config.json"):
        ddpm_core.load_model(tmp_path / "empty")
    with pytest.raises(ValueError, match="which must be 'ema' or 'model'"):
        ddpm_core.load_model(tmp_path, which="best")
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'.\nCheck your connection")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError) as e:
        ddpm_core.load_model("google/ddpm-cifar10-32")
    assert "\n" not in str(e.value) and "could not fetch 'google/ddpm-cifar10-32'" in str(e.value)


def test_hub_id_downloads_config_scheduler_and_weights(tmp_path: Path, monkeypatch) -> None:
    """A hub id is fetched with the scheduler config (snapshot_download mocked: no network)."""
    import huggingface_hub

    net, diff = make_diffusers_folder(tmp_path / "cache", T=12)
    seen = {}

    def fake(repo_id, allow_patterns):
        seen.update(repo=repo_id, patterns=allow_patterns)
        return str(tmp_path / "cache")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    got, got_diff = ddpm_core.load_model("someone/tiny-ddpm")
    assert seen["repo"] == "someone/tiny-ddpm"
    assert {"config.json", "scheduler_config.json", "diffusion_pytorch_model.safetensors",
            "scheduler/scheduler_config.json"} <= set(seen["patterns"])
    assert got_diff.T == 12 and torch.equal(got.conv_out.weight, net.conv_out.weight)


def test_folder_saved_by_diffusers_itself_loads_and_checks_against_params(tmp_path: Path,
                                                                         one_thread) -> None:
    """UNet2DModel + DDPMScheduler.save_pretrained (diffusers' own writer): same outputs, the
    scheduler's T and β; params with T = 100 against this 1000-step model are an error."""
    import diffusers

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(128, 128),
        layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), flip_sin_to_cos=False, freq_shift=1,
        norm_eps=1e-6, attention_head_dim=None, downsample_padding=0).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    unet.save_pretrained(tmp_path / "hf")
    diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                            variance_type="fixed_large").save_pretrained(tmp_path / "hf")
    net, diff = ddpm_core.load_model(tmp_path / "hf")
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 999])
    with torch.no_grad():
        assert (net(x, t) - unet(x, t).sample).abs().max().item() <= 1e-5
    assert (diff.T, diff.mean_type, diff.var_type) == (1000, "eps", "fixed_large")
    ddpm_core.check_matches(diff, schedule="linear", timesteps=1000)
    with pytest.raises(ModelMismatch, match="diffusion.timesteps is 100 but .* has T = 1000"):
        ddpm_core.check_matches(diff, schedule="linear", timesteps=100,
                                source=f"pretrained.path {tmp_path / 'hf'}")


# ----------------------------------------------------------------------------- check_matches


def test_check_matches_catches_T_schedule_and_mean_type() -> None:
    official = Diffusion.from_schedule("linear", 1000)
    ddpm_core.check_matches(official, schedule="linear", timesteps=1000, mean_type="eps",
                            var_type="fixed_small")  # a fixed σ² is the sampler's choice
    with pytest.raises(ModelMismatch, match=r"diffusion.timesteps is 100 but the model has "
                                            r"T = 1000 \(set diffusion.timesteps: 1000\)"):
        ddpm_core.check_matches(official, schedule="linear", timesteps=100)
    with pytest.raises(ModelMismatch,
                       match=r"schedule 'cosine' gives β\[999\] = 0.999 but the model has 0.02"):
        ddpm_core.check_matches(official, schedule="cosine", timesteps=1000)
    with pytest.raises(ModelMismatch, match="mean_type is 'x0' but the model predicts 'eps'"):
        ddpm_core.check_matches(official, mean_type="x0")
    with pytest.raises(ModelMismatch, match="var_type is 'learned_range'"):
        ddpm_core.check_matches(official, var_type="learned_range")


# ----------------------------------------------------------------------------- our files


def _readme_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_api_example_runs_as_written(tmp_path: Path, monkeypatch, capsys,
                                            one_thread) -> None:
    from tiny import make_model_file

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    ema, _, diff = make_model_file(tmp_path / "models" / "simple.pt", T=100)
    code = _readme_block()
    assert 'load_model("models/simple.pt")' in code
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "(64, 8, 8, 1) uint8"
    images = ddpm_core.sample(ema, diff, n=64, sampler="ddim", steps=50, seed=0)
    assert np.array_equal(scope["images"], images)
    assert scope["bpd"] == pytest.approx(ddpm_core.bits_per_dim(ema, diff, images[:16]),
                                         rel=1e-12)
    assert out[1] == f"{scope['bpd']:.3f} bits/dim (sigma^2 = beta, all T steps)"


def test_load_model_from_our_model_file_ema_or_raw(tmp_path: Path) -> None:
    from tiny import make_model_file

    ema, raw, diff = make_model_file(tmp_path / "m.pt", T=30, schedule="cosine",
                                     var_type="fixed_small")
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0, 29])
    for which, want in (("ema", ema), ("model", raw)):
        net, got = ddpm_core.load_model(tmp_path / "m.pt", which=which)
        with torch.no_grad():
            assert torch.equal(net(x, t), want(x, t)), which
        assert torch.equal(got.betas, diff.betas) and got.var_type == "fixed_small"


def test_sample_ddim_analytic_is_analytic_ddim_at_eta0_with_the_last_sigma_cap(model,
                                                                                one_thread):
    """sampler="ddim_analytic": sample_ddim with σ² analytic (η = 0 by default: Bao et al.'s
    Analytic-DDIM), the step to x_{τ_1} capped at y = last_sigma_cap_y (default 1)."""
    net, diff = model
    gamma = torch.full((10,), 0.5, dtype=torch.float64)
    ts = timestep_spacing(10, 4, "trailing")
    for y in (1.0, None):
        kw = {} if y == 1.0 else {"last_sigma_cap_y": y}
        got = ddpm_core.sample(net, diff, n=3, sampler="ddim_analytic", steps=4, gamma=gamma,
                               seed=3, batch_size=2, **kw)
        want = _by_hand(3, 3, lambda x, z, y=y: sample_ddim(
            diff, FixedRows(net, NET_BATCH), x, noise=z, timesteps=ts, eta=0.0, gamma=gamma,
            last_sigma_cap_y=y))
        assert np.array_equal(got, want), y
    plain = ddpm_core.sample(net, diff, n=3, sampler="ddim", steps=4, seed=3, batch_size=2)
    assert not np.array_equal(plain, got)  # σ̂² noise at η = 0; plain DDIM adds none
    with pytest.raises(ValueError, match="needs gamma"):
        ddpm_core.sample(net, diff, n=2, sampler="ddim_analytic", steps=4)
    with pytest.raises(ValueError, match="sampler='ddim_analytic'"):
        ddpm_core.sample(net, diff, n=2, sampler="ddim", sigma2="analytic", gamma=gamma)
    with pytest.raises(ValueError, match="ddim_analytic.*analytic"):
        ddpm_core.sample(net, diff, n=2, sampler="ddim_analytic", sigma2="beta", gamma=gamma)


def test_sample_last_sigma_cap_y_reaches_the_respaced_sampler(model, one_thread):
    """last_sigma_cap_y (default 1, None: no cap) is the ancestral sampler's; the full chain
    is never capped."""
    net, diff = model
    ts = timestep_spacing(10, 4, "trailing")
    images = {}
    for y in (1.0, 2.0, None):
        images[y] = ddpm_core.sample(net, diff, n=3, steps=4, sigma2="beta", seed=1,
                                     last_sigma_cap_y=y)
        want = _by_hand(3, 1, lambda x, z, y=y: sample_ancestral(
            diff, FixedRows(net, NET_BATCH), x, noise=z, timesteps=ts, last_sigma_cap_y=y))
        assert np.array_equal(images[y], want), y
    assert np.array_equal(images[1.0], ddpm_core.sample(net, diff, n=3, steps=4, sigma2="beta",
                                                        seed=1))  # default y = 1
    assert not np.array_equal(images[1.0], images[None])
    full = [ddpm_core.sample(net, diff, n=3, sigma2="beta", seed=1, last_sigma_cap_y=y)
            for y in (1.0, None)]
    assert np.array_equal(*full)
    with pytest.raises(ValueError, match="last_sigma_cap_y must be > 0"):
        ddpm_core.sample(net, diff, n=2, steps=4, last_sigma_cap_y=0.0)
