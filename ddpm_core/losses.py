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

from typing import get_args

import torch
from torch import Tensor

from ddpm_core.diffusion import Diffusion, Model, mean_target, q_sample
from ddpm_core.likelihood import mean_flat, vlb_terms
from ddpm_core.modes import FIXED_VAR_TYPES, LEARNED_VAR_TYPES, LossType

HYBRID_LAMBDA = 0.001  # Nichol & Dhariwal 2021, Sec. 3.1


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
        # Ho et al. 2020, eq. (14) and Algorithm 1: L_simple = E‖ε − ε_θ(√ᾱ_t x_0 + √(1−ᾱ_t) ε, t)‖²
        # (its mean over dimensions; x_0 or μ̃ in place of ε for the other parameterizations)
        target = mean_target(diff, x0, x_t, t, noise)
        terms = {"mse": mean_flat((target - out[:, :C]) ** 2)}
        if self.loss_type == "simple":
            terms["loss"] = terms["mse"]
            return terms
        if self.loss_type == "hybrid":
            # stop the mean's gradient: the VLB term only trains the variance channels
            out = torch.cat([out[:, :C].detach(), out[:, C:]], dim=1)
        vlb_term = vlb_terms(diff, out, x0, x_t, t, clip_x0=False)
        terms["vlb_term"] = vlb_term
        terms["vlb"] = diff.T * vlb_term
        if self.loss_type == "vlb":
            terms["loss"] = terms["vlb"]
        else:
            terms["loss"] = terms["mse"] + HYBRID_LAMBDA * terms["vlb"]
        return terms
