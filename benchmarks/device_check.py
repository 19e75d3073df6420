"""Device check: one command that fits a short GPU window, one table, one JSON.

    bash benchmarks/device_check.sh                      # a bare GPU machine: install, then this
    python -m benchmarks.device_check [--device cuda|cpu] [--quick] [--out device_check.json]

Our U-Net and diffusers' UNet2DModel (cifar10 preset, training batch 128, sampling batch 1000;
--quick: the digits preset, batch 8 / 16) in the same run, steps interleaved
(benchmarks.unet.interleaved): training images/s of the trainer's step (ddpm_core.training
.TrainStep) in fp32, bf16 eager and bf16 compiled, sampling NFE x images/s of the network call
(ddpm_core.inference.inference_model) in bf16 eager and compiled (CUDA graphs on a GPU); then
correctness on the device (bits/dim bf16 vs fp32, compiled vs eager outputs, one DDP training
step under torchrun, a tiny digits `dvc repro`), the targets and a torch.profiler top-5.

Every section runs under its own time budget (SIGALRM) and try/except, and the JSON is rewritten
after each, so a failure or a timeout keeps the rest. Budgets on one H100/H200, in seconds
(expected time in brackets, from REFERENCE.md's "Peer speed": ~0.09 s per eager training step
at batch 128, ~93 s for the first compiled bf16 training step, ~0.13 s per forward at 1000):
    environment      30  [~5: imports, FLOP count]
    train_eager      60  [~20: 4 configs x 23 steps, model builds]
    sample_eager     30  [~5: 2 models x 12 calls]
    bits_per_dim     40  [~10: 2 precisions x 32 images x 1000 terms]
    torchrun         60  [~20: start-up, nccl, 1 step]
    train_compiled  210  [~190: 2 first compiles of ~90 s, 2 x 23 steps]
    sample_graphs   100  [~80: 2 compiles of ~40 s, Triton kernels partly cached]
    profile          20  [~5]
    dvc_repro       120  [~60: 5 stage processes, each importing torch]
and a total budget (--budget, default 450 s, 100 s with --quick) after which no section starts
(device_check.sh passes what its 470 s leave after the install).
Weights: our U-Net's official init makes its output ~1e-5 (last layers scaled by 1e-5), which
would make every precision comparison vacuous, so its weights are redrawn with unit gain.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from benchmarks.unet import diffusers_twin, forward_flops, forward_step, interleaved, sync
from benchmarks.unet import train_step as simple_train_step
from ddpm_core.config import TrainConfig
from ddpm_core.diffusion import Diffusion
from ddpm_core.distributed import DistInfo
from ddpm_core.files import write_json
from ddpm_core.inference import inference_model
from ddpm_core.losses import Loss
from ddpm_core.resample import UniformSampler
from ddpm_core.training import Batcher, TrainStep
from ddpm_core.unet import PRESETS, UNet, UNetConfig

REPO = Path(__file__).resolve().parents[1]
# Measured dense bf16 matrix rate (8192^3 products): H100 ~790 TFLOP/s (REFERENCE.md "Peer
# speed"), H200 769-798 (.library/device/KINDS.md); the same chip, so one number for both.
PEAK_BF16_TFLOPS = {"H100": 790.0, "H200": 790.0}
TARGETS = {"train": 4_000.0, "sample": 20_000.0}  # issue 18, on one H100: img/s, NFE x img/s
T_MAX = 1000
DVC_TARGETS = ("sample@simple", "bpd@simple")  # the stages that run the network: prepare, train,
# gamma, sample, bpd (features/fid/report/track need torch-fidelity and MLflow, not a GPU)


@dataclass(frozen=True)
class Settings:
    """Sizes of one device check (the full GPU run or --quick)."""

    preset: str
    batch: int
    sample_batch: int
    steps: int            # timed training steps per config
    warmup: int           # untimed, the first one timed separately (compilation)
    sample_steps: int     # timed forward calls per config
    bpd_images: int
    bpd_T: int
    budget_s: float


FULL = Settings("cifar10", 128, 1000, 20, 3, 10, 32, T_MAX, 450.0)
QUICK = Settings("digits", 8, 16, 2, 1, 2, 6, 10, 100.0)


@dataclass
class Context:
    """What the sections share: arguments, device, settings, and models built on the way."""

    args: argparse.Namespace
    device: torch.device
    s: Settings
    deadline: float
    built: dict[str, Any] = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def compile_ok(self) -> str | None:
        """None when compile sections run, else the reason they are skipped."""
        if self.cuda or self.args.cpu_compile:
            return None
        return "skipped (cpu quick)" if self.args.quick else "skipped (cpu: use --cpu-compile)"


class SectionTimeout(Exception):
    """A section ran past its time budget."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[list[bool]]:
    """Raise SectionTimeout in the main thread after `seconds` (SIGALRM); yields [fired], which
    tells a timeout that a library re-raised as its own error (InductorError) from the rest."""
    fired = [False]

    def on_alarm(signum: int, frame: object) -> None:
        fired[0] = True
        raise SectionTimeout(f"over its {seconds:.0f} s budget")

    old = signal.signal(signal.SIGALRM, on_alarm)
    # again every second: an exception raised inside a weakref callback or __del__ is only
    # printed ("Exception ignored"), and a compilation would run on past its budget
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01), 1.0)
    try:
        yield fired
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ----------------------------------------------------------------------------- models


