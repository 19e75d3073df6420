"""Exact likelihood of a DDPM by its probability-flow ODE (a continuous normalising flow).

[SDE]  Song, Sohl-Dickstein, Kingma, Kumar, Ermon, Poole 2021, "Score-Based Generative Modeling
       through Stochastic Differential Equations" (ICLR 2021).
[DDIM] Song, Meng, Ermon 2021, "Denoising Diffusion Implicit Models", §4.3: DDIM with η = 0 is
       an Euler discretisation of the same ODE (in σ = √(1−ᾱ)/√ᾱ), so samplers.sample_ddim with
       S steps converges to ode_flow from t = 1 to ε as S grows.

Time convention: continuous t ∈ [0, 1]; the discrete index i = 0..T−1 (the paper's step i+1)
sits at t_i = (i + 1)/T, so t = 1 is the last step and ᾱ(0) = 1. The network is called with the
label of continuous.ContinuousSchedule.label: the fractional index whose discrete log-SNR is
that of ᾱ(t), so a network trained at ᾱ_i is told the noise of the state (score_sde's 999·t,
t·(T − 1), told it more: up to 0.85 in log-SNR at T = 100; tests/test_ode_gap.py).

Notation (code name -> symbol):

    alpha_bar(t)     ᾱ(t) = exp(−∫_0^t β(s) ds)        ([SDE] App. B, VP perturbation kernel)
    beta(t)          β(t) = −d log ᾱ(t)/dt
    beta_min/max     β_min = T·β_1, β_max = T·β_T: VP SDE dx = −½β(t)x dt + √β(t) dw ([SDE]
                     eq. 11) with β(t) = β_min + t(β_max − β_min); 0.1 and 20 for the linear
                     schedule at any T (schedules.py rescales β by 1000/T)
    eps              ε_θ(x, t); the score is ∇ log p_t(x) = −ε_θ/√(1−ᾱ(t))
    drift            f(x, t) = −½β(t)[x − ε_θ(x, t)/√(1−ᾱ(t))]        ([SDE] eq. 13)
    t_eps            ε = 1e-5, the start time of the likelihood ([SDE] App. D.2)
    log_p            log p_ε(x_ε) = log N(x_1; 0, I) + ∫_ε^1 ∇·f(x_t, t) dt
                     (instantaneous change of variables, Chen et al. 2018, Thm. 1; [SDE] App. D.2)

    vardeq           log P(x_0) ≥ E_{q(x_1|x_0)}[log p_θ(x_0|x_1) + log p_ε(x_1) − log q(x_1|x_0)],
                     x_1 at index 0 (ᾱ_0), the flow from t_first (ᾱ(t_first) = ᾱ_0), p_θ(x_0|x_1)
                     the chain's discretized decoder with the model's own σ² at index 0, as in
                     the DDPM bound's L_0 (Ho et al. 2020, eq. 13; [VDM], [ScoreFlow])

[VDM]       Kingma, Salimans, Poole, Ho 2021, "Variational Diffusion Models" (the discrete data
            term through the first step's Gaussian decoder).
[ScoreFlow] Song, Durkan, Murray, Ermon 2021, "Maximum Likelihood Training of Score-Based
            Diffusion Models": variational dequantization (a Gaussian q in place of the
            uniform u) bounds the discrete likelihood of a flow.

Why two dequantizations (benchmarks/ode_gap.py): uniform dequantization scores the flow's
density inside each 1/128-wide bin, but a network trained only at noise ≥ √(1 − ᾱ_0) (0.032 on
[−1, 1], 4 bins, at linear T = 100) cannot resolve a bin, and below t_first its label is an
extrapolation; on the 17-level digits the uniform ODE bits/dim lie ABOVE the variational bound
of the same model (128 test images: 4.93 and 6.44 against 4.77 and 4.66, simple and vlb), while
the variational-dequantization ODE bound lies below it (4.32 and 4.24). Only the latter is on
the footing of the DDPM bound (both bound −log2 P(x_0) through the same 256-level decoder).

Continuous ᾱ(t) per schedule: see ddpm_core/continuous.py.

Batching: scipy's adaptive solver controls the error of the whole state, so images integrated
in one solve_ivp call share one step sequence and each image's result depends (within the
tolerance) on its companions. With batch_size = 1 (the default) every image has its own call and
its number depends only on (seed, image index) and the settings; larger batches trade that
exactness for fewer, bigger network calls.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, get_args

import numpy as np
import torch
from scipy.integrate import solve_ivp
from torch import Tensor

from ddpm_core.continuous import ContinuousSchedule, continuous_schedule
from ddpm_core.diffusion import Diffusion, Model, p_mean_variance_from_output, q_sample
from ddpm_core.likelihood import discretized_gaussian_log_likelihood
from ddpm_core.modes import Dequantization, Divergence
from ddpm_core.seeds import image_seed

T_EPS = 1e-5  # [SDE] App. D.2: start time of the likelihood integral
RTOL = ATOL = 1e-5  # [SDE] App. D.2: RK45 tolerances of the likelihood


def _model_dtype_device(model: Model) -> tuple[torch.dtype, torch.device]:
    p = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
    return (torch.float64, torch.device("cpu")) if p is None else (p.dtype, p.device)


def model_eps(diff: Diffusion, sched: ContinuousSchedule, model: Model, x: Tensor,
              t: float) -> Tensor:
    """ε_θ(x, t) [B,C,H,W] from model(x, label(t)) for ε- or x_0-predicting models."""
    B, C = x.shape[:2]
    label = torch.full((B,), sched.label(t), dtype=torch.float64, device=x.device)
    out = model(x, label)[:, :C]  # learned-variance channels play no part in the ODE
    if diff.mean_type == "eps":
        return out
    assert diff.mean_type == "x0", f"mean_type {diff.mean_type!r} has no continuous-time ε"
    ab = float(sched.alpha_bar(t))
    # [DDIM] eq. (9) solved for ε with ᾱ = ᾱ(t)
    return (x - math.sqrt(ab) * out) / math.sqrt(1.0 - ab)


# [SDE] eq. (13) for the VP SDE with the score −ε_θ/√(1−ᾱ(t))
def probability_flow_drift(sched: ContinuousSchedule, x: Tensor, eps: Tensor,
                           t: float) -> Tensor:
    """f(x, t) = −½β(t)[x − ε_θ(x, t)/√(1−ᾱ(t))], shape of x."""
    beta, ab = float(sched.beta(t)), float(sched.alpha_bar(t))
    return -0.5 * beta * (x - eps / math.sqrt(-math.expm1(math.log(ab))))


# ∇·f = −½β(t)[D − tr(∂ε_θ/∂x)/√(1−ᾱ(t))]; tr by exact loop or Skilling–Hutchinson ([SDE] D.2)
def drift_and_divergence(diff: Diffusion, sched: ContinuousSchedule, model: Model, x64: Tensor,
                         t: float, probes: Tensor | None,
                         dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """Drift [B,C,H,W] and ∇·f [B, R] (float64) at x64: exact (probes None) or vᵀ(∂f/∂x)v.

    probes [R, B, C, H, W] (Rademacher); one vector-Jacobian product per probe, or D for the
    exact trace (one per dimension: tests and tiny images only). The network runs in `dtype`.
    """
    B = x64.shape[0]
    D = x64[0].numel()
    with torch.enable_grad():
        x = x64.detach().to(dtype).requires_grad_(True)
        eps = model_eps(diff, sched, model, x, t)
        if probes is None:
            trace = torch.zeros(B, 1, dtype=torch.float64, device=x.device)
            flat = eps.reshape(B, D)
            for i in range(D):
                (g,) = torch.autograd.grad(flat[:, i].sum(), x, retain_graph=True)
                trace[:, 0] += g.reshape(B, D)[:, i].double()
        else:
            R = probes.shape[0]
            trace = torch.zeros(B, R, dtype=torch.float64, device=x.device)
            for r in range(R):
                v = probes[r].to(eps.dtype)
                (g,) = torch.autograd.grad(eps, x, v, retain_graph=r < R - 1)
                trace[:, r] = (g * v).reshape(B, D).sum(1).double()
    beta, ab = float(sched.beta(t)), float(sched.alpha_bar(t))
    div = -0.5 * beta * (D - trace / math.sqrt(-math.expm1(math.log(ab))))
    drift = probability_flow_drift(sched, x64, eps.detach().double(), t)
    return drift, div


def _state(y: np.ndarray, shape: tuple[int, ...], device: torch.device) -> Tensor:
    return torch.from_numpy(y).to(device=device).reshape(shape)  # float64


@dataclass(frozen=True)
class FlowResult:
    """End point x [B,C,H,W] (float64, CPU) of the ODE and the solver's evaluation count."""

    x: Tensor
    nfe: int


