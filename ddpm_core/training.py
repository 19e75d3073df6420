"""The training loop: Adam with linear warm-up, global-norm clipping, EMA, checkpoint/resume, DDP.

Step convention: `step` counts completed optimiser steps; the checkpoint `ckpt_{step}.pt` holds
the state after `step` updates; update s + 1 uses lr = cfg.lr * min(1, (s + 1) / warmup_steps)
(the official code starts at 0/warmup, which wastes the first step).

Determinism: every rank draws the GLOBAL batch's data indices, t, importance weights, flips and
noise from generators seeded identically, then keeps its own slice; gradients are averaged by
DDP and the timestep sampler's importance history is fed the gathered global batch. So k steps on N
processes equal k steps on one process with the same global batch, up to float summation order
(exactly so for dropout-free models: dropout masks come from each rank's own torch RNG).

Interruption: SIGTERM / SIGINT set a flag; at the next step boundary the trainer writes a
checkpoint and raises `TrainingInterrupted`, a `SystemExit` with code 128 + signal (143 for
SIGTERM), so an uncaught one ends the script quietly with that exit code. After any kill,
calling `train` again with the same ckpt_dir resumes bitwise-exactly from the newest checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ddpm_core import distributed as D
from ddpm_core.checkpoint import (
    CheckpointError,
    checkpoint_path,
    find_resume,
    prune_checkpoints,
    save_checkpoint,
)
from ddpm_core.config import TrainConfig, weight_settings
from ddpm_core.inference import Autocast
from ddpm_core.losses import Loss
from ddpm_core.modelfile import ModelSpec
from ddpm_core.resample import TimestepSampler

_NO_BAD_STEP = 2**62


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN or infinite; nothing after the last good step saved."""


class TrainingInterrupted(SystemExit):
    """SIGTERM/SIGINT arrived: a checkpoint was written; exit code 128 + signal (143 for TERM)."""

    def __init__(self, step: int, path: Path | None, signum: int) -> None:
        super().__init__(128 + signum)
        self.step, self.path, self.signum = step, path, signum

    def __str__(self) -> str:
        return (f"training interrupted by {signal.Signals(self.signum).name} after step "
                f"{self.step}; checkpoint {self.path}")


@dataclass
class TrainResult:
    """Trained weights (CPU copies in eval mode), per-log-window metrics, where it resumed."""

    model: nn.Module
    ema: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from: Path | None = None
    step: int = 0


def warmup_factor(warmup_steps: int) -> Callable[[int], float]:
    """LambdaLR factor: update k + 1 (k = updates done) uses min(1, (k + 1) / warmup_steps)."""
    return lambda k: 1.0 if warmup_steps <= 0 else min(1.0, (k + 1) / warmup_steps)


class EpochSampler:
    """Global batches of data indices; epoch e is a permutation seeded by (seed, e)."""

    def __init__(self, n: int, seed: int, device: torch.device) -> None:
        self.n, self.seed, self.device = n, seed, device
        self.epoch, self.offset = 0, 0
        self._cached: tuple[int, Tensor, Tensor] | None = None

    def _perm(self, epoch: int) -> tuple[Tensor, Tensor]:
        """(CPU, device) permutation for an epoch; uploaded once per epoch, never per step."""
        if self._cached is None or self._cached[0] != epoch:
            gen = torch.Generator().manual_seed(D.batch_seed(self.seed, epoch))
            cpu = torch.randperm(self.n, generator=gen)
            if self.device.type == "cuda":
                cpu = cpu.pin_memory()
            self._cached = (epoch, cpu, cpu.to(self.device, non_blocking=True))
        return self._cached[1], self._cached[2]

    def next(self, b: int) -> tuple[Tensor, Tensor]:
        """The next b indices as (CPU, device) tensors; batches run across epoch boundaries."""
        cpu_parts, dev_parts = [], []
        while b > 0:
            cpu, dev = self._perm(self.epoch)
            k = min(b, self.n - self.offset)
            cpu_parts.append(cpu[self.offset:self.offset + k])
            dev_parts.append(dev[self.offset:self.offset + k])
            self.offset += k
            b -= k
            if self.offset == self.n:
                self.epoch, self.offset = self.epoch + 1, 0
        return torch.cat(cpu_parts), torch.cat(dev_parts)

    def state_dict(self) -> dict[str, int]:
        """Data position: epoch and offset within its permutation."""
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, d: dict[str, int]) -> None:
        """Restore the data position."""
        self.epoch, self.offset = int(d["epoch"]), int(d["offset"])


