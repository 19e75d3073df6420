"""Training losses: L_simple, L_vlb and L_hybrid (the timestep samplers are in resample.py).

Per-example losses are [B] tensors. VLB terms are in bits per dimension (mean over C, H, W of
nats, divided by ln 2), like improved-diffusion. Index convention as in diffusion.py:
index t = 0 is the decoder term L_0 = −log p_θ(x_0|x_1), index t > 0 is the paper's L_t.

L_vlb per example is T · L_t with t ~ Uniform{0..T−1}: an unbiased estimate of Σ_t L_t, the
bound without the constant prior term L_T (improved-diffusion's "rescaled KL"). L_hybrid is
L_simple + λ · T · L_t with λ = 0.001 and the mean's gradient stopped in L_t
(Nichol & Dhariwal 2021, Sec. 3.1); for T = 1000 this is L_simple + L_t.
"""

from __future__ import annotations

import math
from typing import get_args

import torch
from torch import Tensor

from ddpm_core.diffusion import (
    Diffusion,
    Model,
    mean_target,
    p_mean_variance_from_output,
    q_posterior,
    q_sample,
)
from ddpm_core.modes import FIXED_VAR_TYPES, LEARNED_VAR_TYPES, LossType, VarType

HYBRID_LAMBDA = 0.001  # Nichol & Dhariwal 2021, Sec. 3.1
BIN_HALF_WIDTH = 1.0 / 255.0  # half a bin of the 256-level grid on [-1, 1]
EDGE = 0.999  # x below −0.999 / above 0.999 is the first / last bin
PROB_FLOOR = 1e-12  # official code: log(max(p, 1e-12)) on every bin
LOG_PROB_FLOOR = math.log(PROB_FLOOR)


def mean_flat(x: Tensor) -> Tensor:
    """Mean over every dimension but the batch: [B, ...] -> [B]."""
    return x.mean(dim=tuple(range(1, x.ndim)))


# KL between diagonal Gaussians (closed form), e.g. Kingma & Welling 2014, App. B
def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) elementwise, in nats (broadcast shape)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


# Standard normal CDF Φ(x) = ½ erfc(−x/√2): exact and accurate in the lower tail (the official
# code uses a tanh approximation)
def standard_normal_cdf(x: Tensor) -> Tensor:
    """Φ(x) elementwise."""
    return 0.5 * torch.special.erfc(-x / math.sqrt(2.0))


