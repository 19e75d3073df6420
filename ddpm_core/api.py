"""The public API: load a model from any source, draw images, measure bits/dim.

    net, diffusion = ddpm_core.load_model("models/simple.pt")
    images = ddpm_core.sample(net, diffusion, n=64, sampler="ddim", steps=50, seed=0)
    bpd = ddpm_core.bits_per_dim(net, diffusion, images)
    exact = ddpm_core.nll(net, diffusion, images)   # probability-flow ODE: .bpd, .se, .nfe [N]

Images are uint8 numpy arrays [N, H, W, C] (0..255, channels last) both ways: what
`sample` returns is what `bits_per_dim`, PIL, np.savez and the FID code take.

This module is the one engine: the pipeline's stages and the `ddpm` command call it, and it
alone calls the samplers, the bound and Γ and validates their settings. Seeds are per image
(ddpm_core.seeds): image i of a sampler and the bound's noise of test image i depend only on
(seed, i) and the settings, and every network call has NET_BATCH rows, so no number depends on
the batch size or the number of processes (under torchrun, ranks take contiguous blocks of the
batches). With `units=` (ddpm_core.units.UnitStore) every finished batch is kept in a scratch
area keyed by the settings: a rerun after a kill computes only the missing ones, and shards
(UnitStore(root, Shard(i, N))) computed apart assemble into the bytes of one call.

σ² names (the reverse-process variance of the ancestral sampler and of the bound): the names
of ddpm_core.modes or their short names (beta = fixed_large, beta_tilde = fixed_small,
learned: the network's own, analytic: Analytic-DPM's σ̂², Bao et al. 2022, which needs
gamma = estimate_gamma(...) from training images; DDIM at eta = 0: ddim_analytic; npr and sn:
the per-pixel σ² of Bao et al. 2022b's variance heads on an ε-model of fixed variance, which
need heads = train_heads(...) or load_heads(path), in the ancestral sampler, DDIM and the bound).
The samplers and the cap on σ of the last noisy step (Bao et al.'s code): see `sample`.
Step lists come from chains.timestep_spacing (its docstring defines each; "trailing", the
default, starts at T − 1).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import numpy as np
import torch

from ddpm_core.chains import DEFAULT_SPACING, timestep_spacing
from ddpm_core.diffusion import LEARNED_VAR_TYPES, Diffusion
from ddpm_core.last_sigma import DEFAULT_LAST_SIGMA_CAP_Y, last_sigma_cap
from ddpm_core.likelihood import BpdResult, bits_per_dim_at_steps, even_trajectory
from ddpm_core.modes import (
    FIXED_VAR_TYPES,
    HEAD_KINDS,
    NET_BATCH,
    SAMPLER_KINDS,
    SPACINGS,
    Dequantization,
    Divergence,
    HeadKind,
    SamplerKind,
    Sigma2,
    Spacing,
    Which,
    sigma2_mode,
)
from ddpm_core.progress import Progress
from ddpm_core.schedules import ScheduleKind, make_betas, schedule_kind
from ddpm_core.seeds import ImageNoise
from ddpm_core.units import Shard, UnitStore, owned, run_units


class ModelMismatch(ValueError):
    """A loaded model's diffusion differs from the one the caller's settings describe."""


# ----------------------------------------------------------------------------- loading


def load_model(path: str | Path, which: Which = "ema",
               device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Diffusion]:
    """(network in eval mode, Diffusion) from any model source.

    `path` is one of: our model file (models/<variant>.pt), a training checkpoint
    (checkpoints/.../ckpt_*.pt), a diffusers folder (config.json +
    diffusion_pytorch_model.safetensors/.bin + scheduler_config.json, side by side or in
    unet/ + scheduler/), or a Hugging Face hub id such as google/ddpm-cifar10-32 (needs the
    network; ddpm_core.sources says which strings are hub ids: a missing path that looks local
    is FileNotFoundError "<path>: not found", never a download). `which` picks the EMA
    (default) or raw weights of our files.
    """
    if which not in get_args(Which):
        raise ValueError(f"which must be 'ema' or 'model', got {which!r}")
    from ddpm_core.convert import load_diffusers
    from ddpm_core.sources import check_model_source, is_hub_id

    check_model_source(path)
    p = Path(path)
    if p.is_dir() or p.suffix in (".safetensors", ".bin") or is_hub_id(path):
        if p.is_dir() and not any((p / d / "config.json").is_file() for d in (".", "unet")):
            raise FileNotFoundError(f"{p}: a folder without config.json; a diffusers model folder "
                                    "holds config.json, diffusion_pytorch_model.safetensors and "
                                    "scheduler_config.json")
        net, diff = load_diffusers(path)
    elif p.is_file():
        from ddpm_core.modelfile import load_model_file

        loaded = load_model_file(p, which=which)
        net, diff = loaded.net, loaded.diffusion
    else:
        raise FileNotFoundError(f"{path}: no such file or folder (nor a hub id owner/name)")
    return net.to(device).eval().requires_grad_(False), diff


def save_model_file(net: torch.nn.Module, diff: Diffusion, path: str | Path,
                    meta: dict | None = None, raw: torch.nn.Module | None = None) -> None:
    """Our model file of (net, diff): net as the EMA weights, raw (default: net) as the raw
    ones (ddpm_core.modelfile)."""
    from ddpm_core.modelfile import ModelSpec, save_model

    kind = schedule_kind(diff.betas)
    if kind is None:
        raise ValueError(f"the model's β (T = {diff.T}) are none of our schedules "
                         f"{get_args(ScheduleKind)} at T = {diff.T}; our model file cannot "
                         "hold them")
    spec = ModelSpec(unet=net.cfg, schedule=kind, timesteps=diff.T, mean_type=diff.mean_type,
                     var_type=diff.var_type)
    # save_model takes the tensors to the CPU
    save_model(Path(path), spec, weights={"ema": net.state_dict(),
                                          "model": (raw or net).state_dict()}, meta=meta)


def check_matches(diff: Diffusion, *, schedule: ScheduleKind | None = None,
                  timesteps: int | None = None, mean_type: str | None = None,
                  var_type: str | None = None, source: str = "the model") -> None:
    """Raise ModelMismatch when `diff` is not the diffusion these settings describe.

    For a pipeline evaluating a pretrained model: `diffusion.timesteps: 100` against the
    official 1000-step model is an error naming both values, not a silently wrong bound.
    """
    problems = []
    if timesteps is not None and timesteps != diff.T:
        problems.append(f"diffusion.timesteps is {timesteps} but {source} has T = {diff.T} "
                        f"(set diffusion.timesteps: {diff.T})")
    elif schedule is not None:
        try:
            want = make_betas(schedule, diff.T)
        except ValueError as e:
            raise ModelMismatch(f"schedule: {e}") from None
        if not torch.allclose(want, diff.betas, rtol=1e-6, atol=1e-12):
            i = int((want - diff.betas).abs().argmax())
            problems.append(f"schedule {schedule!r} gives β[{i}] = {float(want[i]):.6g} but "
                            f"{source} has {float(diff.betas[i]):.6g} (set schedule to the "
                            "model's)")
    if mean_type is not None and mean_type != diff.mean_type:
        problems.append(f"mean_type is {mean_type!r} but {source} predicts {diff.mean_type!r}")
    if var_type is not None and var_type != diff.var_type and (
            var_type in LEARNED_VAR_TYPES or diff.var_type in LEARNED_VAR_TYPES):
        problems.append(f"var_type is {var_type!r} but {source} has {diff.var_type!r}")
    if problems:
        raise ModelMismatch("; ".join(problems))


# ----------------------------------------------------------------------------- the engine's parts


class FixedRows(torch.nn.Module):
    """`net(x [B,C,H,W], t [B])` in calls of exactly `rows` rows (the last one zero-padded).

    One fixed shape (modes.NET_BATCH), so an image's numbers do not depend on the batch size or
    its companions: BLAS and cuDNN pick their kernels by shape, so a 13-image call and a
    64-image call give the same image outputs that differ in the last bits.
    """

    def __init__(self, net: torch.nn.Module, rows: int) -> None:
        super().__init__()
        if rows < 1:
            raise ValueError(f"net_batch must be >= 1, got {rows}")
        self.net, self.rows = net, rows

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == self.rows:
            return self.net(x, t)
        outs = []
        for s in range(0, x.shape[0], self.rows):
            xs, ts = x[s:s + self.rows], t[s:s + self.rows]
            k = xs.shape[0]
            if k < self.rows:
                xs = torch.cat([xs, xs.new_zeros((self.rows - k, *xs.shape[1:]))])
                ts = torch.cat([ts, ts.new_zeros(self.rows - k)])
            # a copy: the next call may reuse the output's memory (CUDA graphs of compile)
            outs.append(self.net(xs, ts)[:k].clone())
        return torch.cat(outs)


@contextmanager
def _network(net: torch.nn.Module, net_batch: int, progress: bool | Progress, total: int,
             desc: str, heads: dict[HeadKind, torch.nn.Module] | None = None
             ) -> Iterator[tuple[torch.nn.Module, Progress]]:
    """net in fixed-size calls, each advancing the caller's bar, a new one (True) or none, and
    that bar; with heads, each call appends their h (heads.WithHeads, in the order of
    `heads`)."""
    from ddpm_core import progress as bars  # looked up at each call (tests replace the bar)

    if heads:
        from ddpm_core.heads import WithHeads

        net = WithHeads(net, heads)
    with (nullcontext(progress) if isinstance(progress, bars.Progress) else
          bars.Progress(total, desc, "calls", enabled=bool(progress))) as bar:
        yield FixedRows(bars.counting(net, bar), net_batch), bar


def _device(device: str | torch.device | None, net: torch.nn.Module) -> torch.device:
    return torch.device(device) if device is not None else next(net.parameters()).device


def _image_shape(net: torch.nn.Module) -> tuple[int, int, int] | None:
    """(C, H, W) of the ddpm_core UNet inside `net` (wrappers: inference, compile, counting);
    None for any other network."""
    from ddpm_core.unet import UNet

    for m in net.modules():
        if isinstance(m, UNet):
            return m.cfg.in_channels, m.cfg.image_size, m.cfg.image_size
    return None


def calls_per_step(n: int, batch_size: int, rows_per_image: int = 1,
                   net_batch: int = NET_BATCH, shard: Shard | None = None) -> int:
    """Network calls of this process per step of its units of n images in batches of
    batch_size (rows_per_image rows each: t_batch for the bound)."""
    return sum(_calls(ids, rows_per_image, net_batch) for ids in owned(n, batch_size, shard))


def _calls(ids: range, rows_per_image: int, net_batch: int) -> int:
    return -(-len(ids) * rows_per_image // net_batch)


def _units_note(bar: Progress, cost: Callable[[range], int]
                ) -> Callable[[str, range, bool], None]:
    """run_units' note: "unit k/K" on the bar, whose total loses the calls of a unit read
    back (cost(ids))."""
    def note(text: str, ids: range, reused: bool) -> None:
        bar.skip(cost(ids) if reused else 0, text)
    return note


# ----------------------------------------------------------------------------- validation


def timesteps_for(diff: Diffusion, steps: int | None, spacing: Spacing) -> list[int] | None:
    """The increasing steps a chain of `steps` visits (None: all T, the full chain)."""
    if spacing not in SPACINGS:  # checked even for the full chain: a typo is never ignored
        raise ValueError(f"unknown spacing {spacing!r}; expected one of {SPACINGS}")
    if steps is None or steps == diff.T:
        return None
    if not 1 <= steps <= diff.T:
        raise ValueError(f"steps must lie in 1..T = {diff.T}, got {steps}")
    return timestep_spacing(diff.T, steps, spacing)


def check_gamma(needed: bool, gamma: torch.Tensor | None, what: str) -> None:
    """Analytic σ̂² (Bao et al. 2022) needs Γ from estimate_gamma."""
    if needed and gamma is None:
        raise ValueError(f"{what} needs gamma: pass gamma=ddpm_core.estimate_gamma(net, "
                         "diffusion, training_images)")


def check_heads(kinds: Sequence[str], heads: dict | None, net: torch.nn.Module,
                device: torch.device) -> dict[HeadKind, torch.nn.Module] | None:
    """The heads of the σ² npr/sn among `kinds` (Bao et al. 2022b), on `device`; None: none."""
    wanted = [k for k in HEAD_KINDS if k in kinds]
    if not wanted:
        return None
    if heads is None or any(k not in heads for k in wanted):
        have = "no heads" if heads is None else f"heads {tuple(heads)}"
        raise ValueError(f"sigma2 {' and '.join(map(repr, wanted))} needs its head ({have}): "
                         "pass heads=ddpm_core.api.train_heads(net, diffusion, training_images) "
                         "or heads=ddpm_core.api.load_heads(path)")
    from ddpm_core.heads import find_unet

    want = (find_unet(net).norm_out.num_channels, find_unet(net).cfg.in_channels)
    out = {}
    for k in wanted:
        conv = heads[k].conv
        if (conv.in_channels, conv.out_channels) != want:
            raise ValueError(f"the {k} head maps {conv.in_channels} feature channels to "
                             f"{conv.out_channels}; this model's UNet has {want[0]} and "
                             f"{want[1]}: use the heads trained on this model")
        out[k] = copy.deepcopy(heads[k]).to(device)
    return out


def sigma2_of(diff: Diffusion, sigma2: str | None) -> Sigma2:
    """The canonical σ² of a name or short name (None: the model's own); a learned σ² needs
    the model that learned it, and such a model takes only its own (or analytic); the heads'
    npr and sn are for ε-models of fixed variance."""
    if sigma2 is None:
        return diff.var_type
    name = sigma2_mode(sigma2).name
    if name in HEAD_KINDS and (diff.mean_type != "eps" or diff.var_type not in FIXED_VAR_TYPES):
        raise ValueError(f"sigma2={sigma2!r} (a variance head on the ε-network) needs an "
                         f"ε-model of fixed variance; this one predicts {diff.mean_type!r} "
                         f"with {diff.var_type!r}")
    if name in LEARNED_VAR_TYPES:
        if diff.var_type not in LEARNED_VAR_TYPES:
            raise ValueError(f"sigma2={sigma2!r} needs a model with a learned variance; this "
                             f"one has {diff.var_type!r} (use 'beta' or 'beta_tilde')")
        return diff.var_type
    if diff.var_type in LEARNED_VAR_TYPES and name != "analytic":
        raise ValueError(f"this model learned its variance ({diff.var_type!r}): use "
                         "sigma2='learned'")
    return name


def check_sampler(sampler: str, sigma2: str | None, eta: float,
                  gamma: torch.Tensor | None) -> bool:
    """The sampler/σ² combinations; True when the sampler adds Analytic-DDIM's σ̂² noise.
    DDIM takes a head's σ² (npr, sn) at any η: its noise even at η = 0 (Bao et al. 2022b)."""
    if sampler not in SAMPLER_KINDS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLER_KINDS}")
    if not 0.0 <= eta <= 1.0:  # DDIM's η (Song et al. 2021, eq. 16)
        raise ValueError(f"eta must lie in [0, 1], got {eta}")
    name = None if sigma2 is None else sigma2_mode(sigma2).name
    analytic = name == "analytic"
    if sampler != "ancestral" and sigma2 is not None and not (
            analytic or (sampler == "ddim" and name in HEAD_KINDS)):
        raise ValueError(f"sampler {sampler!r}: DDIM's noise is set by eta (sigma2 None) or is "
                         f"the analytic σ̂² or a head's (sampler 'ddim', sigma2 npr or sn); "
                         f"sigma2={sigma2!r} is for the ancestral sampler")
    analytic_ddim = sampler == "ddim_analytic" or (sampler == "ddim" and analytic)
    check_gamma(analytic or analytic_ddim, gamma,
                f"sampler={sampler!r}" if analytic_ddim else "sigma2")
    if sampler == "ddim" and analytic and eta == 0.0:
        raise ValueError("DDIM with sigma2='analytic' needs eta > 0 (plain DDIM at eta = 0 is "
                         "deterministic); Analytic-DDIM at eta = 0 is sampler='ddim_analytic'")
    return analytic_ddim


