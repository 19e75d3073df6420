"""U-Net speed: parameters, forward FLOPs, training and forward throughput, ours vs diffusers.

    python -m benchmarks.unet --preset cifar10 --batch 8 --steps 3 [--device cpu|cuda]
        [--precision fp32|bf16] [--compile] [--channels-last] [--peak-tflops 790]

The measuring functions (``measure_train``, ``measure_forward``, ``forward_flops``) are reused by
the training benchmark. Warm-up steps (compilation included) are excluded from the rates.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ddpm_core.unet import PRESETS, UNet, UNetConfig, num_groups

T_MAX = 1000  # timesteps are drawn from 0..T-1 as in training


@dataclass(frozen=True)
class Timing:
    """Throughput of ``steps`` timed steps after the warm-up."""

    images_per_s: float
    step_s: float
    first_step_s: float  # the first warm-up step (includes torch.compile's compilation)


def sync(device: torch.device) -> None:
    """Wait for queued kernels so wall-clock times are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def precision_ctx(device: torch.device, precision: str) -> Iterator[None]:
    """bf16 autocast when asked, else a no-op."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        yield


def forward_flops(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> float:
    """FLOPs of one forward pass per image (FlopCounterMode, batch of one); x [B, C, H, W]."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x[:1], t[:1])
    return float(counter.get_total_flops())


def _timed(step: Callable[[], None], steps: int, warmup: int,
           device: torch.device) -> tuple[float, float]:
    """(seconds of the first warm-up step, seconds per timed step) of ``step()``."""
    first, per_step = interleaved({"m": step}, steps, warmup, device)["m"]
    return first, per_step


def interleaved(
    fns: dict[str, Callable[[], None]], steps: int, warmup: int, device: torch.device
) -> dict[str, tuple[float, float]]:
    """Time several step functions in turn, one step each per round, so that a varying load on
    a shared machine hits all alike: name -> (first warm-up step s, mean timed step s)."""
    first = dict.fromkeys(fns, 0.0)
    total = dict.fromkeys(fns, 0.0)
    for name, fn in fns.items():
        for i in range(warmup):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            if i == 0:
                first[name] = time.perf_counter() - t0
    for _ in range(steps):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            total[name] += time.perf_counter() - t0
    return {name: (first[name], total[name] / steps) for name in fns}


def train_step(
    model: nn.Module,
    x: torch.Tensor,
    t: torch.Tensor,
    precision: str = "fp32",
    optimizer: torch.optim.Optimizer | None = None,
) -> Callable[[], None]:
    """One training step: forward, MSE to a fixed target, backward, Adam step; x [B, C, H, W]."""
    assert x.ndim == 4 and t.shape == (x.shape[0],)
    model.train()
    opt = optimizer or torch.optim.Adam(model.parameters(), lr=2e-4)
    with torch.no_grad(), precision_ctx(x.device, precision):
        target = torch.randn_like(model(x, t), dtype=torch.float32)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with precision_ctx(x.device, precision):
            out = model(x, t)
        F.mse_loss(out.float(), target).backward()
        opt.step()

    return step


def forward_step(
    model: nn.Module, x: torch.Tensor, t: torch.Tensor, precision: str = "fp32"
) -> Callable[[], None]:
    """One sampling-style forward pass (no gradients; dropout off); x [B, C, H, W]."""
    assert x.ndim == 4 and t.shape == (x.shape[0],)

    def step() -> None:
        was_training = model.training
        model.eval()
        with torch.no_grad(), precision_ctx(x.device, precision):
            model(x, t)
        model.train(was_training)

    return step


def measure_train(
    model: nn.Module,
    x: torch.Tensor,
    t: torch.Tensor,
    steps: int,
    warmup: int = 1,
    precision: str = "fp32",
    optimizer: torch.optim.Optimizer | None = None,
) -> Timing:
    """Training throughput (forward + backward + Adam step) of x [B, C, H, W], t [B]."""
    first, step_s = _timed(train_step(model, x, t, precision, optimizer), steps, warmup, x.device)
    return Timing(x.shape[0] / step_s, step_s, first)


def measure_forward(
    model: nn.Module,
    x: torch.Tensor,
    t: torch.Tensor,
    steps: int,
    warmup: int = 1,
    precision: str = "fp32",
) -> Timing:
    """Forward throughput (eval mode, no gradients) of x [B, C, H, W], t [B]."""
    first, step_s = _timed(forward_step(model, x, t, precision), steps, warmup, x.device)
    return Timing(x.shape[0] / step_s, step_s, first)