# Ho et al. 2020, eq. (13): discretized Gaussian decoder over 256 bins of [-1, 1]
def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log ∫_bin(x) N(y; mean, e^{2·log_scale}) dy elementwise, in nats, for x on the 256 grid.

    Every bin's probability is floored at 1e-12 before the log, as in the official code
    (log(max(p, 1e-12))): one hopeless dimension costs at most 40 bits, and a bin whose mass
    underflows to 0 gets a zero gradient instead of 0 · ∞ = NaN. Every branch of the selects
    below is finite, because torch.where back-propagates 0 · (derivative) into the unused ones.
    """
    assert x.shape == mean.shape, f"x {tuple(x.shape)} vs mean {tuple(mean.shape)}"
    dt = x.dtype
    x, mean, log_scale = (v.to(torch.float64) for v in (x, mean, log_scale))
    inv_std = torch.exp(-log_scale)
    upper = inv_std * (x - mean + BIN_HALF_WIDTH)
    lower = inv_std * (x - mean - BIN_HALF_WIDTH)
    # first bin: (-inf, x + 1/255]; last bin: [x − 1/255, inf); log Φ is finite far into the tail
    log_cdf_upper = torch.special.log_ndtr(upper).clamp(min=LOG_PROB_FLOOR)
    log_sf_lower = torch.special.log_ndtr(-lower).clamp(min=LOG_PROB_FLOOR)
    # mass of the bin, taken in the tail it lies in to avoid cancellation near Φ = 1
    mass = torch.where(lower > 0, standard_normal_cdf(-lower) - standard_normal_cdf(-upper),
                       standard_normal_cdf(upper) - standard_normal_cdf(lower))
    log_mass = torch.log(mass.clamp(min=PROB_FLOOR))
    log_prob = torch.where(x < -EDGE, log_cdf_upper,
                           torch.where(x > EDGE, log_sf_lower, log_mass))
    return log_prob.to(dt)


# Ho et al. 2020, eq. (5): L_{t−1} = KL(q(x_{t−1}|x_t,x_0) ‖ p_θ(x_{t−1}|x_t)), L_0 decoder
def vlb_terms_from_output(diff: Diffusion, out: Tensor, x0: Tensor, x_t: Tensor, t: Tensor,
                          clip_x0: bool = False, var_type: VarType | None = None) -> Tensor:
    """One VLB term per example [B] in bits/dim: the decoder NLL where t == 0, else the KL."""
    true_mean, _, true_log_var = q_posterior(diff, x0, x_t, t)
    p = p_mean_variance_from_output(diff, out, x_t, t, clip_x0=clip_x0, var_type=var_type)
    terms = mean_flat(normal_kl(true_mean, true_log_var, p["mean"], p["log_variance"]))
    first = t == 0
    if bool(first.any()):  # the decoder only where it is needed: it is the costly part
        ll = discretized_gaussian_log_likelihood(x0[first], p["mean"][first],
                                                 0.5 * p["log_variance"][first])
        terms = terms.masked_scatter(first, -mean_flat(ll))
    return terms / math.log(2.0)


class Loss:
    """What the trainer minimises: per-example losses [B] for given t (drawn by resample.py)."""

    def __init__(self, diff: Diffusion, loss_type: LossType = "simple") -> None:
        if loss_type not in get_args(LossType):
            raise ValueError(f"unknown loss_type {loss_type!r}; expected {get_args(LossType)}")
        learned = diff.var_type in LEARNED_VAR_TYPES
        if loss_type == "simple" and learned:
            raise ValueError(f"loss_type 'simple' leaves the variance of {diff!r} untrained; "
                             "use 'hybrid' or 'vlb'")
        if loss_type == "hybrid" and not learned:
            raise ValueError(f"loss_type 'hybrid' needs a learned variance, {diff!r} has "
                             f"{diff.var_type!r} (one of {FIXED_VAR_TYPES}); use 'simple'")
        self.diff = diff
        self.loss_type: LossType = loss_type

    def losses(self, model: Model, x0: Tensor, t: Tensor, noise: Tensor) -> dict[str, Tensor]:
        """Per-example [B] losses: "loss" (to minimise), "mse", and "vlb" (T·L_t) / "vlb_term"."""
        assert x0.ndim == 4 and noise.shape == x0.shape and t.shape == (x0.shape[0],)
        diff = self.diff
        x_t = q_sample(diff, x0, t, noise)
        out = model(x_t.to(x0.dtype), t)
        C = x0.shape[1]
        assert out.shape[1] == diff.out_channels(C), f"model output {tuple(out.shape)}"
        out = out.float() if out.dtype in (torch.float16, torch.bfloat16) else out
        target = mean_target(diff, x0, x_t, t, noise)
        terms = {"mse": mean_flat((target - out[:, :C]) ** 2)}
        if self.loss_type == "simple":
            terms["loss"] = terms["mse"]
            return terms
        if self.loss_type == "hybrid":
            # stop the mean's gradient: the VLB term only trains the variance channels
            out = torch.cat([out[:, :C].detach(), out[:, C:]], dim=1)
        vlb_term = vlb_terms_from_output(diff, out, x0, x_t, t, clip_x0=False)
        terms["vlb_term"] = vlb_term
        terms["vlb"] = diff.T * vlb_term
        if self.loss_type == "vlb":
            terms["loss"] = terms["vlb"]
        else:
            terms["loss"] = terms["mse"] + HYBRID_LAMBDA * terms["vlb"]
        return terms