class Batcher:
    """Draws this rank's slice of each global batch: x0 [b,C,H,W] in [-1,1], t, weights, noise."""

    def __init__(self, data_uint8: Tensor, t_sampler: TimestepSampler, cfg: TrainConfig,
                 info: D.DistInfo) -> None:
        assert data_uint8.dtype == torch.uint8 and data_uint8.ndim == 4, \
            f"data must be uint8 [N,C,H,W], got {data_uint8.dtype} {tuple(data_uint8.shape)}"
        assert cfg.batch_size % info.world_size == 0, \
            f"batch_size {cfg.batch_size} not divisible by {info.world_size} processes"
        dev = info.device
        self.on_device = dev.type == "cpu" or (
            data_uint8.nbytes <= torch.cuda.mem_get_info(dev)[0] // 4)
        data = data_uint8.contiguous()
        self.data = data.to(dev) if self.on_device else data.pin_memory()
        self.t_sampler, self.cfg, self.device = t_sampler, cfg, dev
        self.B, self.b = cfg.batch_size, cfg.batch_size // info.world_size
        self.lo = info.rank * self.b
        self.sampler = EpochSampler(data.shape[0], cfg.seed, dev)
        self.gen = torch.Generator(dev).manual_seed(cfg.seed)
        self.memory_format = (torch.channels_last if cfg.channels_last
                              else torch.contiguous_format)

    def draw(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(x0, t, weights, noise) for this rank, plus the global t [B] for t_sampler.update."""
        B, lo, hi, gen, dev = self.B, self.lo, self.lo + self.b, self.gen, self.device
        idx_cpu, idx_dev = self.sampler.next(B)
        t, w = self.t_sampler.sample(B, gen)
        flip = torch.rand(B, generator=gen, device=dev) < 0.5 if self.cfg.hflip else None
        shape = (B, *self.data.shape[1:])
        noise = torch.randn(shape, generator=gen, device=dev)[lo:hi]
        if self.on_device:
            x = self.data[idx_dev[lo:hi]]
        else:
            x = self.data[idx_cpu[lo:hi]].pin_memory().to(dev, non_blocking=True)
        x0 = x.float() / 127.5 - 1.0
        if flip is not None:
            x0 = torch.where(flip[lo:hi, None, None, None], x0.flip(3), x0)
        mf = self.memory_format
        return (x0.contiguous(memory_format=mf), t[lo:hi], w[lo:hi],
                noise.contiguous(memory_format=mf), t)


class TrainStep:
    """One update: loss, backward, global-norm clip, Adam, warm-up, EMA (fp32), sampler update."""

    def __init__(self, model: nn.Module, loss: Loss, t_sampler: TimestepSampler, cfg: TrainConfig,
                 info: D.DistInfo) -> None:
        dev = info.device
        mf = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.model = model.to(dev).float().to(memory_format=mf).train()
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        net = (DistributedDataParallel(self.model, device_ids=[dev] if dev.type == "cuda"
                                       else None, gradient_as_bucket_view=True)
               if info.world_size > 1 else self.model)
        self.forward: nn.Module | Callable = Autocast(net, cfg.precision)
        if cfg.compile:
            self.forward = torch.compile(self.forward)
        self._params = list(self.model.parameters())
        fused = dev.type == "cuda"
        self.opt = torch.optim.Adam(self._params, lr=cfg.lr, fused=fused or None,
                                    foreach=None if fused else True)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, warmup_factor(cfg.warmup_steps))
        self.loss, self.t_sampler = loss, t_sampler
        self.cfg, self.world = cfg, info.world_size
        self._ema_params = list(self.ema.parameters())
        self._pairs_buf = list(zip(self.ema.buffers(), self.model.buffers(), strict=True))

    def __call__(self, x0: Tensor, t: Tensor, w: Tensor, noise: Tensor,
                 t_global: Tensor) -> tuple[Tensor, Tensor]:
        """Apply one update; returns (weighted mean loss, pre-clip grad norm), both on device."""
        terms = self.loss.losses(self.forward, x0, t, noise)
        loss = (terms["loss"] * w).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(self._params, self.cfg.grad_clip, foreach=True)
        self.opt.step()
        self.sched.step()
        # ema <- decay * ema + (1 - decay) * theta
        torch._foreach_lerp_(self._ema_params, self._params, 1.0 - self.cfg.ema_decay)
        for eb, b in self._pairs_buf:
            eb.copy_(b)
        per_example = terms["loss"].detach()
        if self.world > 1:  # importance history sees the global batch on every rank
            per_example = D.all_gather_cat(per_example)
        self.t_sampler.update(t_global, per_example)
        return loss.detach(), gnorm.detach()


class _StopOnSignal:
    """Turns SIGTERM/SIGINT into a flag read at step boundaries (a second signal acts as usual)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        self.signum = signum
        signal.signal(signum, self._old.get(signum, signal.SIG_DFL))

    def __enter__(self) -> _StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def _cpu_copy(template: nn.Module, state: dict[str, Tensor]) -> nn.Module:
    """A contiguous fp32 CPU module in eval mode holding `state`."""
    m = copy.deepcopy(template).cpu().to(memory_format=torch.contiguous_format)
    m.load_state_dict(state)
    return m.eval()


def train(model: nn.Module, loss: Loss, t_sampler: TimestepSampler, data_uint8: Tensor,
          cfg: TrainConfig, ckpt_dir: Path, device: str | torch.device | None = None,
          on_log: Callable[[int, dict[str, float]], None] | None = None,
          spec: ModelSpec | None = None) -> TrainResult:
    """Train `model` (in place) on uint8 images [N,C,H,W]; resumes from ckpt_dir if it holds any.

    `spec` (the architecture and diffusion of `model`) is stored in every checkpoint, so that
    `ddpm_core.modelfile.load_model_file` rebuilds the network from a checkpoint alone.
    """
    spec_dict = _check_spec(spec, model)
    info = D.init_distributed(device)
    dev, ckpt_dir = info.device, Path(ckpt_dir)
    if info.world_size != cfg.nproc * cfg.nnodes:
        warnings.warn(f"cfg.nproc={cfg.nproc} x cfg.nnodes={cfg.nnodes} but {info.world_size} "
                      "process(es) are running; the global batch stays cfg.batch_size",
                      stacklevel=2)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")  # TF32 matmuls, as in the peer measurements
    torch.manual_seed(cfg.seed + info.rank)  # dropout; restored from the checkpoint on resume
    step_fn = TrainStep(model, loss, t_sampler, cfg, info)
    batcher = Batcher(data_uint8, t_sampler, cfg, info)
    step, resumed_from, last_path = 0, None, None
    # the open log window: its first step and this rank's sums of loss and grad norm
    window_start, acc = 0, torch.zeros(2, device=dev)
    found = find_resume(ckpt_dir, cfg.resume_fallback)
    if found is not None:
        ck, resumed_from = found
        step = _restore(ck, step_fn, batcher, cfg, info)
        window_start, acc = _restore_window(ck, info)
        last_path = resumed_from
    history: list[dict[str, float]] = []
    step_d = torch.tensor(step, device=dev)
    first_bad = torch.tensor(_NO_BAD_STEP, device=dev)
    clock = (step, time.perf_counter())  # images/s: steps and time since the last log
    show = info.is_main and sys.stderr.isatty()
    with _StopOnSignal() as stop, tqdm(total=cfg.steps, initial=step, disable=not show,
                                       unit="step", dynamic_ncols=True) as bar:
        while step < cfg.steps:
            loss, gnorm = step_fn(*batcher.draw())
            step += 1
            step_d += 1
            bad = ~(torch.isfinite(loss) & torch.isfinite(gnorm))
            first_bad = torch.where(bad, torch.minimum(first_bad, step_d), first_bad)
            acc += torch.stack([loss, gnorm])
            bar.update(1)
            # all ranks stop at the same boundary, even if only one of them was signalled
            signum = (stop.signum or signal.SIGTERM) if D.any_true(stop.signum is not None) \
                else None
            do_log = step % cfg.log_every == 0 or step == cfg.steps
            do_ckpt = step % cfg.checkpoint_every == 0 or step == cfg.steps or signum is not None
            if not (do_log or do_ckpt):
                continue
            _check_finite(first_bad, last_path, cfg)
            if do_log:
                n = step - window_start
                stats = D.all_reduce_(acc.clone()).div_(n * info.world_size).tolist()
                now = time.perf_counter()
                metrics = {"loss": stats[0], "grad_norm": stats[1],
                           "lr": cfg.lr * warmup_factor(cfg.warmup_steps)(step - 1),
                           "images_per_s": (step - clock[0]) * cfg.batch_size
                           / max(now - clock[1], 1e-9)}
                history.append({"step": step, **metrics})
                bar.set_postfix(loss=f"{stats[0]:.4f}")
                if on_log is not None and info.is_main:
                    on_log(step, metrics)
                acc.zero_()
                window_start, clock = step, (step, time.perf_counter())
            if do_ckpt:
                t_save = time.perf_counter()
                last_path = _save(step, step_fn, batcher, cfg, info, ckpt_dir, spec_dict,
                                  (window_start, acc))
                # images/s count training only: shift the clock past the write
                clock = (clock[0], clock[1] + time.perf_counter() - t_save)
            if signum is not None and step < cfg.steps:
                raise TrainingInterrupted(step, last_path, int(signum))
    m, ema = step_fn.model, step_fn.ema
    return TrainResult(model=_cpu_copy(ema, m.state_dict()), ema=_cpu_copy(ema, ema.state_dict()),
                       history=history, resumed_from=resumed_from, step=step)


def _check_finite(first_bad: Tensor, last_path: Path | None, cfg: TrainConfig) -> None:
    """Raise TrainingDiverged if any step since the start had a non-finite loss or grad norm."""
    bad = int(D.all_reduce_(first_bad.clone(), "min").item())
    if bad == _NO_BAD_STEP:
        return
    kept = f"the last good checkpoint {last_path} is untouched" if last_path else \
        "no checkpoint was written"
    raise TrainingDiverged(
        f"loss or gradient norm became NaN/inf at step {bad}; {kept}. Lower the learning rate "
        f"(lr={cfg.lr}, warmup_steps={cfg.warmup_steps}), check that the data are uint8 images "
        f"mapped to [-1, 1], or train in fp32 (precision={cfg.precision!r}).")


def _check_spec(spec: ModelSpec | None, model: nn.Module) -> dict | None:
    """spec.to_dict(), after checking that spec builds a network shaped like `model`."""
    if spec is None:
        return None
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in spec.build_net().state_dict().items()}
    if shapes != {k: v.shape for k, v in model.state_dict().items()}:
        raise ValueError(f"spec.unet {spec.unet} does not describe the model being trained")
    return spec.to_dict()


def _save(step: int, step_fn: TrainStep, batcher: Batcher, cfg: TrainConfig, info: D.DistInfo,
          ckpt_dir: Path, spec: dict | None, window: tuple[int, Tensor]) -> Path:
    """Write the full training state after `step` (rank 0 writes; all ranks give RNG states
    and their sums of the open log window, so a resumed run logs the same averages)."""
    dev = info.device  # this rank's global torch RNG states: dropout draws from them
    cuda = torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None
    rng_all = D.all_gather_objects({"cpu": torch.get_rng_state(), "cuda": cuda})
    start, acc = window
    sums_all = D.all_gather_objects(acc.detach().cpu().clone())
    path = checkpoint_path(ckpt_dir, step)
    if info.is_main:
        state = {
            "step": step, "world_size": info.world_size, "config": dataclasses.asdict(cfg),
            "model": step_fn.model.state_dict(), "ema": step_fn.ema.state_dict(),
            "optimizer": step_fn.opt.state_dict(), "scheduler": step_fn.sched.state_dict(),
            "t_sampler": step_fn.t_sampler.state_dict(), "data": batcher.sampler.state_dict(),
            "rng": {"generator": batcher.gen.get_state(), "ranks": rng_all},
            "log_window": {"start": start, "sums": sums_all}, "spec": spec,
        }
        save_checkpoint(state, path)
        prune_checkpoints(ckpt_dir, cfg.keep_checkpoints)
    return path


def _restore_window(ck: dict, info: D.DistInfo) -> tuple[int, Tensor]:
    """The log window open at a checkpoint (one written at a signal lies inside a window): its
    first step and this rank's sums [loss, grad norm]; an empty window at the checkpoint's step
    for a checkpoint without one."""
    w, dev = ck.get("log_window"), info.device
    if w is None:
        return int(ck["step"]), torch.zeros(2, device=dev)
    sums = w["sums"]
    if len(sums) == info.world_size:
        return int(w["start"]), sums[info.rank].to(dev)
    # another process count: rank 0 carries the window's whole sum, rescaled so that the
    # logged mean (sum over ranks / (steps x ranks)) is unchanged
    total = torch.stack(list(sums)).sum(0) * (info.world_size / len(sums))
    return int(w["start"]), (total if info.rank == 0 else torch.zeros(2)).to(dev)


def _restore(ck: dict, step_fn: TrainStep, batcher: Batcher, cfg: TrainConfig,
             info: D.DistInfo) -> int:
    """Load a verified checkpoint into the live training state; returns its step."""
    old = ck.get("config", {})
    changed = [k for k, v in weight_settings(cfg).items() if k in old and old[k] != v]
    if changed:
        warnings.warn(f"resuming with changed settings {changed}: the run will not equal an "
                      "uninterrupted one", stacklevel=3)
    try:
        step_fn.model.load_state_dict(ck["model"])
        step_fn.ema.load_state_dict(ck["ema"])
        step_fn.opt.load_state_dict(ck["optimizer"])
        step_fn.sched.load_state_dict(ck["scheduler"])
        step_fn.t_sampler.load_state_dict(ck["t_sampler"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint at step {ck['step']} does not fit this model or "
                              f"timestep sampler: {e}") from e
    batcher.sampler.load_state_dict(ck["data"])
    batcher.gen.set_state(ck["rng"]["generator"])
    ranks = ck["rng"]["ranks"]
    if len(ranks) == info.world_size:
        torch.set_rng_state(ranks[info.rank]["cpu"])
        if info.device.type == "cuda" and ranks[info.rank]["cuda"] is not None:
            torch.cuda.set_rng_state(ranks[info.rank]["cuda"], info.device)
    else:
        warnings.warn(f"checkpoint written by {len(ranks)} processes, resuming on "
                      f"{info.world_size}: dropout masks are reseeded", stacklevel=3)
        torch.manual_seed(D.batch_seed(cfg.seed + info.rank, int(ck["step"])))
    return int(ck["step"])