def ours(cfg: UNetConfig, seed: int = 0) -> UNet:
    """Our U-Net with every weight drawn at unit gain (the official init outputs ~1e-5)."""
    torch.manual_seed(seed)
    net = UNet(cfg)
    gen = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            bound = math.sqrt(6.0 / (m.weight[0].numel() + m.weight[:, 0].numel()))
            with torch.no_grad():
                m.weight.uniform_(-bound, bound, generator=gen)  # Xavier-uniform, gain 1
    return net


def builders(cfg: UNetConfig) -> dict[str, Callable[[], nn.Module | None]]:
    """ours and diffusers' twin (None when diffusers is not installed)."""
    def twin() -> nn.Module | None:
        torch.manual_seed(0)
        return diffusers_twin(cfg)
    return {"ours": lambda: ours(cfg), "diffusers": twin}


def trainer_step(model: nn.Module, ctx: Context, precision: str, compile: bool) -> Callable:
    """One call = one step of the trainer (data draw, L_simple, backward, clip, Adam, EMA)."""
    s, cfg_u = ctx.s, PRESETS[ctx.s.preset]
    cfg = TrainConfig(steps=10**6, batch_size=s.batch, hflip=True, precision=precision,
                      compile=compile, checkpoint_every=10**9, log_every=10**9)
    t_sampler, info = UniformSampler(T_MAX), DistInfo(0, 1, 0, ctx.device)
    step = TrainStep(model, Loss(Diffusion.from_schedule("linear", T_MAX)), t_sampler, cfg, info)
    shape = (max(4 * s.batch, 64), cfg_u.in_channels, cfg_u.image_size, cfg_u.image_size)
    data = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator())
    batcher = Batcher(data, t_sampler, cfg, info)
    return lambda: step(*batcher.draw())


def sampling_call(model: nn.Module, compile: bool) -> nn.Module:
    """The samplers' bf16 network call (ddpm_core.inference), wrapper in eval mode too:
    benchmarks.unet.forward_step restores the wrapper's training flag after each call, and
    inference_model's Autocast wrapper starts in training mode (which would switch the
    network's dropout on from the second call)."""
    return inference_model(model, "bf16", compile=compile).eval()


def graph_step(step: Callable[[], None]) -> Callable[[], None]:
    """step() as a new iteration for CUDA graph trees (two compiled networks alternate)."""
    def fn() -> None:
        torch.compiler.cudagraph_mark_step_begin()
        step()
    return fn


def sample_inputs(ctx: Context) -> tuple[torch.Tensor, torch.Tensor]:
    """x [sample_batch, C, H, W] and t [sample_batch] on the device, fixed seed."""
    cfg, n = PRESETS[ctx.s.preset], ctx.s.sample_batch
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, cfg.in_channels, cfg.image_size, cfg.image_size, generator=gen)
    t = torch.randint(0, T_MAX, (n,), generator=gen)
    return x.to(ctx.device), t.to(ctx.device)


