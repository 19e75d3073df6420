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
    load_converted,
    load_diffusers_unet,
)
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
    model = load_converted(UNet(PRESETS["cifar10"]), converted).eval()
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
    with pytest.raises(CheckpointMismatch, match=r"missing keys \['mid.attn.qkv.bias'\]"):
        load_converted(UNet(PRESETS["cifar10"]), sd)


def test_extra_key_is_an_error_naming_it(reference) -> None:
    sd = dict(reference.state_dict())
    sd["down_blocks.0.resnets.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatch, match="down_blocks.0.resnets.0.extra.weight"):
        convert_diffusers_state_dict(sd)
    sd = dict(convert_diffusers_state_dict(reference.state_dict()))
    sd["conv_in.extra"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatch, match=r"unexpected keys \['conv_in.extra'\]"):
        load_converted(UNet(PRESETS["cifar10"]), sd)


def test_shape_mismatch_is_an_error_naming_the_key(converted) -> None:
    sd = dict(converted)
    sd["conv_out.weight"] = torch.zeros(6, 128, 3, 3)  # a learned-variance head
    with pytest.raises(CheckpointMismatch, match=r"conv_out.weight: checkpoint \(6, 128, 3, 3\)"):
        load_converted(UNet(PRESETS["cifar10"]), sd)


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


def test_hub_id_without_huggingface_hub_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes the import fail
    with pytest.raises(FileNotFoundError, match="huggingface_hub is not installed"):
        load_diffusers_unet("google/ddpm-cifar10-32-not-a-local-path")


def test_library_does_not_import_diffusers() -> None:
    code = ("import sys, ddpm_core.unet, ddpm_core.convert; "
            "assert 'diffusers' not in sys.modules, 'diffusers imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_local_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_diffusers_unet(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="none of"):
        load_diffusers_unet(tmp_path)  # a directory without weights
