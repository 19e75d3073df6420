"""Tiny models for the API, CLI and conversion tests (made on the fly; no network)."""

from __future__ import annotations

from pathlib import Path

import torch

from ddpm_core.convert import save_diffusers
from ddpm_core.diffusion import Diffusion
from ddpm_core.unet import UNet, UNetConfig

# The smallest U-Net diffusers' UNet2DModel can express: 32 GroupNorm groups need >= 128
# channels in every layer. 8x8 RGB, two levels, attention at 4x4 and in the middle.
DIFFUSERS_TINY = UNetConfig(image_size=8, in_channels=3, out_channels=3, base_channels=128,
                            channel_mult=(1, 1), num_res_blocks=1, attn_resolutions=(4,),
                            dropout=0.0)
# The smallest of ours (digits-like, 1 channel): what our own model files hold in tests.
OURS_TINY = UNetConfig(image_size=8, in_channels=1, out_channels=1, base_channels=16,
                       channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0)


def random_net(cfg: UNetConfig, seed: int = 0) -> UNet:
    """A UNet whose every parameter is perturbed (the zero-initialised last layers too)."""
    torch.manual_seed(seed)
    net = UNet(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval()


def make_diffusers_folder(path: Path, T: int = 20, schedule: str = "linear",
                          var_type: str = "fixed_large", seed: int = 0) -> tuple[UNet, Diffusion]:
    """A diffusers folder (config.json, safetensors, scheduler_config.json) of a tiny model."""
    net = random_net(DIFFUSERS_TINY, seed)
    diff = Diffusion.from_schedule(schedule, T, "eps", var_type)
    save_diffusers(net, diff, path)
    return net, diff


def make_model_file(path: Path, cfg: UNetConfig = OURS_TINY, T: int = 100,
                    schedule: str = "linear", var_type: str = "fixed_large",
                    seed: int = 0) -> tuple[UNet, UNet, Diffusion]:
    """Our model file with different EMA and raw weights: (ema net, raw net, diffusion)."""
    from ddpm_core.modelfile import ModelSpec, save_model

    ema, raw = random_net(cfg, seed), random_net(cfg, seed + 1)
    spec = ModelSpec(unet=cfg, schedule=schedule, timesteps=T, mean_type="eps",
                     var_type=var_type)
    save_model(path, spec, weights={"ema": ema.state_dict(), "model": raw.state_dict()})
    return ema, raw, spec.diffusion()