@torch.no_grad()
def ode_flow(diff: Diffusion, model: Model, x: Tensor, t0: float, t1: float,
             rtol: float = RTOL, atol: float = ATOL,
             sched: ContinuousSchedule | None = None) -> FlowResult:
    """x_{t1} [B,C,H,W] from x_{t0} by the probability-flow ODE (RK45, one solve for the batch):
    t0 = ε, t1 = 1 encodes data x_ε as its latent x_1 ([SDE] §4.3); t0 = 1, t1 = ε decodes a
    latent (a deterministic sample)."""
    assert x.ndim == 4, f"x must be [B,C,H,W], got {tuple(x.shape)}"
    sched = sched or continuous_schedule(diff)
    dtype, device = _model_dtype_device(model)
    shape = tuple(x.shape)

    def fun(t: float, y: np.ndarray) -> np.ndarray:
        x64 = _state(y, shape, device)
        eps = model_eps(diff, sched, model, x64.to(dtype), t).double()
        f = probability_flow_drift(sched, x64, eps, t)
        return f.double().cpu().reshape(-1).numpy()

    sol = _solve(fun, t0, t1, x.double().cpu().reshape(-1).numpy(), rtol, atol)
    return FlowResult(torch.from_numpy(sol.y[:, -1]).reshape(shape), int(sol.nfev))


