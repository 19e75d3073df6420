"""Negative log-likelihood bound in bits per dimension (Ho et al. 2020, eq. 5).

bpd(x_0) = L_T + Σ_{t>1} L_{t−1} + L_0, every term `mean over dims (nats) / ln 2`, with
L_T = KL(q(x_T|x_0) ‖ N(0, I)) and L_0 the discretized Gaussian decoder. As in the official code
the predicted x_0 is clipped to [-1, 1] and, for σ² = β ("fixed_large"), the decoder step uses
β̃ at index 1 as its variance (see diffusion.py).

All T terms are evaluated with ⌈T / t_batch⌉ network calls, each on t_batch timesteps × B images.
Fixed variance types differ only in σ², so several of them share one pass of network calls.
The mathematics runs in float64 whatever the model's precision.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import get_args

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ddpm_core.diffusion import LEARNED_VAR_TYPES, Diffusion, Model, VarType, q_sample
from ddpm_core.losses import mean_flat, normal_kl, vlb_terms_from_output


@dataclass(frozen=True)
class BpdResult:
    """Bits/dim per image (CPU float64): total [B], prior L_T [B], terms [B, T] (0 is L_0)."""

    total: Tensor
    prior: Tensor
    terms: Tensor


# Ho et al. 2020, eq. (5): L_T = KL(q(x_T | x_0) ‖ N(0, I))
def prior_bpd(diff: Diffusion, x0: Tensor) -> Tensor:
    """Prior term L_T per image [B] in bits/dim for x0 [B,C,H,W]."""
    x0 = x0.to(torch.float64)
    mean = x0 * float(diff.sqrt_alpha_bar[-1])
    log_var = torch.full_like(x0, float(diff.log_one_minus_alpha_bar[-1]))
    zero = torch.zeros_like(x0)
    return mean_flat(normal_kl(mean, log_var, zero, zero)) / math.log(2.0)


def _check_var_types(diff: Diffusion, var_types: Sequence[VarType] | None) -> list[VarType]:
    chosen = [diff.var_type] if var_types is None else list(dict.fromkeys(var_types))
    for v in chosen:
        if v not in get_args(VarType):
            raise ValueError(f"unknown var type {v!r}; expected one of {get_args(VarType)}")
        if v in LEARNED_VAR_TYPES and v != diff.var_type:
            raise ValueError(f"var type {v!r} needs a model trained with it; {diff!r}")
    if not chosen:
        raise ValueError("var_types is empty")
    return chosen


@torch.no_grad()
def bits_per_dim(diff: Diffusion, model: Model, x0: Tensor,
                 var_types: Sequence[VarType] | None = None, clip_x0: bool = True,
                 progress: bool = False, t_batch: int = 10,
                 generator: torch.Generator | None = None) -> dict[VarType, BpdResult]:
    """Full variational bound of p_θ(x_0) for x0 [B,C,H,W] on the 256-level grid, per var type.

    The noise of q(x_t|x_0) comes from `generator` (default: a fresh one seeded 0 on x0's
    device, so the result is deterministic).
    """
    assert x0.ndim == 4, f"x0 must be [B,C,H,W], got {tuple(x0.shape)}"
    assert float(x0.min()) >= -1.0 and float(x0.max()) <= 1.0, "x0 must lie in [-1, 1]"
    assert t_batch >= 1
    chosen = _check_var_types(diff, var_types)
    if generator is None:
        generator = torch.Generator(device=x0.device).manual_seed(0)
    B, T = x0.shape[0], diff.T
    x0_64 = x0.to(torch.float64)
    terms = {v: torch.zeros(B, T, dtype=torch.float64, device=x0.device) for v in chosen}
    starts = range(0, T, t_batch)
    for start in tqdm(starts, desc="bpd", leave=False) if progress else starts:
        k = min(t_batch, T - start)
        t = torch.arange(start, start + k, device=x0.device).repeat_interleave(B)
        x0_rep = x0_64.repeat(k, 1, 1, 1)
        noise = torch.randn(x0_rep.shape, generator=generator, device=generator.device,
                            dtype=torch.float64).to(x0.device)
        x_t = q_sample(diff, x0_rep, t, noise)
        out = model(x_t.to(x0.dtype), t).to(torch.float64)
        for v in chosen:
            vt = vlb_terms_from_output(diff, out, x0_rep, x_t, t, clip_x0=clip_x0, var_type=v)
            terms[v][:, start:start + k] = vt.reshape(k, B).T
    prior = prior_bpd(diff, x0_64)
    return {v: BpdResult(total=(prior + terms[v].sum(dim=1)).cpu(), prior=prior.cpu(),
                         terms=terms[v].cpu()) for v in chosen}