# ----------------------------------------------------------------------------- sampling


@torch.no_grad()
def estimate_gamma(net: torch.nn.Module, diffusion: Diffusion, images: np.ndarray, *,
                   M: int = 100, seed: int = 0, batch_size: int = 256,
                   net_batch: int = NET_BATCH, device: str | torch.device | None = None,
                   units: UnitStore | None = None, progress: bool | Progress = False
                   ) -> torch.Tensor:
    """Γ_t = E‖ε̂(x_t, t)‖²/d [T] float64 on the first M uint8 training images [N, H, W, C]
    (Bao et al. 2022; M = 10 or 100 gave the same NLL there): the input of sigma2="analytic".
    The draw of image m at step τ comes from (seed, m, τ). Units (see `sample`) are blocks of
    batch_size images; with a shard, Γ of the shard's images alone."""
    from ddpm_core.analytic import eps_norms, gamma_of
    from ddpm_core.data import to_model_tensor, to_unit

    if M < 1 or batch_size < 1:
        raise ValueError(f"M and batch_size must be >= 1, got M={M}, batch_size={batch_size}")
    dev = _device(device, net)
    x0 = to_unit(to_model_tensor(images[:M])).to(dev)
    T = diffusion.T

    def cost(ids: range) -> int:  # network calls of a unit: T steps of batches of net_batch
        return -(-T * len(ids) // batch_size) * -(-batch_size // net_batch)

    total = sum(cost(ids) for ids in owned(len(x0), batch_size, units and units.shard))
    settings = {"engine": "gamma", "net": net, "diffusion": diffusion, "seed": seed,
                "images": x0, "net_batch": net_batch, "device": dev.type}
    with _network(net, net_batch, progress, total, "gamma") as (counted, bar):
        out = run_units(len(x0), batch_size, lambda ids: {"norms": eps_norms(
            diffusion, counted, x0[ids.start:ids.stop], seed=seed, batch_size=batch_size,
            indices=ids)}, store=units, settings=settings, note=_units_note(bar, cost))
    return gamma_of(out["norms"])


@torch.no_grad()
def sample(net: torch.nn.Module, diffusion: Diffusion, n: int = 64, *,
           sampler: SamplerKind = "ancestral", steps: int | None = None,
           sigma2: str | None = None, spacing: Spacing = DEFAULT_SPACING, eta: float = 0.0,
           seed: int = 0, batch_size: int = 256, device: str | torch.device | None = None,
           clip_x0: bool = True, gamma: torch.Tensor | None = None,
           heads: dict[HeadKind, torch.nn.Module] | None = None,
           last_sigma_cap_y: float | None = DEFAULT_LAST_SIGMA_CAP_Y,
           image_shape: tuple[int, int, int] | None = None, net_batch: int = NET_BATCH,
           units: UnitStore | None = None, progress: bool | Progress = False) -> np.ndarray:
    """n images uint8 [n, H, W, C] drawn from p_θ; image i depends only on (seed, i) and the
    settings (its generator draws x_T, then each step's noise), whatever batch_size or the
    number of processes (ranks take contiguous blocks of the batches); net_batch is the rows
    of every network call.
    units: a units.UnitStore keeping each finished batch, so a rerun after a kill computes
    only the missing ones; with its shard, only the shard's images are computed and returned.

    sampler "ancestral" (DDPM Algorithm 2; `steps` < T respaces the chain, improved DDPM
    Sec. 4) with reverse variance `sigma2`, "ddim" (Song et al. 2021, η = `eta`; sigma2 None,
    or "analytic" with eta > 0) or "ddim_analytic" (Bao et al. 2022's Analytic-DDIM: σ̂² noise
    at η = `eta`, 0 by default). `steps` None means all T steps (DDIM then visits every step
    too). σ² analytic needs gamma = estimate_gamma(net, diffusion, training_images); npr and sn
    (ancestral, or DDIM at any η: the head's noise even at η = 0, Bao et al. 2022b) need heads
    = train_heads(...) or load_heads(path). last_sigma_cap_y: y of the cap 2y/255·√(π/2) on σ
    of the step to x_{τ_1} (K < T and DDIM; default 1, as Bao et al.'s code; None: no cap; the
    full T-step ancestral chain is DDPM's Algorithm 2, uncapped). image_shape (C, H, W):
    default that of the UNet inside net.
    """
    from ddpm_core.data import from_unit, to_numpy_images
    from ddpm_core.samplers import sample_ancestral, sample_ddim

    if n < 1 or batch_size < 1:
        raise ValueError(f"n and batch_size must be >= 1, got n={n}, batch_size={batch_size}")
    analytic_ddim = check_sampler(sampler, sigma2, eta, gamma)
    if last_sigma_cap_y is not None:
        last_sigma_cap(last_sigma_cap_y)  # y > 0 or a one-line error
    chosen = sigma2_of(diffusion, sigma2) if sampler == "ancestral" else None
    head = sigma2_of(diffusion, sigma2) if sampler == "ddim" and sigma2 is not None and (
        sigma2_mode(sigma2).name in HEAD_KINDS) else None
    timesteps = timesteps_for(diffusion, steps, spacing)
    ts = timesteps if timesteps is not None else list(range(diffusion.T))
    dev = _device(device, net)
    used = check_heads([v for v in (chosen, head) if v], heads, net, dev)
    chw = image_shape or _image_shape(net)
    if chw is None:
        raise ValueError("net holds no ddpm_core UNet: pass image_shape=(C, H, W)")
    total = calls_per_step(n, batch_size, 1, net_batch, units and units.shard) * len(ts)
    settings = {"engine": "sample", "net": net, "heads": used, "diffusion": diffusion,
                "sampler": sampler, "sigma2": chosen or head, "timesteps": ts, "eta": eta,
                "seed": seed, "clip_x0": clip_x0, "gamma": gamma, "image_shape": chw,
                "last_sigma_cap_y": last_sigma_cap_y, "net_batch": net_batch,
                "device": dev.type}
    with _network(net, net_batch, progress, total, f"sample {sampler}", used) as (counted, bar):
        def unit(ids: range) -> dict[str, torch.Tensor]:
            noise = ImageNoise(seed, ids, dev)
            x_T = noise.randn((len(ids), *chw))
            if sampler == "ancestral":
                x = sample_ancestral(diffusion, counted, x_T, noise=noise, timesteps=timesteps,
                                     clip_x0=clip_x0, sigma2=chosen, gamma=gamma,
                                     last_sigma_cap_y=last_sigma_cap_y)
            else:
                x = sample_ddim(diffusion, counted, x_T, noise=noise, timesteps=ts, eta=eta,
                                clip_x0=clip_x0, gamma=gamma if analytic_ddim else None,
                                head=head, last_sigma_cap_y=last_sigma_cap_y)
            return {"images": from_unit(x)}

        out = run_units(n, batch_size, unit, store=units, settings=settings, note=_units_note(
            bar, lambda ids: _calls(ids, 1, net_batch) * len(ts)))
    return to_numpy_images(out["images"])


# ----------------------------------------------------------------------------- bits/dim


def _model_images(images: np.ndarray, net: torch.nn.Module) -> torch.Tensor:
    """uint8 [N, C, H, W] of uint8 images [N, H, W, C] (data.to_model_tensor checks them) of the
    shape the UNet inside net takes."""
    from ddpm_core.data import DataError, to_model_tensor

    x, chw = to_model_tensor(images), _image_shape(net)
    if chw is not None and tuple(x.shape[1:]) != chw:
        raise DataError(f"images are {tuple(images.shape[1:])} (H, W, C); the model takes "
                        f"{(chw[1], chw[2], chw[0])}")
    return x


@torch.no_grad()
def bound(net: torch.nn.Module, diffusion: Diffusion, images: np.ndarray, *,
          sigma2: Sequence[str] | None = None, steps: Sequence[int] | None = None,
          gamma: torch.Tensor | None = None,
          heads: dict[HeadKind, torch.nn.Module] | None = None, seed: int = 0,
          batch_size: int = 256, t_batch: int = 10, net_batch: int = NET_BATCH,
          device: str | torch.device | None = None, units: UnitStore | None = None,
          progress: bool | Progress = False) -> dict[int, dict[Sigma2, BpdResult]]:
    """Variational bound (DDPM eq. 5) of uint8 NHWC images, per K-step chain and σ², per image:
    {K: {σ²: BpdResult (total [N], prior [N], terms [N, K], timesteps)}} from one pass of
    network calls (likelihood.bits_per_dim_at_steps).

    sigma2: names or short names (None: the model's own); steps: chain lengths K (None: [T];
    K < T is the even trajectory round(linspace(0, T−1, K)), Bao et al. 2022); σ² analytic
    needs gamma, npr and sn the heads (their σ² from the same network calls). The noise of
    image i at original index τ comes from (seed, i, τ): no number depends on batch_size,
    t_batch, the set of K or σ², or the number of processes (ranks take contiguous blocks of
    the batches). units: see `sample` (with a shard, the shard's images alone).
    """
    from ddpm_core.data import to_unit

    x_all = _model_images(images, net)
    if batch_size < 1 or t_batch < 1:
        raise ValueError(f"batch_size and t_batch must be >= 1, got {batch_size}, {t_batch}")
    chosen = list(dict.fromkeys(sigma2_of(diffusion, s) for s in (sigma2 or [None])))
    check_gamma("analytic" in chosen, gamma, "sigma2 'analytic'")
    Ks = sorted({diffusion.T} if steps is None else {int(K) for K in steps})
    if not Ks:
        raise ValueError("steps is empty: give the chain lengths K, e.g. [10, 100, T]")
    if not all(2 <= K <= diffusion.T for K in Ks) and Ks != [diffusion.T]:
        raise ValueError(f"need 2 <= K <= T={diffusion.T} steps (K = T is the full chain), "
                         f"got {Ks}")
    if "learned" in chosen and Ks != [diffusion.T]:
        raise ValueError(f"σ² learned is a one-step variance: it has no K-step chain for "
                         f"K < T = {diffusion.T} (learned_range interpolates and has one)")
    dev = _device(device, net)
    used = check_heads(chosen, heads, net, dev)
    union = set().union(*(even_trajectory(diffusion.T, K) for K in Ks))

    def cost(ids: range) -> int:
        return sum(_calls(ids, min(t_batch, len(union) - g), net_batch)
                   for g in range(0, len(union), t_batch))

    total = sum(cost(ids) for ids in owned(len(x_all), batch_size, units and units.shard))
    settings = {"engine": "bound", "net": net, "heads": used, "diffusion": diffusion,
                "sigma2": chosen, "steps": Ks, "gamma": gamma, "seed": seed, "images": x_all,
                "t_batch": t_batch, "net_batch": net_batch, "device": dev.type}
    with _network(net, net_batch, progress, total, "bpd", used) as (counted, bar):
        def unit(ids: range) -> dict[str, torch.Tensor]:
            x0 = to_unit(x_all[ids.start:ids.stop]).to(dev)
            res = bits_per_dim_at_steps(diffusion, counted, x0, steps=Ks, var_types=chosen,
                                        gamma=gamma, t_batch=t_batch, seed=seed, indices=ids,
                                        head_kinds=tuple(used or ()))
            # [B, σ², per K: the prior, then the K terms]
            return {"rows": torch.stack([torch.cat([torch.cat(
                [res[K][v].prior[:, None], res[K][v].terms], 1) for K in Ks], 1)
                for v in chosen], 1)}

        every = run_units(len(x_all), batch_size, unit, store=units, settings=settings,
                          note=_units_note(bar, cost))["rows"]
    out: dict[int, dict[Sigma2, BpdResult]] = {}
    for K, part in zip(Ks, every.split([K + 1 for K in Ks], dim=2), strict=True):
        out[K] = {v: BpdResult(total=part[:, i, 0] + part[:, i, 1:].sum(dim=1),
                               prior=part[:, i, 0], terms=part[:, i, 1:],
                               timesteps=tuple(even_trajectory(diffusion.T, K)))
                  for i, v in enumerate(chosen)}
    return out


def bits_per_dim_per_image(net: torch.nn.Module, diffusion: Diffusion, images: np.ndarray, *,
                           sigma2: str | None = None, steps: int | None = None,
                           **options: Any) -> np.ndarray:
    """The bound of one chain (`steps` None: all T) and one σ², bits/dim float64 [N]; options:
    bound's keywords (gamma, seed, batch_size, t_batch, net_batch, device, progress)."""
    K = diffusion.T if steps is None else int(steps)
    res = bound(net, diffusion, images, sigma2=[sigma2] if sigma2 else None, steps=[K],
                **options)[K]
    return next(iter(res.values())).total.numpy()


def bits_per_dim(net: torch.nn.Module, diffusion: Diffusion, images: np.ndarray, *,
                 sigma2: str | None = None, steps: int | None = None, **options: Any) -> float:
    """Mean bound in bits/dim of uint8 images [N, H, W, C] (bits_per_dim_per_image's mean)."""
    per = bits_per_dim_per_image(net, diffusion, images, sigma2=sigma2, steps=steps, **options)
    value = float(per.mean())
    assert math.isfinite(value), "bits/dim is not finite"
    return value


# ----------------------------------------------------------------------------- variance heads


def train_heads(net: torch.nn.Module, diffusion: Diffusion, images: np.ndarray, *, steps: int,
                lr: float = 1e-4, batch_size: int = 128, seed: int = 0,
                device: str | torch.device | None = None,
                progress: bool | Progress = False) -> dict[HeadKind, torch.nn.Module]:
    """Bao et al. 2022b's NPR and SN heads {kind: heads.VarianceHead}, trained together on the
    frozen ε-network (eval mode, fixed variance) with uint8 training images [N, H, W, C]: Adam
    at lr (1e-4, their code's), `steps` steps of batch_size images and t uniform over 1..T−1
    (the steps whose σ² reads a head: heads.fit_heads), step s drawn from (seed, s) alone (a
    rerun gives the same heads). The input of sigma2 npr and sn."""
    from ddpm_core import progress as bars
    from ddpm_core.data import to_unit
    from ddpm_core.heads import fit_heads, head_for, unet_backbone

    if steps < 0 or batch_size < 1 or not lr > 0:
        raise ValueError(f"need steps >= 0, batch_size >= 1 and lr > 0, got steps={steps}, "
                         f"batch_size={batch_size}, lr={lr}")
    for kind in HEAD_KINDS:
        sigma2_of(diffusion, kind)  # an ε-model of fixed variance
    dev = _device(device, net)
    x0 = to_unit(_model_images(images, net)).to(dev)
    heads = {kind: head_for(net).to(dev) for kind in HEAD_KINDS}
    backbone = unet_backbone(net)
    with (nullcontext(progress) if isinstance(progress, bars.Progress) else
          bars.Progress(steps, "heads", "steps", enabled=bool(progress))) as bar:
        fit_heads(diffusion, backbone, heads, x0, steps=steps, lr=lr, batch_size=batch_size,
                  seed=seed, progress=lambda _losses: bar.update(1))
    return {kind: head.eval().requires_grad_(False) for kind, head in heads.items()}


def save_heads(heads: dict[HeadKind, torch.nn.Module], path: str | Path,
               meta: dict | None = None) -> None:
    """The heads file of train_heads' heads (ddpm_core.headfile; atomic write)."""
    from ddpm_core.headfile import save_heads as save

    save(heads, path, meta)


def load_heads(path: str | Path) -> dict[HeadKind, torch.nn.Module]:
    """{kind: head} of a heads file; a missing or bad one is a one-line HeadsFileError."""
    from ddpm_core.headfile import load_heads as load

    return load(path)


# ----------------------------------------------------------------------------- exact likelihood


@dataclass(frozen=True)
class Nll:
    """ODE bits/dim per image (numpy float64 [N]), the standard error of each over its
    Hutchinson repeats (0 for the exact divergence, NaN for one probe) and the solver's
    evaluation count of each image's solve (int64 [N])."""

    bpd: np.ndarray
    se: np.ndarray
    nfe: np.ndarray

    @property
    def mean(self) -> float:
        """Mean bits/dim over the images."""
        return float(self.bpd.mean())

    @property
    def standard_error(self) -> float:
        """Standard error of the mean over the images (dequantization and probe noise, and the
        spread of the data, together; NaN for one image)."""
        n = len(self.bpd)
        return float(self.bpd.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")

    @property
    def nfe_mean(self) -> float:
        return float(self.nfe.mean())


def nll(net: torch.nn.Module, diffusion: Diffusion, images: np.ndarray, *, rtol: float = 1e-5,
        atol: float = 1e-5, repeats: int = 1, divergence: Divergence = "hutchinson",
        batch_size: int = 1, seed: int = 0, start_index: int = 0,
        dequantization: Dequantization = "uniform", device: str | torch.device | None = None,
        units: UnitStore | None = None, progress: bool = False) -> Nll:
    """Exact bits/dim by the probability-flow ODE (Song et al. 2021) of uint8 images
    [N, H, W, C], per image (ddpm_core.ode.ode_bits_per_dim): "uniform" dequantization is Song
    et al.'s; "variational" starts the flow at the chain's first step and scores x_0 by the
    chain's decoder, a bound on the discrete likelihood on the DDPM bound's footing.

    Image j has index start_index + j: its dequantization noise and Hutchinson probes come from
    (seed, index). Images of one batch share one adaptive solve and hence its steps, so with
    batch_size > 1 a number depends on its batch companions within the tolerance (≤ ~1e-4
    bits/dim at rtol = atol = 1e-5 on the digits model); batch_size 1 makes each depend on
    (seed, index) only. Units (see `sample`) are the solves' batches.
    The ODE uses the mean's ε only (a learned variance plays no part; x_0-predicting models
    give the ε derived from x̂_0); a μ-predicting model is refused (ValueError).
    """
    from ddpm_core.ode import ode_bits_per_dim

    x = _model_images(images, net)
    if not (rtol > 0 and atol > 0):
        raise ValueError(f"rtol and atol must be > 0, got rtol={rtol}, atol={atol}")
    if divergence not in get_args(Divergence):
        raise ValueError(f"error: divergence: {divergence!r}; expected 'exact' or 'hutchinson'")
    if repeats < 1 or (divergence == "exact" and repeats != 1):
        raise ValueError(f"error: repeats: {repeats}; need >= 1 (exactly 1 for 'exact')")
    if batch_size < 1:
        raise ValueError(f"error: batch_size: {batch_size}; need >= 1")
    if dequantization not in get_args(Dequantization):
        raise ValueError(f"error: dequantization: {dequantization!r}; expected 'uniform' or "
                         "'variational'")
    if diffusion.mean_type not in ("eps", "x0"):
        raise ValueError(f"error: mean_type: {diffusion.mean_type!r} (μ̃ of the discrete "
                         "one-step chain) has no continuous-time ε; use an 'eps' or 'x0' model")
    dev = _device(device, net)
    net = net.to(dev).eval()
    settings = {"engine": "nll", "net": net, "diffusion": diffusion, "images": x, "rtol": rtol,
                "atol": atol, "repeats": repeats, "divergence": divergence, "seed": seed,
                "start_index": start_index, "dequantization": dequantization,
                "device": dev.type}

    def unit(ids: range) -> dict[str, torch.Tensor]:
        res = ode_bits_per_dim(diffusion, net, x[ids.start:ids.stop], seed=seed,
                               start_index=start_index + ids.start, divergence=divergence,
                               repeats=repeats, batch_size=batch_size, rtol=rtol, atol=atol,
                               dequantization=dequantization)
        return {"bpd": res.bpd, "se": res.se, "nfe": res.nfe}

    todo = len(owned(len(x), batch_size, units and units.shard))
    with Progress(todo, "nll", "units", enabled=progress) as bar:
        res = run_units(len(x), batch_size, unit, store=units, settings=settings,
                        note=lambda text, ids, reused: bar.update(1))
    out = Nll(res["bpd"].numpy(), res["se"].numpy(), res["nfe"].numpy())
    assert math.isfinite(out.mean), "ODE bits/dim is not finite"
    return out