def _solve(fun: Callable[[float, np.ndarray], np.ndarray], t0: float, t1: float,
           y0: np.ndarray, rtol: float, atol: float) -> Any:  # scipy's OdeResult
    assert rtol > 0 and atol > 0, f"rtol={rtol}, atol={atol} must be > 0"
    sol = solve_ivp(fun, (t0, t1), y0, method="RK45", rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"probability-flow ODE failed between t={t0} and {t1}: {sol.message}")
    return sol


@dataclass(frozen=True)
class LogLikelihood:
    """log p_ε(x) [B, R] in nats (float64, CPU; R probes, 1 for exact), x_1 [B,C,H,W], NFE."""

    log_p: Tensor
    x1: Tensor
    nfe: int


# Chen et al. 2018, Thm. 1; [SDE] App. D.2: log p_ε(x_ε) = log N(x_1; 0, I) + ∫_ε^1 ∇·f dt
@torch.no_grad()
def ode_log_likelihood(diff: Diffusion, model: Model, x: Tensor, probes: Tensor | None = None,
                       t_eps: float = T_EPS, rtol: float = RTOL, atol: float = ATOL,
                       sched: ContinuousSchedule | None = None) -> LogLikelihood:
    """log p_ε(x) [B, R] of x [B,C,H,W] under the flow, one solve_ivp for the batch.

    probes None: exact divergence; probes [R, B, C, H, W]: Skilling–Hutchinson, each probe held
    fixed over the integration, one log-det entry per (image, probe). The state is float64 on
    the solver side; the network runs in its own dtype.
    """
    assert x.ndim == 4, f"x must be [B,C,H,W], got {tuple(x.shape)}"
    B, D = x.shape[0], x[0].numel()
    if probes is not None:
        assert probes.ndim == 5 and probes.shape[1:] == x.shape, \
            f"probes must be [R, *x.shape], got {tuple(probes.shape)}"
    R = 1 if probes is None else probes.shape[0]
    sched = sched or continuous_schedule(diff)
    dtype, device = _model_dtype_device(model)
    shape = tuple(x.shape)
    probes_dev = None if probes is None else probes.to(device=device, dtype=dtype)

    def fun(t: float, y: np.ndarray) -> np.ndarray:
        x64 = _state(y[:B * D], shape, device)
        drift, div = drift_and_divergence(diff, sched, model, x64, t, probes_dev, dtype)
        return np.concatenate([drift.double().cpu().reshape(-1).numpy(),
                               div.cpu().reshape(-1).numpy()])

    y0 = np.concatenate([x.double().cpu().reshape(-1).numpy(), np.zeros(B * R)])
    sol = _solve(fun, t_eps, 1.0, y0, rtol, atol)
    y1 = torch.from_numpy(sol.y[:, -1])
    x1 = y1[:B * D].reshape(shape)
    integral = y1[B * D:].reshape(B, R)
    prior = -0.5 * (x1.reshape(B, D) ** 2).sum(1) - 0.5 * D * math.log(2 * math.pi)
    return LogLikelihood(prior[:, None] + integral, x1, int(sol.nfev))