def peak_tflops(ctx: Context) -> float | None:
    """The bf16 peak of this GPU (by name), None on the CPU or an unknown GPU."""
    if not ctx.cuda:
        return None
    name = torch.cuda.get_device_name(ctx.device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def measure(ctx: Context, sec: dict, kind: str, fns: dict[str, Callable[[], None]],
            steps: int, warmup: int, batch: int, label: str) -> None:
    """Interleaved rates of fns (name -> step) into sec["rates"][label][name]; warm-ups of each
    model first (the first call's seconds kept: the compilation), so a budget cut keeps them."""
    rates = sec.setdefault("rates", {}).setdefault(label, {})
    for name, fn in fns.items():
        sync(ctx.device)
        t0 = time.perf_counter()
        fn()
        sync(ctx.device)
        rates[name] = {"first_call_s": round(time.perf_counter() - t0, 3)}
        for _ in range(warmup - 1):
            fn()
    timed = interleaved(fns, steps, 0, ctx.device)
    flops = ctx.built.get("gflop", {})
    peak = peak_tflops(ctx)
    mult = 3 if kind == "train" else 1  # forward + backward = 3 forward passes of FLOPs
    for name, (_, per) in timed.items():
        r = rates[name]
        r["per_s"] = batch / per
        if peak and name in flops:
            r["peak_share"] = mult * flops[name] * 1e9 * r["per_s"] / (peak * 1e12)
    if "ours" in timed and "diffusers" in timed:
        rates["ratio"] = rates["ours"]["per_s"] / rates["diffusers"]["per_s"]


# ----------------------------------------------------------------------------- sections


def sec_environment(ctx: Context, sec: dict) -> None:
    """Versions, device, install time (passed in by device_check.sh)."""
    def version(pkg: str) -> str | None:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    sec.update(python=platform.python_version(), executable=sys.executable,
               torch=torch.__version__, cuda=torch.version.cuda,
               cudnn=torch.backends.cudnn.version() if ctx.cuda else None,
               diffusers=version("diffusers"), dvc=version("dvc"), mlflow=version("mlflow"),
               cpu_count=os.cpu_count(), device=str(ctx.device),
               install_s=ctx.args.install_s, install=ctx.args.install_note)
    if ctx.cuda:
        p = torch.cuda.get_device_properties(ctx.device)
        sec.update(gpu=p.name, capability=f"sm_{p.major}{p.minor}",
                   gpu_memory_gib=round(p.total_memory / 2**30, 1),
                   gpu_count=torch.cuda.device_count())
    else:
        sec.update(gpu=None)
    sec["peak_bf16_tflops"] = peak_tflops(ctx)
    cfg = PRESETS[ctx.s.preset]
    x, t = sample_inputs(ctx)
    gflop = {}
    for name, build in builders(cfg).items():
        model = build()
        if model is not None:
            gflop[name] = forward_flops(model.to(ctx.device), x, t) / 1e9
            sec.setdefault("params", {})[name] = sum(p.numel() for p in model.parameters())
    ctx.built["gflop"] = sec["gflop_per_image"] = gflop


def sec_train_eager(ctx: Context, sec: dict) -> None:
    """Training images/s, fp32 and bf16 eager, ours and diffusers interleaved."""
    cfg = PRESETS[ctx.s.preset]
    fns = {}
    for precision in ("fp32", "bf16"):
        for name, build in builders(cfg).items():
            model = build()
            if model is not None:
                fns[name, precision] = trainer_step(model.to(ctx.device), ctx, precision, False)
    if ("diffusers", "fp32") not in fns:
        sec["note"] = "diffusers not installed: ours only"
    for precision in ("fp32", "bf16"):  # each precision interleaved ours/diffusers
        sub = {n: f for (n, p), f in fns.items() if p == precision}
        measure(ctx, sec, "train", sub, ctx.s.steps, ctx.s.warmup, ctx.s.batch, precision)
    ctx.built["train_step_eager_bf16"] = fns["ours", "bf16"]


def sec_sample_eager(ctx: Context, sec: dict) -> None:
    """Sampling NFE x images/s: the bf16 network call at the sampling batch, no gradients."""
    cfg = PRESETS[ctx.s.preset]
    x, t = sample_inputs(ctx)
    fns = {}
    for name, build in builders(cfg).items():
        model = build()
        if model is not None:
            net = sampling_call(model.to(ctx.device), compile=False)
            fns[name] = forward_step(net, x, t)
            ctx.built[f"eager_{name}"] = net
    measure(ctx, sec, "sample", fns, ctx.s.sample_steps, max(ctx.s.warmup - 1, 1),
            ctx.s.sample_batch, "bf16")


def sec_bits_per_dim(ctx: Context, sec: dict) -> None:
    """The bound (DDPM eq. 5) of the same images and noise in bf16 and fp32: |Δ mean| <= SE."""
    from ddpm_core.api import bits_per_dim_per_image

    cfg, n, T = PRESETS[ctx.s.preset], ctx.s.bpd_images, ctx.s.bpd_T
    model = ours(cfg).to(ctx.device)
    diff = Diffusion.from_schedule("linear", T)
    gen = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (n, cfg.image_size, cfg.image_size, cfg.in_channels),
                           dtype=torch.uint8, generator=gen).numpy()
    per = {}
    for precision in ("fp32", "bf16"):
        net = inference_model(model, precision)
        t0 = time.perf_counter()
        per[precision] = bits_per_dim_per_image(net, diff, images, batch_size=n, t_batch=10,
                                                device=ctx.device)
        sec[f"{precision}_s"] = round(time.perf_counter() - t0, 2)
    se = float(per["fp32"].std(ddof=1) / math.sqrt(n))
    delta = float(per["bf16"].mean() - per["fp32"].mean())
    sec.update(images=n, T=T, bpd_fp32=float(per["fp32"].mean()),
               bpd_bf16=float(per["bf16"].mean()), delta=delta, se=se,
               max_abs_delta_per_image=float(np.abs(per["bf16"] - per["fp32"]).max()),
               passed=bool(abs(delta) <= se))


