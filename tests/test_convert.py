"""diffusers UNet2DModel (google/ddpm-cifar10-32 layout) -> our UNet: same weights, same outputs."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ddpm_core.convert import (
    CheckpointMismatch,
    config_from_diffusers,
    convert_diffusers_state_dict,
    load_diffusers_unet,
)
from ddpm_core.modelfile import check_weights_fit
from ddpm_core.unet import PRESETS, UNet

diffusers = pytest.importorskip("diffusers")

# The official model's config.json (google/ddpm-cifar10-32), keys that matter.
DDPM_CIFAR10 = dict(
    sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), layers_per_block=2,
    flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, norm_num_groups=32,
    attention_head_dim=None, downsample_padding=0, act_fn="silu",
    time_embedding_type="positional", center_input_sample=False, mid_block_scale_factor=1,
)


@pytest.fixture(scope="module")
def reference() -> torch.nn.Module:
    """A randomly initialised diffusers model; norm affine parameters randomised too."""
    torch.manual_seed(0)
    ref = diffusers.UNet2DModel(**DDPM_CIFAR10, dropout=0.1).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name:  # default 1/0 would hide a swapped norm1/norm2
                p.add_(0.1 * torch.randn_like(p))
    return ref


@pytest.fixture(scope="module")
def converted(reference: torch.nn.Module) -> dict[str, torch.Tensor]:
    return convert_diffusers_state_dict(reference.state_dict())


def _assert_same_weights(model: UNet, sd: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    assert own.keys() == sd.keys()
    for k in own:
        assert torch.equal(own[k], sd[k]), k


def test_converted_model_reproduces_diffusers_outputs(reference, converted) -> None:
    model = UNet(PRESETS["cifar10"]).eval()
    model.load_state_dict(converted)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 32, 32, generator=g)
    t = torch.tensor([0, 999, int(torch.randint(1, 999, (1,), generator=g))])  # ends + random
    with torch.no_grad():
        ours = model(x, t)
        theirs = reference(x, t).sample
    diff = (ours - theirs).abs().max().item()
    print(f"max abs diff ours vs diffusers: {diff:.3g} (output max {theirs.abs().max():.3g})")
    assert diff <= 1e-5


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_load_diffusers_unet_from_a_save_pretrained_directory(
    reference, converted, tmp_path: Path, safe: bool
) -> None:
    reference.save_pretrained(tmp_path, safe_serialization=safe)
    suffix = ".safetensors" if safe else ".bin"
    assert (tmp_path / f"diffusion_pytorch_model{suffix}").is_file()
    model = load_diffusers_unet(tmp_path)
    assert model.cfg == PRESETS["cifar10"]  # dropout 0.1 read from config.json
    _assert_same_weights(model, converted)
    # A bare weight file (no config.json beside it) is taken as the official CIFAR-10 model.
    (tmp_path / "config.json").unlink()
    _assert_same_weights(load_diffusers_unet(tmp_path / f"diffusion_pytorch_model{suffix}"),
                         converted)


def test_old_attention_key_names_convert_the_same(reference, converted) -> None:
    old = {}
    for k, v in reference.state_dict().items():
        for new, legacy in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"),
                            ("to_out.0", "proj_attn")):
            k = k.replace(f".{new}.", f".{legacy}.")
        old[k] = v
    assert any(".proj_attn." in k for k in old)
    out = convert_diffusers_state_dict(old)
    assert out.keys() == converted.keys()
    assert all(torch.equal(out[k], converted[k]) for k in out)


def test_missing_key_is_an_error_naming_it(converted) -> None:
    sd = dict(converted)
    del sd["mid.attn.qkv.bias"]
    with pytest.raises(ValueError, match=r"missing keys \['mid.attn.qkv.bias'\]"):
        check_weights_fit(PRESETS["cifar10"], sd, spec_name="the U-Net")


def test_extra_key_is_an_error_naming_it(reference) -> None:
    sd = dict(reference.state_dict())
    sd["down_blocks.0.resnets.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatch, match="down_blocks.0.resnets.0.extra.weight"):
        convert_diffusers_state_dict(sd)
    sd = dict(convert_diffusers_state_dict(reference.state_dict()))
    sd["conv_in.extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"unexpected keys \['conv_in.extra'\]"):
        check_weights_fit(PRESETS["cifar10"], sd, spec_name="the U-Net")


def test_shape_mismatch_is_an_error_naming_the_key(converted) -> None:
    sd = dict(converted)
    sd["conv_out.weight"] = torch.zeros(6, 128, 3, 3)  # a learned-variance head
    shapes = r"conv_out.weight: \(3, 128, 3, 3\) in the U-Net, \(6, 128, 3, 3\) stored"
    with pytest.raises(ValueError, match=shapes):
        check_weights_fit(PRESETS["cifar10"], sd, spec_name="the U-Net")


@pytest.mark.parametrize(
    ("key", "value"),
    [("flip_sin_to_cos", True), ("freq_shift", 0), ("norm_eps", 1e-5), ("downsample_padding", 1),
     ("attention_head_dim", 8), ("resnet_time_scale_shift", "scale_shift")],
)
def test_a_setting_that_changes_the_computation_is_rejected_by_name(key: str, value) -> None:
    conf = json.loads(json.dumps(DDPM_CIFAR10))
    assert config_from_diffusers(conf) == replace(PRESETS["cifar10"], dropout=0.0)
    conf[key] = value
    with pytest.raises(ValueError, match=key):
        config_from_diffusers(conf)


def test_library_does_not_import_diffusers() -> None:
    code = ("import sys, ddpm_core.unet, ddpm_core.convert; "
            "assert 'diffusers' not in sys.modules, 'diffusers imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_local_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_diffusers_unet(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="none of"):
        load_diffusers_unet(tmp_path)  # a directory without weights


# ----------------------------------------------------------------------------- scheduler_config


@pytest.mark.parametrize(
    "conf",
    [dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
     dict(beta_schedule="linear", beta_start=2e-4, beta_end=0.03, num_train_timesteps=50),
     dict(beta_schedule="scaled_linear", beta_start=8.5e-4, beta_end=0.012),
     dict(beta_schedule="squaredcos_cap_v2", num_train_timesteps=100),
     dict(trained_betas=[0.01 * (i + 1) for i in range(10)], num_train_timesteps=10)],
    ids=["linear", "linear_T50", "scaled_linear", "squaredcos_cap_v2", "trained_betas"],
)
def test_scheduler_config_gives_diffusers_own_betas(conf: dict) -> None:
    """β of our reading of scheduler_config.json = DDPMScheduler's (its own float32 code)."""
    from ddpm_core.convert import diffusion_from_scheduler_config

    sched = diffusers.DDPMScheduler(**conf)
    diff = diffusion_from_scheduler_config(dict(sched.config))
    assert diff.T == sched.config.num_train_timesteps
    torch.testing.assert_close(diff.betas, sched.betas.double(), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(diff.alpha_bar, sched.alphas_cumprod.double(), rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize(("theirs", "ours"), [
    ("fixed_large", "fixed_large"), ("fixed_large_log", "fixed_large"),
    ("fixed_small", "fixed_small"), ("fixed_small_log", "fixed_small"),
    ("learned", "learned"), ("learned_range", "learned_range")])
def test_scheduler_variance_type_maps_to_ours(theirs: str, ours: str) -> None:
    from ddpm_core.convert import diffusion_from_scheduler_config

    assert diffusion_from_scheduler_config({"variance_type": theirs}).var_type == ours


def test_scheduler_defaults_and_prediction_type() -> None:
    """An empty config is DDPMScheduler's defaults: T 1000, linear 1e-4..0.02, β̃, ε."""
    from ddpm_core.convert import diffusion_from_scheduler_config
    from ddpm_core.diffusion import Diffusion

    diff = diffusion_from_scheduler_config({})
    ref = Diffusion.from_schedule("linear", 1000)
    assert torch.equal(diff.betas, ref.betas)
    assert (diff.mean_type, diff.var_type) == ("eps", "fixed_small")
    assert diffusion_from_scheduler_config({"prediction_type": "sample"}).mean_type == "x0"
    for key, value in [("prediction_type", "v_prediction"), ("variance_type", "fixed_tiny"),
                       ("beta_schedule", "sigmoid"), ("_class_name", "EulerDiscreteScheduler")]:
        with pytest.raises(ValueError, match=f"{key}={value!r}"):
            diffusion_from_scheduler_config({key: value})
    with pytest.raises(ValueError, match="trained_betas has 3 values"):
        diffusion_from_scheduler_config({"trained_betas": [0.1, 0.2, 0.3]})


@pytest.mark.parametrize("kind", ["linear", "quadratic", "cosine", "constant"])
@pytest.mark.parametrize("T", [1000, 40])
def test_our_schedules_written_for_diffusers_read_back_by_ddpmscheduler(kind: str, T: int) -> None:
    from ddpm_core.convert import diffusion_from_scheduler_config, scheduler_config
    from ddpm_core.diffusion import Diffusion

    diff = Diffusion.from_schedule(kind, T, "x0", "fixed_small")
    conf = scheduler_config(diff)
    assert conf["trained_betas"] is None or kind == "constant"
    sched = diffusers.DDPMScheduler.from_config(conf)
    torch.testing.assert_close(sched.betas.double(), diff.betas, rtol=1e-6, atol=1e-9)
    assert (sched.config.variance_type, sched.config.prediction_type) == ("fixed_small", "sample")
    back = diffusion_from_scheduler_config(conf)
    torch.testing.assert_close(back.betas, diff.betas, rtol=1e-12, atol=0)
    assert (back.mean_type, back.var_type) == ("x0", "fixed_small")


# ----------------------------------------------------------------------------- ours -> diffusers


def test_ours_to_diffusers_folder_loads_in_diffusers_with_equal_outputs(tmp_path: Path) -> None:
    """Round trip ours -> diffusers folder -> UNet2DModel/DDPMScheduler and -> ours again."""
    from tiny import make_diffusers_folder

    from ddpm_core.convert import load_diffusers

    net, diff = make_diffusers_folder(tmp_path / "d", T=30, schedule="cosine",
                                      var_type="fixed_small")
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [
        "config.json", "diffusion_pytorch_model.safetensors", "scheduler_config.json"]
    theirs = diffusers.UNet2DModel.from_pretrained(tmp_path / "d").eval()
    sched = diffusers.DDPMScheduler.from_pretrained(tmp_path / "d")
    back, back_diff = load_diffusers(tmp_path / "d")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 8, 8, generator=g)
    t = torch.tensor([0, 17, 29])
    with torch.no_grad():
        ours, ref, again = net(x, t), theirs(x, t).sample, back(x, t)
    assert ours.abs().max() > 0.1  # the weights are not the near-zero initialisation
    assert (ours - ref).abs().max().item() <= 1e-5
    assert torch.equal(ours, again)
    _assert_same_weights(back, net.state_dict())
    torch.testing.assert_close(sched.alphas_cumprod.double(), diff.alpha_bar, rtol=1e-4, atol=1e-9)
    assert torch.equal(back_diff.betas, diff.betas)
    assert (back_diff.mean_type, back_diff.var_type) == ("eps", "fixed_small")


def test_diffusers_state_dict_names_invert_exactly(reference, converted) -> None:
    from ddpm_core.convert import to_diffusers_state_dict

    theirs = to_diffusers_state_dict(converted)
    own = reference.state_dict()
    assert theirs.keys() == own.keys()
    assert all(torch.equal(theirs[k], own[k]) for k in own)


def test_narrow_networks_are_refused_for_diffusers_by_name(tmp_path: Path) -> None:
    from ddpm_core.convert import save_diffusers
    from ddpm_core.diffusion import Diffusion

    with pytest.raises(ValueError, match=r"32 GroupNorm groups.*widths \[32"):
        save_diffusers(UNet(PRESETS["digits"]), Diffusion.from_schedule("linear", 10),
                       tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_save_diffusers_replaces_the_folder_whole_or_not_at_all(tmp_path: Path,
                                                                monkeypatch) -> None:
    """Through the one atomic writer: a rewrite replaces the whole folder (no stale file stays),
    a failed one keeps the old folder, and no temporary is left beside it."""
    import safetensors.torch
    from tiny import make_diffusers_folder

    from ddpm_core.convert import load_diffusers

    d = tmp_path / "d"
    make_diffusers_folder(d, T=12)
    (d / "stale.txt").write_text("from an older write")
    net, _ = make_diffusers_folder(d, T=20)
    assert sorted(f.name for f in d.iterdir()) == [
        "config.json", "diffusion_pytorch_model.safetensors", "scheduler_config.json"]
    before = {f.name: f.read_bytes() for f in d.iterdir()}

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        make_diffusers_folder(d, T=30)
    assert {f.name: f.read_bytes() for f in d.iterdir()} == before
    assert [f.name for f in tmp_path.iterdir()] == ["d"]  # no temporary folder left
    back, diff = load_diffusers(d)
    assert diff.T == 20
    _assert_same_weights(back, net.state_dict())


def test_pipeline_folder_layout_and_missing_scheduler(tmp_path: Path) -> None:
    """unet/ + scheduler/ (a saved DDPMPipeline) loads; a folder without a scheduler says so."""
    import shutil

    from tiny import make_diffusers_folder

    from ddpm_core.convert import load_diffusers

    net, diff = make_diffusers_folder(tmp_path / "flat", T=12)
    (tmp_path / "pipe" / "scheduler").mkdir(parents=True)
    shutil.copytree(tmp_path / "flat", tmp_path / "pipe" / "unet")
    shutil.move(tmp_path / "pipe" / "unet" / "scheduler_config.json",
                tmp_path / "pipe" / "scheduler" / "scheduler_config.json")
    back, back_diff = load_diffusers(tmp_path / "pipe")
    _assert_same_weights(back, net.state_dict())
    assert torch.equal(back_diff.betas, diff.betas)
    (tmp_path / "flat" / "scheduler_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no scheduler_config.json"):
        load_diffusers(tmp_path / "flat")
