"""Forward process q, its posterior, and the model's reverse process p_θ (Ho et al. 2020).

Timestep convention: the integer index ``t = 0..T-1`` used everywhere in code is the paper's
step ``t + 1``. So ``alpha_bar[0] = 1 − β_1`` and index 0 is the decoder step p(x_0 | x_1).

Notation (code name -> paper symbol):

    betas                    β_t
    alphas                   α_t = 1 − β_t
    alpha_bar                ᾱ_t = ∏_{s≤t} α_s
    alpha_bar_prev           ᾱ_{t−1} (ᾱ_0 = 1)
    beta_tilde               β̃_t = (1 − ᾱ_{t−1}) / (1 − ᾱ_t) · β_t   (posterior variance)
    log_beta_tilde_clipped   log β̃_t with index 0 replaced by decoder_variance (β̃_1 = 0)
    decoder_variance         σ² of the decoder p(x_0 | x_1) at index 0: β̃ at index 1
    posterior_coef_x0        √ᾱ_{t−1} β_t / (1 − ᾱ_t)        (coefficient of x_0 in μ̃_t)
    posterior_coef_xt        √α_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t)  (coefficient of x_t in μ̃_t)
    eps                      ε ~ N(0, I)
    x0, x_t                  x_0, x_t
    sigma2                   σ_t² (reverse-process variance)

Reverse variances (VarType):
    fixed_large    σ² = β_t; the variance and log-variance at index 0 are decoder_variance, β̃ at
                   index 1, as the official code does (so the likelihood's decoder uses a β̃₁-like
                   variance rather than β_1; sampling adds no noise at index 0 either way).
    fixed_small    σ² = β̃_t (log clipped at index 0 to decoder_variance).
    learned        the model's variance channels are log σ² directly.
    learned_range  v ∈ [−1, 1], log σ² = (v+1)/2 · log β_t + (1 − (v+1)/2) · log β̃_t
                   (Nichol & Dhariwal 2021, eq. 15).
Models with a learned variance output 2C channels: the first C are the mean parameterization.
"""

from __future__ import annotations

import copy
from typing import get_args

import torch
from torch import Tensor

from ddpm_core.modes import LEARNED_VAR_TYPES, MeanType, ScheduleKind, VarType
from ddpm_core.schedules import make_betas

Model = torch.nn.Module  # any callable model(x_t [B,C,H,W], t [B] long) -> [B, C or 2C, H, W]


def work_dtype(x: Tensor) -> torch.dtype:
    """Dtype for the mathematics on x: at least float32 (bf16 model outputs are promoted)."""
    return torch.promote_types(x.dtype, torch.float32)


def extract(coef: Tensor, t: Tensor, shape: torch.Size | tuple[int, ...],
            dtype: torch.dtype | None = None) -> Tensor:
    """Gather coef[t] for a batch t [B] and reshape to [B, 1, ..., 1] broadcastable to shape."""
    assert t.ndim == 1 and t.shape[0] == shape[0], f"t {tuple(t.shape)} vs batch {tuple(shape)}"
    assert t.dtype in (torch.int64, torch.int32), f"t must be integer, got {t.dtype}"
    out = coef.to(device=t.device, dtype=dtype)[t]
    return out.reshape(shape[0], *([1] * (len(shape) - 1)))


def _check_types(mean_type: str, var_type: str) -> None:
    if mean_type not in get_args(MeanType):
        raise ValueError(f"unknown mean_type {mean_type!r}; expected {get_args(MeanType)}")
    if var_type not in get_args(VarType):
        raise ValueError(f"unknown var_type {var_type!r}; expected {get_args(VarType)}")


