"""Training and sampling throughput of our U-Net beside diffusers' UNet2DModel, same step.

Training images/s time the trainer's real step (`TrainStep`: data draw on the device, L_simple
from `Loss`, backward, clip at global norm, Adam, warm-up, EMA). Sampling is network
evaluations x images per second: one forward pass at a large batch without gradients. Both
models run in the same process with the same settings; the implied wall time of the CIFAR-10
reproduction is 800k steps x 128 images, 50k samples x 1000 steps, 10k test images x 1000
bits/dim terms. Run `python -m benchmarks.train --help`. The
diffusers twin and the forward measurement come from benchmarks/unet.py.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import nn

from benchmarks.unet import diffusers_twin, measure_forward, sync
from ddpm_core.config import TrainConfig
from ddpm_core.diffusion import Diffusion
from ddpm_core.distributed import DistInfo
from ddpm_core.losses import Loss
from ddpm_core.resample import UniformSampler
from ddpm_core.training import Batcher, TrainStep
from ddpm_core.unet import PRESETS, UNet, UNetConfig

TRAIN_IMAGES = 800_000 * 128
SAMPLE_EVALS = 50_000 * 1000
BPD_EVALS = 10_000 * 1000


def timed(fn: Callable[[], object], steps: int, warmup: int,
          device: torch.device) -> tuple[float, float]:
    """(seconds of the first call, mean seconds per call over `steps` after `warmup` calls)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    first = time.perf_counter() - t0
    for _ in range(max(warmup - 1, 0)):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return first, (time.perf_counter() - t0) / steps


def bench_train(model: nn.Module, args: argparse.Namespace, ucfg: UNetConfig,
                device: torch.device) -> tuple[float, float]:
    """(training images/s, first step s) of the full trainer step."""
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch, hflip=True,
                      precision=args.precision, compile=args.compile,
                      channels_last=args.channels_last, checkpoint_every=10**9, log_every=10**9)
    t_sampler = UniformSampler(1000)
    info = DistInfo(0, 1, 0, device)
    step = TrainStep(model, Loss(Diffusion.from_schedule("linear", 1000)), t_sampler, cfg, info)
    shape = (max(4 * args.batch, 64), ucfg.in_channels, ucfg.image_size, ucfg.image_size)
    data = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator())
    batcher = Batcher(data, t_sampler, cfg, info)
    first, per_step = timed(lambda: step(*batcher.draw()), args.steps, args.warmup, device)
    return args.batch / per_step, first


def bench_forward(model: nn.Module, args: argparse.Namespace, ucfg: UNetConfig,
                  device: torch.device) -> float:
    """Network evaluations x images per second at the sampling batch, no gradients."""
    mf = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=mf)
    n, s = args.sample_batch, ucfg.image_size
    x = torch.randn(n, ucfg.in_channels, s, s, device=device).contiguous(memory_format=mf)
    t = torch.randint(0, 1000, (n,), device=device)
    fwd = torch.compile(model) if args.compile else model
    return measure_forward(fwd, x, t, args.steps, args.warmup, args.precision).images_per_s


def main(argv: list[str] | None = None) -> None:
    """Measure both networks and print a table with ratios and implied wall times."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default="cifar10", choices=sorted(PRESETS))
    p.add_argument("--batch", type=int, default=128, help="training batch")
    p.add_argument("--sample-batch", type=int, default=None,
                   help="forward batch for sampling (default 1024 on CUDA, else --batch)")
    p.add_argument("--steps", type=int, default=20, help="timed steps / forward calls")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed calls, the first included (default 3 on CUDA, 1 on the CPU)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--skip-diffusers", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.warmup is None:
        args.warmup = 3 if device.type == "cuda" else 1
    if args.sample_batch is None:
        args.sample_batch = 1024 if device.type == "cuda" else args.batch
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")
    ucfg = PRESETS[args.preset]
    builders: dict[str, Callable[[], nn.Module | None]] = {"ours": lambda: UNet(ucfg)}
    if not args.skip_diffusers:
        builders["diffusers"] = lambda: diffusers_twin(ucfg)
    rows: dict[str, dict[str, float]] = {}
    for name, build in builders.items():
        torch.manual_seed(0)
        model = build()
        if model is None:  # diffusers not installed
            continue
        model = model.to(device)
        params = sum(p.numel() for p in model.parameters())
        ips, first = bench_train(model, args, ucfg, device)
        fwd = bench_forward(model, args, ucfg, device)
        rows[name] = {"params (M)": params / 1e6, "train images/s": ips, "first step s": first,
                      "sampling NFE*images/s": fwd,
                      "implied train 800k x 128 (h)": TRAIN_IMAGES / ips / 3600,
                      "implied sampling 50k x 1000 (h)": SAMPLE_EVALS / fwd / 3600,
                      "implied bpd 10k x 1000 (h)": BPD_EVALS / fwd / 3600}
        rows[name]["implied total (h)"] = sum(v for k, v in rows[name].items()
                                              if k.startswith("implied"))
        if device.type == "cuda":
            rows[name]["peak memory GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.reset_peak_memory_stats(device)
        del model
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {device} ({gpu}), torch {torch.__version__}, preset {args.preset}, "
          f"batch {args.batch}, sample batch {args.sample_batch}, precision {args.precision}, "
          f"compile {args.compile}, "
          f"channels_last {args.channels_last}, {args.steps} timed steps after {args.warmup}")
    names = list(rows)
    header = f"{'':34s}" + "".join(f"{n:>14s}" for n in names)
    print(header + (f"{'ours/diffusers':>16s}" if len(names) == 2 else ""))
    for key in rows["ours"]:
        vals = [rows[n][key] for n in names]
        line = f"{key:34s}" + "".join(f"{v:14.4g}" for v in vals)
        if len(names) == 2 and vals[1]:
            line += f"{vals[0] / vals[1]:16.3f}"
        print(line)


if __name__ == "__main__":
    main()