# Theis et al. 2016, §3.1 (uniform dequantization): x = 2(k + u)/256 − 1, u ~ U[0, 1)^D
def dequantize(images: Tensor, u: Tensor) -> Tensor:
    """uint8 levels k [B,C,H,W] plus noise u ∈ [0, 1) -> x ∈ [−1, 1) (float64)."""
    assert images.dtype == torch.uint8, f"images must be uint8, got {images.dtype}"
    return 2.0 * (images.double() + u.double()) / 256.0 - 1.0


# −log2 P(k)/D ≤ E_u[−log p_x(x)]/(D ln 2) + log2 128: see ode_bits_per_dim
def bpd_from_log_p(log_p: Tensor, D: int) -> Tensor:
    """Bits/dim −log p(x)/(D ln 2) + 7 of dequantized 8-bit data on [−1, 1] (shape of log_p)."""
    return -log_p / (D * math.log(2.0)) + 7.0


@dataclass(frozen=True)
class OdeBpd:
    """Per image (CPU float64): bpd [N] (mean over repeats), its standard error [N] over the
    repeats (0 for the exact divergence, NaN for a single probe), each repeat's bpd [N, R] and
    the solver's evaluation count nfe [N] (that of the image's solve_ivp call)."""

    bpd: Tensor
    se: Tensor
    per_repeat: Tensor
    nfe: Tensor


def image_noise(shape: tuple[int, ...], seed: int, index: int, repeats: int,
                divergence: Divergence) -> tuple[Tensor, Tensor | None]:
    """Dequantization noise u [C,H,W] and Rademacher probes [R,C,H,W] of image `index`.

    Both come from one generator seeded by image_seed(seed, index), u first, so the exact and
    Hutchinson runs see the same u and no result depends on batching.
    """
    g = torch.Generator().manual_seed(image_seed(seed, index))
    u = torch.rand(shape, generator=g, dtype=torch.float64)
    if divergence == "exact":
        return u, None
    signs = torch.randint(0, 2, (repeats, *shape), generator=g, dtype=torch.int64)
    return u, (2 * signs - 1).double()


def first_step_noise(shape: tuple[int, ...], seed: int, index: int) -> Tensor:
    """ε [C,H,W] of x_1 ~ q(x_1 | x_0) for image `index` (variational dequantization), from a
    generator seeded by image_seed(seed, index, 1): independent of u and the probes."""
    g = torch.Generator().manual_seed(image_seed(seed, index, 1))
    return torch.randn(shape, generator=g, dtype=torch.float64)


# [VDM], [ScoreFlow]: log P(x_0) ≥ E_q[log p_θ(x_0|x_1) + log p_ε(x_1) − log q(x_1|x_0)]
@torch.no_grad()
def first_step_log_likelihood_bound(diff: Diffusion, model: Model, x0: Tensor, eps: Tensor,
                                    probes: Tensor | None = None, rtol: float = RTOL,
                                    atol: float = ATOL,
                                    sched: ContinuousSchedule | None = None) -> LogLikelihood:
    """One-sample lower bound [B, R] (nats, CPU float64) on log P(x_0) of 256-level x0
    [B,C,H,W] on [−1, 1]: x_1 = √ᾱ_0 x_0 + √(1−ᾱ_0) ε (eps [B,C,H,W]), the flow's log p at
    t_first (where ᾱ(t) = ᾱ_0, label 0), the chain's decoder p_θ(x_0 | x_1) (discretized
    Gaussian, x̂_0 clipped, the bound's variance at index 0) and log q(x_1 | x_0). NFE counts
    the decoder's call."""
    assert x0.shape == eps.shape and x0.ndim == 4, f"x0 {tuple(x0.shape)}, eps {tuple(eps.shape)}"
    sched = sched or continuous_schedule(diff)
    dtype, device = _model_dtype_device(model)
    B, D = x0.shape[0], x0[0].numel()
    x0, eps = x0.double().to(device), eps.double().to(device)
    t = torch.zeros(B, dtype=torch.int64, device=device)
    x1 = q_sample(diff, x0, t, eps)  # Ho et al. 2020, eq. (4) at index 0
    flow = ode_log_likelihood(diff, model, x1, probes, sched.t_first(), rtol, atol, sched)
    out = model(x1.to(dtype), t.double()).double()  # label 0 as the ODE's float labels
    p = p_mean_variance_from_output(diff, out, x1, t)
    decoder = discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_variance"])
    one_minus = 1.0 - float(diff.alpha_bar[0])
    log_q = -0.5 * (eps.reshape(B, D) ** 2).sum(1) - 0.5 * D * math.log(2 * math.pi * one_minus)
    bound = (decoder.reshape(B, D).sum(1) - log_q).cpu()
    return LogLikelihood(bound[:, None] + flow.log_p, flow.x1, flow.nfe + 1)