class Diffusion:
    """Precomputed float64 coefficients [T] of a Gaussian diffusion with T steps."""

    def __init__(self, betas: Tensor, mean_type: MeanType = "eps",
                 var_type: VarType = "fixed_large", alpha_bar: Tensor | None = None) -> None:
        """alpha_bar: ᾱ given exactly (a respaced chain: 1 − ᾱ'_k/ᾱ'_{k−1} can round to 1, and
        a cumprod of 1 − β' would then give ᾱ' = 0); betas must be 1 − ᾱ_t/ᾱ_{t−1}."""
        _check_types(mean_type, var_type)
        betas = torch.as_tensor(betas, dtype=torch.float64).cpu()
        assert betas.ndim == 1 and betas.numel() >= 1, "betas must be a 1-D tensor"
        assert bool((betas > 0).all()) and bool((betas <= 1).all()), "β must lie in (0, 1]"
        self.mean_type: MeanType = mean_type
        self.var_type: VarType = var_type
        self.betas = betas
        self.alpha_bar = (torch.cumprod(1.0 - betas, dim=0) if alpha_bar is None
                          else torch.as_tensor(alpha_bar, dtype=torch.float64).cpu())
        assert self.alpha_bar.shape == betas.shape, "alpha_bar and betas differ in length"
        self.alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bar[:-1]])
        self.alphas = 1.0 - betas if alpha_bar is None else self.alpha_bar / self.alpha_bar_prev
        assert torch.allclose(1.0 - self.alphas, betas, rtol=1e-9, atol=1e-12), \
            "betas must equal 1 − ᾱ_t/ᾱ_{t−1}"
        self.sqrt_alpha_bar = self.alpha_bar.sqrt()
        self.sqrt_one_minus_alpha_bar = (1.0 - self.alpha_bar).sqrt()
        self.log_one_minus_alpha_bar = torch.log1p(-self.alpha_bar)
        self.sqrt_recip_alpha_bar = self.alpha_bar.rsqrt()
        self.sqrt_recipm1_alpha_bar = (1.0 / self.alpha_bar - 1.0).sqrt()
        # Ho et al. 2020, eq. (7)
        self.beta_tilde = betas * (1.0 - self.alpha_bar_prev) / (1.0 - self.alpha_bar)
        self.posterior_coef_x0 = betas * self.alpha_bar_prev.sqrt() / (1.0 - self.alpha_bar)
        self.posterior_coef_xt = (
            (1.0 - self.alpha_bar_prev) * self.alphas.sqrt() / (1.0 - self.alpha_bar)
        )
        # β̃ at index 0 is 0: log is clipped with index 1 (official code); T = 1 falls back to β.
        self._set_decoder_variance(float(self.beta_tilde[1] if len(betas) > 1 else betas[0]))

    def _set_decoder_variance(self, variance: float) -> None:
        # index 0 of every fixed σ² (and of learned_range's lower end) is the decoder's variance
        self.decoder_variance = variance
        first = torch.tensor([variance], dtype=torch.float64)
        self.log_beta_tilde_clipped = torch.log(torch.cat([first, self.beta_tilde[1:]]))
        # σ² = β with the decoder's variance at index 0 (official code, the likelihood's L_0)
        self.sigma2_large = torch.cat([first, self.betas[1:]])
        self.log_sigma2_large = torch.log(self.sigma2_large)

    @property
    def T(self) -> int:
        return int(self.betas.numel())

    @classmethod
    def from_schedule(cls, kind: ScheduleKind, T: int, mean_type: MeanType = "eps",
                      var_type: VarType = "fixed_large") -> Diffusion:
        """Diffusion with β from make_betas(kind, T)."""
        return cls(make_betas(kind, T), mean_type=mean_type, var_type=var_type)

    def with_var_type(self, var_type: VarType) -> Diffusion:
        """Same β and mean type, another reverse variance."""
        return self._with(self.mean_type, var_type)

    def with_mean_type(self, mean_type: MeanType) -> Diffusion:
        """Same β and variance type, another mean parameterization."""
        return self._with(mean_type, self.var_type)

    def _with(self, mean_type: MeanType, var_type: VarType) -> Diffusion:
        # the coefficients are shared (never written after __init__), the types replaced
        _check_types(mean_type, var_type)
        other = copy.copy(self)
        other.mean_type, other.var_type = mean_type, var_type
        return other

    # Bao et al. 2022's code (ll/elbo.py): a K-step chain's decoder keeps the full chain's σ²
    def with_decoder_variance(self, variance: float) -> Diffusion:
        """Same chain with σ² of the decoder p(x_0 | x_{τ_0}) (index 0) set to `variance`.

        A respaced chain τ_0 = 0 < τ_1 < … of the bound passes the full chain's decoder_variance:
        x at step 1 carries the full chain's noise whatever chain visits it. Its own β̃' at
        index 1 (≈ β_1 for a long step τ_1, 1.8× the full chain's at linear T = 1000, K = 10)
        would give each K its own, wider decoder: still a bound, but lower by 0.115 bits/dim
        than Bao et al.'s convention and not comparable with K = T.
        """
        if not variance > 0:
            raise ValueError(f"decoder variance must be > 0, got {variance}")
        other = copy.copy(self)
        other._set_decoder_variance(float(variance))
        return other

    def out_channels(self, in_channels: int) -> int:
        """Channels the network must output: 2C for learned variances, else C."""
        return 2 * in_channels if self.var_type in LEARNED_VAR_TYPES else in_channels

    def __repr__(self) -> str:
        return f"Diffusion(T={self.T}, mean_type={self.mean_type!r}, var_type={self.var_type!r})"


