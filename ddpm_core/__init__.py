"""DDPM reproduction library. Public API (imported lazily, so `import ddpm_core` is cheap):

    net, diffusion = ddpm_core.load_model(path)        # model file, checkpoint, diffusers, hub id
    images = ddpm_core.sample(net, diffusion, n=64, sampler="ddim", steps=50, seed=0)
    bpd = ddpm_core.bits_per_dim(net, diffusion, images)  # images: uint8 [N, H, W, C]
    exact = ddpm_core.nll(net, diffusion, images)          # ODE bits/dim: .bpd, .se, .nfe [N]
    heads = ddpm_core.train_heads(net, diffusion, train_images, steps=400)  # NPR/SN (2022b)
    ddpm_core.save_heads(heads, "heads.pt"); heads = ddpm_core.load_heads("heads.pt")
    images = ddpm_core.sample(net, diffusion, sampler="ddim", sigma2="sn", steps=10, heads=heads)

See ddpm_core.api for the arguments.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["bits_per_dim", "check_matches", "estimate_gamma", "load_heads", "load_model", "nll",
           "sample", "save_heads", "train_heads"]

if TYPE_CHECKING:
    from ddpm_core.api import (
        bits_per_dim,
        check_matches,
        estimate_gamma,
        load_heads,
        load_model,
        nll,
        sample,
        save_heads,
        train_heads,
    )


def __getattr__(name: str) -> Any:
    if name in __all__:
        from ddpm_core import api

        return getattr(api, name)
    raise AttributeError(f"module 'ddpm_core' has no attribute {name!r}")