def ode_bits_per_dim(diff: Diffusion, model: Model, images: Tensor, *, seed: int = 0,
                     start_index: int = 0, divergence: Divergence = "hutchinson",
                     repeats: int = 1, batch_size: int = 1, t_eps: float = T_EPS,
                     rtol: float = RTOL, atol: float = ATOL, progress: bool = False,
                     dequantization: Dequantization = "uniform") -> OdeBpd:
    """ODE bits/dim per image of uint8 images [N,C,H,W] (image j has index start_index + j).

    "uniform": x = 2(k + u)/256 − 1 maps the bin of level k, y = k + u ∈ [k, k+1),
    onto [−1, 1) with Jacobian dx/dy = 2/256 = 1/128 per dimension, so p_y(y) = p_x(x)/128^D,
    and by Jensen log P(k) = log ∫ p_y(k + u) du ≥ E_u[log p_x(x)] − D log 128: hence
    −log2 P(k)/D ≤ E_u[−log p_x(x)]/(D ln 2) + log2 128, the +7 ([SDE] Table 2's convention).
    "variational": −(first_step_log_likelihood_bound)/(D ln 2), the flow from t_first (t_eps
    unused) and the chain's decoder, a bound on −log2 P(x_0)/D like the DDPM bound's.
    batch_size images share one solve_ivp call (see the module docstring: 1 makes every
    image's number independent of the others).
    """
    assert images.ndim == 4 and images.dtype == torch.uint8, \
        f"images must be uint8 [N,C,H,W], got {images.dtype} {tuple(images.shape)}"
    assert divergence in get_args(Divergence), f"divergence {divergence!r}"
    assert repeats >= 1 and (divergence != "exact" or repeats == 1), f"repeats={repeats}"
    assert batch_size >= 1, f"batch_size={batch_size}"
    assert dequantization in get_args(Dequantization), f"dequantization {dequantization!r}"
    sched = continuous_schedule(diff)
    N, D = images.shape[0], images[0].numel()
    per = torch.zeros(N, repeats, dtype=torch.float64)
    nfe = torch.zeros(N, dtype=torch.int64)
    starts = range(0, N, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="ode bpd", leave=False)
    for s in starts:
        chunk = images[s:s + batch_size]
        noise = [image_noise(tuple(images.shape[1:]), seed, start_index + s + j, repeats,
                             divergence)
                 for j in range(len(chunk))]
        probes = None if divergence == "exact" else torch.stack(
            [p for _, p in noise], dim=1)  # type: ignore[misc]
        if dequantization == "uniform":
            x = dequantize(chunk, torch.stack([u for u, _ in noise]))
            res = ode_log_likelihood(diff, model, x, probes, t_eps, rtol, atol, sched)
            per[s:s + len(chunk)] = bpd_from_log_p(res.log_p, D)
        else:
            eps = torch.stack([first_step_noise(tuple(images.shape[1:]), seed,
                                                start_index + s + j) for j in range(len(chunk))])
            x0 = chunk.double() / 127.5 - 1.0  # the 256-level grid of the decoder (data.to_unit)
            res = first_step_log_likelihood_bound(diff, model, x0, eps, probes, rtol, atol, sched)
            per[s:s + len(chunk)] = -res.log_p / (D * math.log(2.0))
        nfe[s:s + len(chunk)] = res.nfe
    if divergence == "exact":
        se = torch.zeros(N, dtype=torch.float64)
    elif repeats == 1:
        se = torch.full((N,), math.nan, dtype=torch.float64)
    else:
        se = per.std(dim=1) / math.sqrt(repeats)
    return OdeBpd(per.mean(dim=1), se, per, nfe)