# Ho et al. 2020, eq. (2): q(x_t | x_{t−1}) = N(√(1−β_t) x_{t−1}, β_t I)
def q_step_mean_variance(diff: Diffusion, x_prev: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Mean [B,C,H,W] and variance [B,1,1,1] of one forward step q(x_t | x_{t−1})."""
    dt = work_dtype(x_prev)
    mean = extract(diff.alphas.sqrt(), t, x_prev.shape, dt) * x_prev
    return mean, extract(diff.betas, t, x_prev.shape, dt)


# Ho et al. 2020, eq. (2)
def q_step_sample(diff: Diffusion, x_prev: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """Draw x_t ~ q(x_t | x_{t−1}) [B,C,H,W] with the given noise ε."""
    mean, var = q_step_mean_variance(diff, x_prev, t)
    return mean + var.sqrt() * eps


# Ho et al. 2020, eq. (4): q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I)
def q_mean_variance(diff: Diffusion, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Mean [B,C,H,W], variance and log-variance [B,1,1,1] of q(x_t | x_0)."""
    dt = work_dtype(x0)
    mean = extract(diff.sqrt_alpha_bar, t, x0.shape, dt) * x0
    var = extract(1.0 - diff.alpha_bar, t, x0.shape, dt)
    return mean, var, extract(diff.log_one_minus_alpha_bar, t, x0.shape, dt)


# Ho et al. 2020, eq. (4)
def q_sample(diff: Diffusion, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """Draw x_t ~ q(x_t | x_0) = √ᾱ_t x_0 + √(1−ᾱ_t) ε, shape [B,C,H,W]."""
    assert eps.shape == x0.shape, f"eps {tuple(eps.shape)} vs x0 {tuple(x0.shape)}"
    dt = work_dtype(x0)
    return (extract(diff.sqrt_alpha_bar, t, x0.shape, dt) * x0
            + extract(diff.sqrt_one_minus_alpha_bar, t, x0.shape, dt) * eps)


# Ho et al. 2020, eqs. (6)-(7)
def q_posterior(diff: Diffusion, x0: Tensor, x_t: Tensor, t: Tensor
                ) -> tuple[Tensor, Tensor, Tensor]:
    """Mean μ̃_t [B,C,H,W], variance β̃_t and clipped log β̃_t [B,1,1,1] of q(x_{t−1}|x_t,x_0)."""
    assert x0.shape == x_t.shape, f"x0 {tuple(x0.shape)} vs x_t {tuple(x_t.shape)}"
    dt = work_dtype(x_t)
    mean = (extract(diff.posterior_coef_x0, t, x_t.shape, dt) * x0
            + extract(diff.posterior_coef_xt, t, x_t.shape, dt) * x_t)
    var = extract(diff.beta_tilde, t, x_t.shape, dt)
    return mean, var, extract(diff.log_beta_tilde_clipped, t, x_t.shape, dt)


# Ho et al. 2020, eq. (4) solved for x_0 (used in eq. 11)
def predict_x0_from_eps(diff: Diffusion, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """x̂_0 = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t, shape [B,C,H,W]."""
    dt = work_dtype(x_t)
    return (extract(diff.sqrt_recip_alpha_bar, t, x_t.shape, dt) * x_t
            - extract(diff.sqrt_recipm1_alpha_bar, t, x_t.shape, dt) * eps)


# Ho et al. 2020, eq. (4) solved for ε
def predict_eps_from_x0(diff: Diffusion, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
    """ε̂ = (x_t/√ᾱ_t − x̂_0) / √(1/ᾱ_t − 1), shape [B,C,H,W]."""
    dt = work_dtype(x_t)
    return ((extract(diff.sqrt_recip_alpha_bar, t, x_t.shape, dt) * x_t - x0)
            / extract(diff.sqrt_recipm1_alpha_bar, t, x_t.shape, dt))


# Ho et al. 2020, eq. (7) solved for x_0
def predict_x0_from_mu(diff: Diffusion, x_t: Tensor, t: Tensor, mu: Tensor) -> Tensor:
    """x̂_0 such that μ̃_t(x̂_0, x_t) = μ, shape [B,C,H,W]."""
    dt = work_dtype(x_t)
    return ((mu - extract(diff.posterior_coef_xt, t, x_t.shape, dt) * x_t)
            / extract(diff.posterior_coef_x0, t, x_t.shape, dt))


# Nichol & Dhariwal 2021, eq. (15) and Ho et al. 2020, Sec. 3.2 (fixed σ²)
def p_variance(diff: Diffusion, var_out: Tensor | None, t: Tensor, shape: torch.Size,
               var_type: VarType | None = None, dtype: torch.dtype = torch.float32
               ) -> tuple[Tensor, Tensor]:
    """Variance σ_t² and log σ_t² of p_θ(x_{t−1}|x_t), broadcast to shape [B,C,H,W]."""
    var_type = var_type or diff.var_type
    dt = dtype if var_out is None else work_dtype(var_out)
    if var_type == "fixed_large":
        log_var = extract(diff.log_sigma2_large, t, shape, dt).expand(shape)
    elif var_type == "fixed_small":
        log_var = extract(diff.log_beta_tilde_clipped, t, shape, dt).expand(shape)
    else:
        assert var_out is not None and var_out.shape == shape, "learned variance needs C channels"
        if var_type == "learned":
            log_var = var_out
        else:
            frac = (var_out + 1.0) / 2.0
            log_var = (frac * extract(torch.log(diff.betas), t, shape, dt)
                       + (1.0 - frac) * extract(diff.log_beta_tilde_clipped, t, shape, dt))
    return torch.exp(log_var), log_var


# Ho et al. 2020, eq. (1) with Table 2's parameterizations of μ_θ
def p_mean_variance_from_output(diff: Diffusion, out: Tensor, x_t: Tensor, t: Tensor,
                                clip_x0: bool = True, var_type: VarType | None = None
                                ) -> dict[str, Tensor]:
    """Mean, variance, log_variance and pred_x0 [B,C,H,W] of p_θ(x_{t−1}|x_t) from the output."""
    B, C = x_t.shape[:2]
    assert out.shape[0] == B and out.shape[2:] == x_t.shape[2:], f"output {tuple(out.shape)}"
    assert out.shape[1] == diff.out_channels(C), (
        f"model output has {out.shape[1]} channels, {diff!r} needs {diff.out_channels(C)}")
    var_type = var_type or diff.var_type
    if var_type in LEARNED_VAR_TYPES and diff.var_type != var_type:
        raise ValueError(f"var_type {var_type!r} needs a model trained with it, not {diff!r}")
    out = out.to(work_dtype(x_t))
    mean_out, var_out = (out[:, :C], out[:, C:]) if out.shape[1] == 2 * C else (out, None)
    variance, log_variance = p_variance(diff, var_out, t, x_t.shape, var_type, out.dtype)

    def maybe_clip(x: Tensor) -> Tensor:
        return x.clamp(-1.0, 1.0) if clip_x0 else x

    if diff.mean_type == "mu":
        # official code: μ_θ is the output itself; x̂_0 is derived for reporting only
        mean = mean_out
        pred_x0 = maybe_clip(predict_x0_from_mu(diff, x_t, t, mean_out))
    else:
        raw_x0 = mean_out if diff.mean_type == "x0" else predict_x0_from_eps(
            diff, x_t, t, mean_out)
        pred_x0 = maybe_clip(raw_x0)
        mean = q_posterior(diff, pred_x0, x_t, t)[0]
    return {"mean": mean, "variance": variance, "log_variance": log_variance,
            "pred_x0": pred_x0}


# Ho et al. 2020, eq. (1): p_θ(x_{t−1} | x_t) = N(μ_θ(x_t, t), σ_t² I)
def p_mean_variance(diff: Diffusion, model: Model, x_t: Tensor, t: Tensor,
                    clip_x0: bool = True) -> dict[str, Tensor]:
    """Call model(x_t, t) and return p_θ(x_{t−1}|x_t)'s mean/variance/pred_x0 [B,C,H,W]."""
    return p_mean_variance_from_output(diff, model(x_t, t), x_t, t, clip_x0=clip_x0)


# Ho et al. 2020, Table 2: what each parameterization regresses
def mean_target(diff: Diffusion, x0: Tensor, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """Regression target [B,C,H,W] for the mean channels: ε, x_0 or μ̃_t(x_t, x_0)."""
    if diff.mean_type == "eps":
        return eps
    if diff.mean_type == "x0":
        return x0
    return q_posterior(diff, x0, x_t, t)[0]
