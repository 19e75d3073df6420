"""The public API: load a model from any source, draw images, measure bits/dim.

    net, diffusion = ddpm_core.load_model("models/simple.pt")
    images = ddpm_core.sample(net, diffusion, n=64, sampler="ddim", steps=50, seed=0)
    bpd = ddpm_core.bits_per_dim(net, diffusion, images)
    exact = ddpm_core.nll(net, diffusion, images)   # probability-flow ODE: .bpd, .se, .nfe [N]

Images are uint8 numpy arrays [N, H, W, C] (0..255, channels last) both ways: what
`sample` returns is what `bits_per_dim`, PIL, np.savez and the FID code take. Batch j of a
call is seeded by (seed, j) exactly as the pipeline's sample stage seeds it, so the same
(model, sampler, seed, batch size) gives the same images here and in `samples/`.

σ² names (the reverse-process variance of the ancestral sampler and of the bound):
    beta        σ² = β_t                 (DDPM's default; "fixed_large")
    beta_tilde  σ² = β̃_t                 (the posterior variance; "fixed_small")
    learned     the network's own σ²     (models trained with a learned variance)
    analytic    Analytic-DPM's σ̂²        (Bao et al. 2022; needs gamma = estimate_gamma(...) from
                                          training images; DDIM at eta = 0: ddim_analytic)
Samplers: "ancestral", "ddim" (η = eta; deterministic at eta = 0) and "ddim_analytic" (Bao et
al.'s Analytic-DDIM: DDIM with the analytic σ̂² noise, eta = 0 by default; needs gamma).
On a chain of fewer than T steps (and on every DDIM chain) the step to x_{τ_1} adds noise of std
at most 2y/255·√(π/2), y = last_sigma_cap_y (default 1, None: no cap), as Bao et al.'s code does;
the full T-step ancestral chain is DDPM's Algorithm 2, uncapped.
Step lists come from samplers.timestep_spacing: "trailing" (default, starts at T − 1),
"linspace", "leading" (diffusers': S steps of stride T // S; the DDIM code's uniform when S
divides T) or "ddim_quadratic" (DDIM's CIFAR-10 tables).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch

from ddpm_core import analytic
from ddpm_core.diffusion import LEARNED_VAR_TYPES, Diffusion
from ddpm_core.samplers import DEFAULT_LAST_SIGMA_CAP_Y, DEFAULT_SPACING, Spacing
from ddpm_core.schedules import ScheduleKind, make_betas

SamplerKind = Literal["ancestral", "ddim", "ddim_analytic"]
Sigma2 = Literal["beta", "beta_tilde", "learned", "analytic"]
Which = Literal["ema", "model"]

# public σ² name -> the library's (analytic.Sigma2)
SIGMA2_TO_CORE: dict[str, analytic.Sigma2] = {"beta": "fixed_large", "beta_tilde": "fixed_small",
                                              "analytic": "analytic"}


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
        net, diff = _load_ours(p, which)
    else:
        raise FileNotFoundError(f"{path}: no such file or folder (nor a hub id owner/name)")
    return net.to(device).eval().requires_grad_(False), diff


def _load_ours(path: Path, which: Which) -> tuple[torch.nn.Module, Diffusion]:
    """Our model file or training checkpoint (ddpm_core.modelfile)."""
    from ddpm_core.modelfile import load_model_file

    loaded = load_model_file(path, which=which)
    return loaded.net, loaded.diffusion


def save_model_file(net: torch.nn.Module, diff: Diffusion, path: str | Path,
                    meta: dict | None = None) -> None:
    """Our model file of (net, diff), the same weights as EMA and raw (ddpm_core.modelfile)."""
    from ddpm_core.convert import schedule_kind
    from ddpm_core.modelfile import ModelSpec, save_model

    kind = schedule_kind(diff.betas)
    if kind is None:
        raise ValueError(f"the model's β (T = {diff.T}) are none of our schedules "
                         f"{get_args(ScheduleKind)} at T = {diff.T}; our model file cannot "
                         "hold them")
    spec = ModelSpec(unet=net.cfg, schedule=kind, timesteps=diff.T, mean_type=diff.mean_type,
                     var_type=diff.var_type)
    sd = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    save_model(Path(path), spec, weights={"ema": sd, "model": sd}, meta=meta)


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


# ----------------------------------------------------------------------------- sampling


def _device(device: str | torch.device | None, net: torch.nn.Module) -> torch.device:
    if device is not None:
        return torch.device(device)
    return next(net.parameters()).device


def timesteps_for(diff: Diffusion, steps: int | None, spacing: Spacing) -> list[int] | None:
    """The increasing steps a chain of `steps` visits (None: all T, the full chain)."""
    from ddpm_core.samplers import SPACINGS, timestep_spacing

    if spacing not in SPACINGS:  # checked even for the full chain: a typo is never ignored
        raise ValueError(f"unknown spacing {spacing!r}; expected one of {SPACINGS}")
    if steps is None or steps == diff.T:
        return None
    if not 1 <= steps <= diff.T:
        raise ValueError(f"steps must lie in 1..T = {diff.T}, got {steps}")
    return timestep_spacing(diff.T, steps, spacing)


def core_sigma2(diff: Diffusion, sigma2: Sigma2 | None) -> analytic.Sigma2:
    """The library's σ² choice for a public name (None: the model's own variance)."""
    if sigma2 is None:
        return diff.var_type
    if sigma2 == "learned":
        if diff.var_type not in LEARNED_VAR_TYPES:
            raise ValueError(f"sigma2='learned' needs a model with a learned variance; this one "
                             f"has {diff.var_type!r} (use 'beta' or 'beta_tilde')")
        return diff.var_type
    if sigma2 not in SIGMA2_TO_CORE:
        raise ValueError(f"unknown sigma2 {sigma2!r}; expected one of {get_args(Sigma2)}")
    if diff.var_type in LEARNED_VAR_TYPES and sigma2 != "analytic":
        raise ValueError(f"this model learned its variance ({diff.var_type!r}): use "
                         "sigma2='learned'")
    return SIGMA2_TO_CORE[sigma2]


@torch.no_grad()
def estimate_gamma(net: torch.nn.Module, diffusion: Diffusion, images: np.ndarray, *,
                   M: int = 100, seed: int = 0, batch_size: int = 256,
                   device: str | torch.device | None = None,
                   progress: bool = False) -> torch.Tensor:
    """Γ_t = E‖ε̂(x_t, t)‖²/d [T] float64 on the first M uint8 training images [N, H, W, C]
    (Bao et al. 2022; M = 10 or 100 gave the same NLL there): the input of sigma2="analytic"."""
    from ddpm_core.data import to_model_tensor, to_unit

    cfg = getattr(net, "cfg", None)
    _check_images(images, None if cfg is None else
                  (cfg.in_channels, cfg.image_size, cfg.image_size))
    dev = _device(device, net)
    net = net.to(dev).eval()
    x0 = to_unit(to_model_tensor(images[:M])).to(dev)
    gen = torch.Generator(dev).manual_seed(seed)
    return analytic.estimate_gamma(net, diffusion, x0, len(x0), gen, batch_size,
                                   progress=progress)


@torch.no_grad()
def sample(net: torch.nn.Module, diffusion: Diffusion, n: int = 64, *,
           sampler: SamplerKind = "ancestral", steps: int | None = None,
           sigma2: Sigma2 | None = None, spacing: Spacing = DEFAULT_SPACING, eta: float = 0.0,
           seed: int = 0, batch_size: int = 256, device: str | torch.device | None = None,
           clip_x0: bool = True, gamma: torch.Tensor | None = None,
           last_sigma_cap_y: float | None = DEFAULT_LAST_SIGMA_CAP_Y,
           progress: bool = False) -> np.ndarray:
    """n images uint8 [n, H, W, C] drawn from p_θ.

    sampler "ancestral" (DDPM Algorithm 2; `steps` < T respaces the chain, improved DDPM
    Sec. 4) with reverse variance `sigma2`, "ddim" (Song et al. 2021, η = `eta`; sigma2 None,
    or "analytic" with eta > 0) or "ddim_analytic" (Bao et al. 2022's Analytic-DDIM: σ̂² noise
    at η = `eta`, 0 by default). `steps` None means all T steps (DDIM then visits every step
    too). σ² analytic needs gamma = estimate_gamma(net, diffusion, training_images).
    last_sigma_cap_y: y of the cap 2y/255·√(π/2) on σ of the step to x_{τ_1} (K < T and DDIM;
    None: no cap).
    """
    from ddpm_core import progress as bars
    from ddpm_core.data import from_unit, to_numpy_images
    from ddpm_core.distributed import sample_in_batches
    from ddpm_core.samplers import sample_ancestral, sample_ddim

    if n < 1 or batch_size < 1:
        raise ValueError(f"n and batch_size must be >= 1, got n={n}, batch_size={batch_size}")
    if sampler not in get_args(SamplerKind):
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {get_args(SamplerKind)}")
    if sampler == "ddim" and sigma2 not in (None, "analytic"):
        raise ValueError("DDIM's noise is set by eta (sigma2 None) or sigma2='analytic'; "
                         f"sigma2={sigma2!r} is for the ancestral sampler")
    if sampler == "ddim_analytic" and sigma2 not in (None, "analytic"):
        raise ValueError(f"sampler 'ddim_analytic' adds the analytic σ̂²; sigma2={sigma2!r} is "
                         "for the ancestral sampler (leave sigma2 unset)")
    if last_sigma_cap_y is not None:
        from ddpm_core.samplers import last_sigma_cap

        last_sigma_cap(last_sigma_cap_y)  # y > 0 or a one-line error
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must lie in [0, 1], got {eta}")
    diff = diffusion
    chosen = core_sigma2(diff, sigma2) if sampler == "ancestral" else None
    analytic_ddim = sampler == "ddim_analytic" or (sampler == "ddim" and sigma2 == "analytic")
    if (sigma2 == "analytic" or analytic_ddim) and gamma is None:
        raise ValueError(f"{'sampler=' + repr(sampler) if analytic_ddim else 'sigma2'} "
                         "needs gamma: pass gamma=ddpm_core.estimate_gamma(net, diffusion, "
                         "training_images)")
    if sampler == "ddim" and sigma2 == "analytic" and eta == 0.0:
        raise ValueError("DDIM with sigma2='analytic' needs eta > 0 (plain DDIM at eta = 0 is "
                         "deterministic); Analytic-DDIM at eta = 0 is sampler='ddim_analytic'")
    timesteps = timesteps_for(diff, steps, spacing)
    dev = _device(device, net)
    net = net.to(dev).eval()
    cfg = getattr(net, "cfg", None)
    if cfg is None:
        raise ValueError("net must be a ddpm_core UNet (its .cfg gives the image shape)")
    chw = (cfg.in_channels, cfg.image_size, cfg.image_size)
    # one network call per step of every batch: the bar and its ETA move within a batch
    steps_per_batch = diff.T if timesteps is None else len(timesteps)
    bar = bars.Progress(-(-n // batch_size) * steps_per_batch, f"sample {sampler}", "steps",
                        enabled=progress)
    counted = bars.counting(net, bar)

    def draw(size: int, gen: torch.Generator) -> torch.Tensor:
        shape = (size, *chw)
        if sampler != "ancestral":
            ts = timesteps if timesteps is not None else list(range(diff.T))
            x = sample_ddim(diff, counted, shape, ts, eta, gen, clip_x0=clip_x0,
                            sigma2="analytic" if analytic_ddim else "eta", gamma=gamma,
                            last_sigma_cap_y=last_sigma_cap_y)
        else:
            x = sample_ancestral(diff, counted, shape, gen, timesteps=timesteps,
                                 clip_x0=clip_x0, sigma2=chosen, gamma=gamma,
                                 last_sigma_cap_y=last_sigma_cap_y)
        return from_unit(x).cpu()

    with bar:
        x = sample_in_batches(draw, n, batch_size, seed, rank=0, world=1, device=dev)
    return to_numpy_images(x)


# ----------------------------------------------------------------------------- bits/dim


def _check_images(images: np.ndarray, chw: Sequence[int] | None) -> None:
    from ddpm_core.data import DataError

    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
        raise DataError(f"images: expected uint8 numpy [N, H, W, C], got "
                        f"{getattr(images, 'dtype', type(images).__name__)} "
                        f"{getattr(images, 'shape', '')}")
    if chw is not None and tuple(images.shape[1:]) != (chw[1], chw[2], chw[0]):
        raise DataError(f"images are {tuple(images.shape[1:])} (H, W, C); the model takes "
                        f"{(chw[1], chw[2], chw[0])}")


@torch.no_grad()
def bits_per_dim_per_image(net: torch.nn.Module, diffusion: Diffusion, images: np.ndarray, *,
                           sigma2: Sigma2 | None = None, steps: int | None = None,
                           gamma: torch.Tensor | None = None, batch_size: int = 256,
                           t_batch: int = 10, device: str | torch.device | None = None,
                           progress: bool = False) -> np.ndarray:
    """Variational bound (DDPM eq. 5) per image, bits/dim float64 [N], for uint8 NHWC images.

    `steps` None is the full T-step chain; K < T the K-step chain on the even trajectory
    round(linspace(0, T−1, K)) (Bao et al. 2022). Batch j starting at image s draws the noise
    of q(x_t|x_0) from a generator seeded s, as the pipeline's bpd stage does.
    """
    from ddpm_core import progress as bars
    from ddpm_core.data import to_model_tensor, to_unit
    from ddpm_core.likelihood import bits_per_dim_at_steps

    cfg = getattr(net, "cfg", None)
    _check_images(images, None if cfg is None else
                  (cfg.in_channels, cfg.image_size, cfg.image_size))
    chosen = core_sigma2(diffusion, sigma2)
    K = diffusion.T if steps is None else int(steps)
    dev = _device(device, net)
    net = net.to(dev).eval()
    x_all = to_model_tensor(images)
    out = []
    starts = range(0, len(x_all), batch_size)
    # the K-step chain visits K indices, t_batch of them per network call, in every batch
    bar = bars.Progress(len(starts) * -(-K // t_batch), "bpd", "calls", enabled=progress)
    with bar:
        counted = bars.counting(net, bar)
        for start in starts:
            x0 = to_unit(x_all[start:start + batch_size]).to(dev)
            gen = torch.Generator(dev).manual_seed(start)
            res = bits_per_dim_at_steps(diffusion, counted, x0, [K], var_types=[chosen],
                                        gamma=gamma, t_batch=t_batch, generator=gen)
            out.append(res[K][chosen].total.numpy())
    return np.concatenate(out)


def bits_per_dim(net: torch.nn.Module, diffusion: Diffusion, images: np.ndarray, *,
                 sigma2: Sigma2 | None = None, steps: int | None = None,
                 gamma: torch.Tensor | None = None, batch_size: int = 256, t_batch: int = 10,
                 device: str | torch.device | None = None, progress: bool = False) -> float:
    """Mean negative log-likelihood bound in bits/dim of uint8 images [N, H, W, C]."""
    per = bits_per_dim_per_image(net, diffusion, images, sigma2=sigma2, steps=steps,
                                 gamma=gamma, batch_size=batch_size, t_batch=t_batch,
                                 device=device, progress=progress)
    value = float(per.mean())
    assert math.isfinite(value), "bits/dim is not finite"
    return value


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
        atol: float = 1e-5, repeats: int = 1, divergence: Literal["exact", "hutchinson"] =
        "hutchinson", batch_size: int = 1, seed: int = 0, start_index: int = 0,
        device: str | torch.device | None = None, progress: bool = False) -> Nll:
    """Exact bits/dim by the probability-flow ODE (Song et al. 2021, uniform dequantization) of
    uint8 images [N, H, W, C], per image (ddpm_core.ode.ode_bits_per_dim).

    Image j has index start_index + j: its dequantization noise and Hutchinson probes come from
    (seed, index). Images of one batch share one adaptive solve and hence its steps, so with
    batch_size > 1 a number depends on its batch companions within the tolerance (≤ ~1e-4
    bits/dim at rtol = atol = 1e-5 on the digits model); batch_size 1 makes each depend on
    (seed, index) only.
    The ODE uses the mean's ε only (a learned variance plays no part; x_0-predicting models
    give the ε derived from x̂_0); a μ-predicting model is refused (ValueError).
    """
    from ddpm_core.ode import ode_bits_per_dim

    cfg = getattr(net, "cfg", None)
    _check_images(images, None if cfg is None else
                  (cfg.in_channels, cfg.image_size, cfg.image_size))
    if not (rtol > 0 and atol > 0):
        raise ValueError(f"rtol and atol must be > 0, got rtol={rtol}, atol={atol}")
    dev = _device(device, net)
    net = net.to(dev).eval()
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    res = ode_bits_per_dim(diffusion, net, x, seed=seed, start_index=start_index,
                           divergence=divergence, repeats=repeats, batch_size=batch_size,
                           rtol=rtol, atol=atol, progress=progress)
    out = Nll(res.bpd.numpy(), res.se.numpy(), res.nfe.numpy())
    assert math.isfinite(out.mean), "ODE bits/dim is not finite"
    return out