def torchrun_worker(out: Path, device: str, quick: bool) -> None:
    """Under torchrun: one DDP training step over a process group (nccl on CUDA, gloo on CPU)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    kwargs = {"device_id": dev} if dev.type == "cuda" else {}
    dist.init_process_group(backend=backend, init_method="env://", **kwargs)
    s = QUICK if quick else FULL
    cfg = PRESETS[s.preset]
    model = ours(cfg).to(dev)
    before = [p.detach().clone() for p in model.parameters()]
    ddp = DistributedDataParallel(model, device_ids=[dev] if dev.type == "cuda" else None)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(s.batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=gen)
    t = torch.randint(0, T_MAX, (s.batch,), generator=gen)
    step = simple_train_step(ddp, x.to(dev), t.to(dev), "bf16" if dev.type == "cuda" else "fp32")
    t0 = time.perf_counter()
    step()  # DDP's backward all-reduces the gradients through the process group
    sync(dev)
    seconds = time.perf_counter() - t0
    ones = torch.ones(1, device=dev)
    dist.all_reduce(ones)
    change = max(float((p.detach() - b).abs().max()) for p, b in zip(model.parameters(), before,
                                                                       strict=True))
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    if dist.get_rank() == 0:
        write_json({"backend": dist.get_backend(), "world_size": dist.get_world_size(),
                    "all_reduce": float(ones.item()), "step_s": round(seconds, 3),
                    "max_weight_change": change, "finite": finite}, out)
    dist.destroy_process_group()


def torchrun_cmd() -> list[str]:
    """torchrun beside this interpreter, else `python -m torch.distributed.run`."""
    exe = Path(sys.executable).with_name("torchrun")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "torch.distributed.run"]


def sec_torchrun(ctx: Context, sec: dict) -> None:
    """`torchrun --standalone --nproc_per_node=1` of one DDP step (one GPU: NCCL refuses two
    ranks on one device)."""
    with tempfile.TemporaryDirectory(prefix="device-check-") as tmp:
        out = Path(tmp) / "step.json"
        cmd = [*torchrun_cmd(), "--standalone", "--nproc_per_node=1", "-m",
               "benchmarks.device_check", "--torchrun-worker", str(out), "--device",
               ctx.device.type] + (["--quick"] if ctx.args.quick else [])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
        t0 = time.perf_counter()
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=max(ctx.deadline - time.monotonic(), 1))
        sec["wall_s"] = round(time.perf_counter() - t0, 2)
        sec["command"] = " ".join(cmd[:4]) + " -m benchmarks.device_check --torchrun-worker ..."
        if r.returncode != 0 or not out.is_file():
            raise RuntimeError(f"torchrun exit {r.returncode}: {tail(r.stderr or r.stdout)}")
        sec.update(json.loads(out.read_text()))
    want = "nccl" if ctx.cuda else "gloo"
    sec["passed"] = bool(sec["backend"] == want and sec["all_reduce"] == sec["world_size"]
                         and sec["finite"] and sec["max_weight_change"] > 0)


def sec_train_compiled(ctx: Context, sec: dict) -> str | None:
    """Training images/s in bf16 with torch.compile (the trainer's compile=True); first-step
    seconds (the compilation) per model."""
    if ctx.compile_ok:
        return ctx.compile_ok
    cfg = PRESETS[ctx.s.preset]
    fns = {}
    for name, build in builders(cfg).items():
        model = build()
        if model is not None:
            fns[name] = trainer_step(model.to(ctx.device), ctx, "bf16", True)
    measure(ctx, sec, "train", fns, ctx.s.steps, ctx.s.warmup, ctx.s.batch, "bf16_compiled")
    ctx.built["train_step_compiled_bf16"] = fns["ours"]
    return None


def sec_sample_graphs(ctx: Context, sec: dict) -> str | None:
    """Sampling NFE x images/s with the compiled network call (mode reduce-overhead: CUDA
    graphs), and the compiled output against the eager one on the same input."""
    if ctx.compile_ok:
        return ctx.compile_ok if ctx.args.quick else "skipped (cpu: CUDA graphs need a GPU)"
    cfg = PRESETS[ctx.s.preset]
    x, t = sample_inputs(ctx)
    fns, nets = {}, {}
    for name, build in builders(cfg).items():
        model = build()
        if model is not None:
            nets[name] = sampling_call(model.to(ctx.device), compile=True)
            fns[name] = graph_step(forward_step(nets[name], x, t))
    if not ctx.cuda:
        sec["note"] = "compiled without CUDA graphs (cpu)"
    measure(ctx, sec, "sample", fns, ctx.s.sample_steps, max(ctx.s.warmup - 1, 1),
            ctx.s.sample_batch, "bf16_graphs")
    ctx.built["graphs_ours"] = nets["ours"]
    # compiled vs eager: the compiled bf16 call may differ from eager bf16 by no more than eager
    # bf16 differs from fp32 (another summation order, not another precision)
    model = ours(cfg).to(ctx.device)
    with torch.no_grad():
        torch.compiler.cudagraph_mark_step_begin()
        compiled = nets["ours"](x, t).clone()  # a replay's output is overwritten by the next
        eager = inference_model(model, "bf16")(x, t)
        fp32 = inference_model(model, "fp32")(x, t)
    d_compiled = float((compiled - eager).abs().max())
    d_bf16 = float((eager - fp32).abs().max())
    sec["compiled_vs_eager"] = {"max_abs_diff": d_compiled, "bf16_vs_fp32_max_abs_diff": d_bf16,
                                "output_max_abs": float(fp32.abs().max()),
                                "passed": bool(d_compiled <= 2 * d_bf16 + 1e-3)}
    return None


def top_ops(prof: Any, device_time: bool, k: int = 5) -> list[dict]:
    """The k ops of most self time (device time: CUDA kernels; else CPU), in ms."""
    def self_us(e: Any) -> float:
        if device_time:
            return float(getattr(e, "self_device_time_total", None)
                         or getattr(e, "self_cuda_time_total", 0.0))
        return float(e.self_cpu_time_total)

    events = sorted(prof.key_averages(), key=self_us, reverse=True)[:k]
    return [{"op": e.key, "self_ms": round(self_us(e) / 1e3, 3), "calls": e.count}
            for e in events if self_us(e) > 0]


def sec_profile(ctx: Context, sec: dict) -> None:
    """torch.profiler of one training step and one sampling call of ours (compiled when the
    compile sections ran, else eager): top 5 ops by self time."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.cuda else [])
    x, t = sample_inputs(ctx)
    which = {"train_step": ("train_step_compiled_bf16", "train_step_eager_bf16"),
             "sample_call": ("graphs_ours", "eager_ours")}
    for what, keys in which.items():
        key = next((k for k in keys if k in ctx.built), None)
        if key is None:
            sec[what] = {"skipped": "no model (its speed section failed)"}
            continue
        fn = ctx.built[key] if what == "train_step" else forward_step(ctx.built[key], x, t)
        fn()  # warm
        sync(ctx.device)
        with profile(activities=acts) as prof:
            fn()
            sync(ctx.device)
        sec[what] = {"of": key, "cpu": top_ops(prof, False)}
        if ctx.cuda:
            sec[what]["cuda"] = top_ops(prof, True)


PROBE = '''\
import atexit, json, os, sys
def _report():
    torch = sys.modules.get("torch")
    if torch is None:
        return
    used = torch.cuda.is_initialized() and torch.cuda.max_memory_allocated() > 0
    with open(os.environ["DEVICE_CHECK_PROBE"], "a") as f:
        f.write(json.dumps({"argv": sys.argv, "cuda_available": torch.cuda.is_available(),
                            "cuda_used": bool(used)}) + "\\n")
atexit.register(_report)
'''


def sec_dvc_repro(ctx: Context, sec: dict) -> str | None:
    """A tiny digits `dvc repro` of the network stages in a copy of the repo; a probe
    (sitecustomize) records in each stage process whether it put tensors on CUDA on its own."""
    sys.path.insert(0, str(REPO / "tests"))
    from helpers import pipeline_env, pipeline_repo, tiny_params

    dvc = Path(sys.executable).with_name("dvc")
    missing = [n for n, ok in (("dvc", dvc.is_file()), ("git", shutil.which("git"))) if not ok]
    if missing:
        return f"skipped: {' and '.join(missing)} not installed beside {sys.executable}"
    params = tiny_params()
    params["variants"] = {"simple": params["variants"]["simple"]}
    with tempfile.TemporaryDirectory(prefix="device-check-dvc-") as tmp:
        root, probe_dir = Path(tmp) / "repo", Path(tmp) / "probe"
        root.mkdir()
        probe_dir.mkdir()
        (probe_dir / "sitecustomize.py").write_text(PROBE)
        env = pipeline_env()
        pipeline_repo(root, params, env)
        env.update(PYTHONPATH=str(probe_dir), DEVICE_CHECK_PROBE=str(probe_dir / "log.jsonl"))
        t0 = time.perf_counter()
        r = subprocess.run([str(dvc), "repro", *DVC_TARGETS], cwd=root, env=env,
                           capture_output=True, text=True,
                           timeout=max(ctx.deadline - time.monotonic(), 1))
        sec["wall_s"] = round(time.perf_counter() - t0, 2)
        sec["targets"] = list(DVC_TARGETS)
        if r.returncode != 0:
            raise RuntimeError(f"dvc repro exit {r.returncode}: {tail(r.stdout + r.stderr)}")
        sec["stages_run"] = [ln.split("'")[1] for ln in r.stdout.splitlines()
                             if ln.startswith("Running stage '")]
        log = probe_dir / "log.jsonl"
        procs = [json.loads(ln) for ln in log.read_text().splitlines()] if log.is_file() else []
        stage = {" ".join([Path(p["argv"][0]).stem, *p["argv"][1:2]]): p["cuda_used"]
                 for p in procs}
        sec["cuda_used_by"] = sorted(k for k, v in stage.items() if v)
        sec["stage_processes"] = len(procs)
        timing = root / "timings" / "train" / "simple.json"
        if timing.is_file():
            sec["train_timings"] = json.loads(timing.read_text())
    want_cuda = ctx.cuda
    sec["device"] = "cuda" if sec["cuda_used_by"] else "cpu"
    # on a GPU, train, sample and bpd must have used it without being told; on the CPU none
    net_stages = [k for k in stage if k.split(" ")[0] in ("train", "sample", "bpd")]
    sec["passed"] = bool(len(net_stages) >= 3 and all(stage[k] == want_cuda for k in net_stages))
    return None


# name, function, budget s (on one H100/H200; the estimates are in the module docstring), and
# the least time worth starting it with (the tiny repro's 5 stage processes need ~45 s even on
# a quiet machine: each imports torch)
SECTIONS: list[tuple[str, Callable[[Context, dict], str | None], float, float]] = [
    ("environment", sec_environment, 30, 0),
    ("train_eager", sec_train_eager, 60, 5),
    ("sample_eager", sec_sample_eager, 30, 5),
    ("bits_per_dim", sec_bits_per_dim, 40, 5),
    ("torchrun", sec_torchrun, 60, 10),
    ("train_compiled", sec_train_compiled, 210, 30),
    ("sample_graphs", sec_sample_graphs, 100, 20),
    ("profile", sec_profile, 20, 5),
    ("dvc_repro", sec_dvc_repro, 120, 45),
]


# ----------------------------------------------------------------------------- targets, report


def targets(report: dict, cuda: bool) -> dict:
    """Training and sampling targets of one H100 against ours' best rates; a miss names the
    profile's top device ops."""
    out: dict[str, Any] = {}
    secs = report["sections"]
    for kind, sections in (("train", ("train_eager", "train_compiled")),
                           ("sample", ("sample_eager", "sample_graphs"))):
        best, how = None, None
        for name in sections:
            for label, rates in secs.get(name, {}).get("rates", {}).items():
                v = rates.get("ours", {}).get("per_s")
                if v is not None and (best is None or v > best):
                    best, how = v, label
        row: dict[str, Any] = {"target": TARGETS[kind], "best": best, "config": how}
        if not cuda:
            row["status"] = "n/a on cpu (targets are for one H100)"
        elif best is None:
            row["status"] = "not measured"
        else:
            row["status"] = "met" if best >= TARGETS[kind] else "missed"
            if best < TARGETS[kind]:
                prof = secs.get("profile", {}).get("train_step" if kind == "train"
                                                   else "sample_call", {})
                row["top_ops"] = prof.get("cuda") or prof.get("cpu")
        out[kind] = row
    return out


def clean(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf -> None, tuples -> lists."""
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [clean(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, np.generic):
        return clean(obj.item())
    return obj


def save(report: dict, path: Path) -> None:
    """The JSON and the table beside it (.txt), both atomic."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = clean(report)
    json.dumps(data, allow_nan=False)  # fails loudly on anything not JSON
    write_json(data, path, sort_keys=False)
    from ddpm_core.files import atomic_write_text

    atomic_write_text(path.with_suffix(".txt"), table(report) + "\n")


def tail(text: str, n: int = 400) -> str:
    """The last n characters of a process's output, on one line."""
    return " | ".join(text.strip().splitlines()[-6:])[-n:]


def _num(v: Any, fmt: str = ",.0f") -> str:
    return "-" if v is None else format(v, fmt)


def table(report: dict) -> str:
    """The one table: speed (ours, diffusers, ratio, % of the bf16 peak), correctness,
    targets, the profile's top ops and each section's status and seconds."""
    secs, st = report["sections"], report["settings"]
    env = secs.get("environment", {})
    w = (38, 12, 12, 11, 9)
    lines = [f"device check {report['started_utc']} | {st['device']} "
             f"({env.get('gpu') or 'no GPU'}) | torch {env.get('torch')} CUDA {env.get('cuda')} | "
             f"preset {st['preset']}, batch {st['batch']}, sample batch {st['sample_batch']}"
             + (" | --quick" if st["quick"] else "")]
    head = ("measurement", "ours", "diffusers", "ours/diff", "% peak")
    lines.append("".join(f"{h:<{w[0]}}" if i == 0 else f"{h:>{w[i]}}"
                         for i, h in enumerate(head)) + "  note")

    def row(label: str, a: str = "", b: str = "", r: str = "", p: str = "", note: str = "") -> None:
        lines.append(f"{label:<{w[0]}}{a:>{w[1]}}{b:>{w[2]}}{r:>{w[3]}}{p:>{w[4]}}  {note}"
                     .rstrip())

    def status_note(name: str) -> str | None:
        s = secs.get(name)
        if s is None:
            return "not run"
        if s.get("status") in ("ok", "running"):
            return None
        return f"{s.get('status')}: {s.get('reason', '')}" if s.get("status") != "skipped" \
            else s.get("reason", "skipped")

    install = env.get("install_s")
    row("install (README command)", _num(install, ".1f") + (" s" if install is not None else ""),
        note=str(env.get("install") or ""))
    row("bf16 peak TFLOP/s", _num(env.get("peak_bf16_tflops")) if env.get("peak_bf16_tflops")
        else "n/a", note="measured dense bf16 matmul rate" if env.get("peak_bf16_tflops") else
        "no H100/H200")
    g = env.get("gflop_per_image", {})
    row("GFLOP per forward image", _num(g.get("ours"), ".3f"), _num(g.get("diffusers"), ".3f"),
        note=f"diffusers {env['diffusers']}" if env.get("diffusers") else
        "diffusers not installed: no diffusers column (carry its wheels in .whl)")
    speed = [("train img/s fp32", "train_eager", "fp32"),
             ("train img/s bf16 eager", "train_eager", "bf16"),
             ("train img/s bf16 compiled", "train_compiled", "bf16_compiled"),
             ("sample NFE*img/s bf16 eager", "sample_eager", "bf16"),
             ("sample NFE*img/s bf16 CUDA graphs", "sample_graphs", "bf16_graphs")]
    for label, name, key in speed:
        rates = secs.get(name, {}).get("rates", {}).get(key)
        why = status_note(name)
        if not rates:
            row(label, "skipped" if why and why.startswith("skipped") else "-", note=why or "")
            continue
        o, d = rates.get("ours", {}), rates.get("diffusers", {})
        share = o.get("peak_share")
        firsts = "/".join(_num(x.get("first_call_s"), ".1f") for x in (o, d) if x)
        note = f"first call s {firsts}" + (f"; {why}" if why else "")
        note += f"; {secs[name]['note']}" if secs[name].get("note") else ""
        row(label, _num(o.get("per_s")), _num(d.get("per_s")), _num(rates.get("ratio"), ".3f"),
            _num(100 * share, ".1f") if share is not None else "n/a", note)
    b = secs.get("bits_per_dim", {})
    if "passed" in b:
        row("bits/dim bf16 vs fp32", _num(b["delta"], "+.2e"),
            note=f"fp32 {b['bpd_fp32']:.4f} bf16 {b['bpd_bf16']:.4f}, SE {b['se']:.2e} "
                 f"({b['images']} images, T={b['T']}): {'pass' if b['passed'] else 'FAIL'}")
    else:
        row("bits/dim bf16 vs fp32", "-", note=status_note("bits_per_dim") or "")
    c = secs.get("sample_graphs", {}).get("compiled_vs_eager")
    if c:
        row("compiled vs eager max|diff|", _num(c["max_abs_diff"], ".2e"),
            note=f"eager bf16 vs fp32 {c['bf16_vs_fp32_max_abs_diff']:.2e}, |out| <= "
                 f"{c['output_max_abs']:.2f}: {'pass' if c['passed'] else 'FAIL'}")
    else:
        row("compiled vs eager max|diff|", "-", note=status_note("sample_graphs") or "")
    tr = secs.get("torchrun", {})
    if "passed" in tr:
        row("torchrun: 1 DDP training step", f"{tr['step_s']:.2f} s",
            note=f"{tr['backend']}, world {tr['world_size']}, wall {tr['wall_s']:.1f} s: "
                 f"{'pass' if tr['passed'] else 'FAIL'}")
    else:
        row("torchrun: 1 DDP training step", "-", note=status_note("torchrun") or "")
    dv = secs.get("dvc_repro", {})
    if "passed" in dv:
        row("dvc repro (tiny digits)", f"{dv['wall_s']:.0f} s",
            note=f"{len(dv['stages_run'])} stages, device {dv['device']} "
                 f"(CUDA used by: {', '.join(dv['cuda_used_by']) or 'none'}): "
                 f"{'pass' if dv['passed'] else 'FAIL'}")
    else:
        row("dvc repro (tiny digits)", "-", note=status_note("dvc_repro") or "")
    for kind, unit in (("train", "img/s"), ("sample", "NFE*img/s")):
        tg = report.get("targets", {}).get(kind, {})
        ops = "; top ops: " + ", ".join(f"{o['op']} {o['self_ms']:.1f} ms"
                                        for o in tg.get("top_ops") or [])[:300] \
            if tg.get("top_ops") else ""
        row(f"target {kind} >= {TARGETS[kind]:,.0f} {unit}", _num(tg.get("best")),
            note=f"{tg.get('status', 'not evaluated')}"
                 + (f" ({tg['config']})" if tg.get("config") else "") + ops)
    prof = secs.get("profile", {})
    for what in ("train_step", "sample_call"):
        p = prof.get(what, {})
        ops = p.get("cuda") or p.get("cpu")
        if ops:
            dev = "cuda" if p.get("cuda") else "cpu"
            row(f"profile {what} ({dev}, self ms)", f"{ops[0]['self_ms']:.2f}",
                note=", ".join(f"{o['op']} {o['self_ms']:.2f}" for o in ops)[:200])
        else:
            row(f"profile {what}", "-", note=p.get("skipped") or status_note("profile") or "")
    row("sections (status seconds/budget)", note=" | ".join(
        f"{n} {s.get('status')} {_num(s.get('seconds'), '.0f')}/{_num(s.get('budget_s'), '.0f')}"
        for n, s in secs.items()))
    lines.append(f"wall {_num(report.get('wall_s'), '.0f')} s (budget "
                 f"{st['budget_s']:.0f} s){'' if report.get('finished') else ' | UNFINISHED'}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def run_section(ctx: Context, report: dict, name: str,
                fn: Callable[[Context, dict], str | None], budget: float, min_s: float,
                path: Path) -> None:
    """Run one section under min(budget, time left); record status, seconds; save the JSON."""
    sec: dict[str, Any] = {"status": "running", "budget_s": budget}
    report["sections"][name] = sec
    left = ctx.deadline - time.monotonic()
    t0 = time.perf_counter()
    if left < max(min_s, 1):
        sec.update(status="skipped", reason=f"skipped: {max(left, 0):.0f} s left of the total "
                   f"budget {ctx.s.budget_s:.0f} s; it needs >= {min_s:.0f} s")
    else:
        limit = min(budget, left)
        fired = [False]
        try:
            with time_limit(limit) as fired:
                reason = fn(ctx, sec)
            sec["status"] = "skipped" if reason else "ok"
            if reason:
                sec["reason"] = reason
        except Exception as e:  # noqa: BLE001  one section's failure must not lose the rest
            if fired[0]:
                sec.update(status="timeout", reason=f"over its {limit:.0f} s budget"
                           + ("" if limit == budget else " (what the total budget left)"))
            else:
                first = (str(e).strip().splitlines() or [""])[0][:300]
                sec.update(status="error", reason=f"{type(e).__name__}: {first}",
                           traceback=traceback.format_exc()[-2000:])
    sec["seconds"] = round(time.perf_counter() - t0, 2)
    if sec["status"] in ("timeout", "error"):
        torch._dynamo.reset()  # a compilation cut short must not leak into the next section
    report["wall_s"] = round(time.monotonic() - ctx.built["t_start"], 1)
    report["targets"] = targets(report, ctx.cuda)
    save(report, path)
    print(f"device_check: {name} {sec['status']} in {sec['seconds']:.1f} s"
          + (f" ({sec['reason']})" if sec.get("reason") else ""), file=sys.stderr, flush=True)
    if ctx.cuda:
        torch.cuda.empty_cache()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=textwrap.dedent(__doc__.split("\n", 2)[2]))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   choices=["cuda", "cpu"])
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes (digits preset, batch 16): the CPU check of the tests")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default $OUT/device_check.json, else ./device_check.json); "
                        "the table goes beside it as .txt")
    p.add_argument("--budget", type=float, default=None,
                   help="total seconds after which no section starts (default 450, quick 100)")
    p.add_argument("--only", default=None,
                   help="comma-separated sections to run (default all): "
                        + ",".join(n for n, *_ in SECTIONS))
    p.add_argument("--cpu-compile", action="store_true",
                   help="run the compile sections on the CPU too (minutes)")
    p.add_argument("--install-s", type=float, default=None,
                   help="seconds the project's install took (device_check.sh passes it)")
    p.add_argument("--install-note", default="not run (module started directly)")
    p.add_argument("--torchrun-worker", type=Path, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.torchrun_worker is not None:
        torchrun_worker(args.torchrun_worker, args.device, args.quick)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device: cuda asked for but torch sees no CUDA device; use --device cpu",
              file=sys.stderr)
        return 2
    names = [n for n, *_ in SECTIONS]
    only = names if args.only is None else args.only.split(",")
    if set(only) - set(names):
        print(f"error: --only: unknown {sorted(set(only) - set(names))}; one of {names}",
              file=sys.stderr)
        return 2
    s = QUICK if args.quick else FULL
    if args.budget is not None:
        s = Settings(**{**s.__dict__, "budget_s": args.budget})
    out = args.out or Path(os.environ.get("OUT") or ".") / "device_check.json"
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")  # fp32 = TF32, as in REFERENCE.md's table
    t_start = time.monotonic()
    ctx = Context(args, device, s, t_start + s.budget_s, {"t_start": t_start})
    report: dict[str, Any] = {
        "schema": "device_check/1",
        "started_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.device_check",
                             *(argv if argv is not None else sys.argv[1:])]),
        "settings": {"device": args.device, "quick": args.quick, **s.__dict__,
                     "fp32_matmul": "tf32" if device.type == "cuda" else "fp32"},
        "finished": False, "wall_s": 0.0, "sections": {}, "targets": {}}
    for name, fn, budget, min_s in SECTIONS:
        if name in only or name == "environment":
            run_section(ctx, report, name, fn, budget, min_s, out)
    report["finished"] = True
    report["wall_s"] = round(time.monotonic() - t_start, 1)
    save(report, out)
    print(table(report), flush=True)
    print(f"device_check: wrote {out} and {out.with_suffix('.txt')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