class DiffusersUNet(nn.Module):
    """diffusers' UNet2DModel behind our call convention: (x [B,C,H,W], t [B]) -> tensor."""

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        from diffusers import UNet2DModel  # test/benchmark dependency only

        attn = [r in cfg.attn_resolutions for r in cfg.resolutions]
        self.net = UNet2DModel(
            sample_size=cfg.image_size,
            in_channels=cfg.in_channels,
            out_channels=cfg.out_channels,
            block_out_channels=tuple(cfg.base_channels * m for m in cfg.channel_mult),
            down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
            up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
            layers_per_block=cfg.num_res_blocks,
            flip_sin_to_cos=False,
            freq_shift=1,
            norm_eps=1e-6,
            norm_num_groups=num_groups(cfg.base_channels),  # 32 for all but narrow presets
            attention_head_dim=None,
            downsample_padding=0,
            dropout=cfg.dropout,
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(x, t, return_dict=False)[0]


def diffusers_twin(cfg: UNetConfig) -> nn.Module | None:
    """diffusers' UNet2DModel in the same configuration, or None when diffusers is missing."""
    try:
        return DiffusersUNet(cfg)
    except ImportError:
        return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cifar10")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="timed steps (after the warm-up)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak rate for the utilisation column (default 790 on cuda, none on cpu)")
    p.add_argument("--no-diffusers", action="store_true", help="skip the diffusers comparison")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Measure ours (and diffusers') for the preset; print a table; return the figures."""
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = PRESETS[args.preset]
    peak = args.peak_tflops if args.peak_tflops is not None else (
        790.0 if device.type == "cuda" else None)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    x = torch.randn(args.batch, cfg.in_channels, cfg.image_size, cfg.image_size, device=device)
    x = x.contiguous(memory_format=fmt)
    t = torch.randint(0, T_MAX, (args.batch,), device=device)

    models: dict[str, nn.Module] = {"ours": UNet(cfg)}
    twin = None if args.no_diffusers else diffusers_twin(cfg)
    if twin is not None:
        models["diffusers"] = twin
    flops, runners = {}, {}
    for name, model in models.items():
        model.to(device, memory_format=fmt)
        flops[name] = forward_flops(model, x, t)
        runners[name] = torch.compile(model) if args.compile else model
    # Ours and diffusers' steps alternate, so that the load of a shared machine hits both alike.
    train = interleaved({n: train_step(r, x, t, args.precision) for n, r in runners.items()},
                        args.steps, args.warmup, device)
    fwd = interleaved({n: forward_step(r, x, t, args.precision) for n, r in runners.items()},
                      args.steps, args.warmup, device)
    results: dict[str, dict[str, float]] = {}
    for name, model in models.items():
        train_ips = args.batch / train[name][1]
        results[name] = {
            "params": float(sum(p.numel() for p in model.parameters())),
            "gflop_per_image": flops[name] / 1e9,
            "train_images_per_s": train_ips,
            "forward_images_per_s": args.batch / fwd[name][1],
            "first_train_step_s": train[name][0],
            # training = forward + backward (2x forward): 3x forward FLOPs per image
            "train_peak_share": 3 * flops[name] * train_ips / (peak * 1e12) if peak else math.nan,
        }
    _print(args, device, peak, results)
    return results


def _print(args: argparse.Namespace, device: torch.device, peak: float | None,
           results: dict[str, dict[str, float]]) -> None:
    """Print the table and the ours/diffusers ratios."""
    print(f"preset {args.preset} | batch {args.batch} | steps {args.steps} | device {device} | "
          f"precision {args.precision} | compile {args.compile} | "
          f"channels_last {args.channels_last} | threads {torch.get_num_threads()}")
    peak_col = f"train % of {peak:g} TFLOP/s" if peak else "train % of peak"
    print(f"{'model':<10} {'params':>12} {'GFLOP/img':>10} {'train img/s':>12} "
          f"{'forward img/s':>14} {'first step s':>13} {peak_col:>24}")
    for name, r in results.items():
        share = f"{100 * r['train_peak_share']:.2f}" if peak else "n/a"
        print(f"{name:<10} {int(r['params']):>12,} {r['gflop_per_image']:>10.3f} "
              f"{r['train_images_per_s']:>12.1f} {r['forward_images_per_s']:>14.1f} "
              f"{r['first_train_step_s']:>13.2f} {share:>24}")
    if "diffusers" in results:
        o, d = results["ours"], results["diffusers"]
        print(f"ratio ours/diffusers: train {o['train_images_per_s'] / d['train_images_per_s']:.3f}"
              f" | forward {o['forward_images_per_s'] / d['forward_images_per_s']:.3f}")


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
