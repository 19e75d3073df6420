"""Speed of one SN/NPR heads training step on a frozen U-Net (ddpm_core.heads), for sizing the
head stage: a forward pass of the backbone without gradients and a backward pass of the head.

    python -m benchmarks.heads --preset digits --batch 128 --steps 20 [--device cpu|cuda]
        [--threads 1]

Random weights and images: the speed does not depend on them. Warm-up steps are excluded.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.unet import T_MAX, sync
from ddpm_core.diffusion import Diffusion
from ddpm_core.heads import head_for, head_train_step, unet_backbone
from ddpm_core.unet import PRESETS, UNet


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="digits", choices=sorted(PRESETS))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--kinds", default="sn,npr", help="heads trained together: sn, npr or both")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    cfg = PRESETS[a.preset]
    net = UNet(cfg).to(dev).eval().requires_grad_(False)
    heads = {kind: head_for(net).to(dev) for kind in a.kinds.split(",")}
    backbone = unet_backbone(net)
    diff = Diffusion.from_schedule("linear", T_MAX)
    opt = torch.optim.Adam([q for h in heads.values() for q in h.parameters()], lr=1e-4)
    g = torch.Generator(device=dev).manual_seed(0)
    shape = (a.batch, cfg.in_channels, cfg.image_size, cfg.image_size)
    x0 = torch.rand(shape, generator=g, device=dev) * 2 - 1

    def step() -> None:
        t = torch.randint(0, T_MAX, (a.batch,), generator=g, device=dev)
        eps = torch.randn(shape, generator=g, device=dev)
        head_train_step(diff, backbone, heads, x0, optimizer=opt, t=t, eps=eps)

    for _ in range(a.warmup):
        step()
    sync(dev)
    start = time.perf_counter()
    for _ in range(a.steps):
        step()
    sync(dev)
    per_step = (time.perf_counter() - start) / a.steps
    n_head = sum(q.numel() for h in heads.values() for q in h.parameters())
    print(f"{a.preset} heads {a.kinds} ({n_head} parameters), batch {a.batch} on {dev} "
          f"({torch.get_num_threads()} threads): {per_step * 1e3:.1f} ms/step, "
          f"{a.batch / per_step:.0f} images/s")


if __name__ == "__main__":
    main()
