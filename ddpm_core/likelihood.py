"""Negative log-likelihood bound in bits per dimension (Ho et al. 2020, eq. 5).

bpd(x_0) = L_T + Σ_{t>1} L_{t−1} + L_0, every term `mean over dims (nats) / ln 2`, with
L_T = KL(q(x_T|x_0) ‖ N(0, I)) and L_0 the discretized Gaussian decoder. As in the official code
the predicted x_0 is clipped to [-1, 1] and, for σ² = β ("fixed_large"), the decoder step uses
β̃ at index 1 as its variance (see diffusion.py).

The bound of a K-step chain (as in Bao et al. 2022's likelihood tables) uses the even trajectory
τ = round(linspace(0, T−1, K)), β'_k = 1 − ᾱ_{τ_k}/ᾱ_{τ_{k−1}} and the same conventions: x̂_0
clipped, the prior is at τ_{K−1} = T−1, and learned_range interpolates between the chain's β' and
β̃'. The decoder p(x_0 | x_1) is the same for every K and every σ²: its variance is the FULL
chain's β̃ at index 1 (Bao et al.'s ll/elbo.py; x at step 1 carries the full chain's noise), not
the K-step chain's β̃' at index 1 (a wider decoder: every K < T bound 0.115 bits/dim lower at
linear T = 1000, not comparable with their tables or with K = T). K = T is the full chain.

The heads' σ² (npr, sn: Bao et al. 2022b, heads.py) are per pixel, σ²(x_t) of each term from the
head outputs of the same network call (heads.WithHeads), with the same decoder variance.

All chains and σ² choices (β, β̃, learned, analytic, npr, sn) share one pass of network calls
over the union of their original indices, t_batch indices × B images per call: ⌈T / t_batch⌉
calls when T is among the K. The mathematics runs in float64 whatever the model's precision.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ddpm_core.analytic import analytic_sigma2, eps_from_output
from ddpm_core.chains import respace, timestep_spacing
from ddpm_core.diffusion import (
    Diffusion,
    Model,
    extract,
    p_mean_variance_from_output,
    predict_x0_from_mu,
    q_posterior,
    q_sample,
)
from ddpm_core.modes import HEAD_KINDS, SIGMA2S, HeadKind, Sigma2, VarType
from ddpm_core.seeds import keyed_randn

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


@dataclass(frozen=True)
class BpdResult:
    """Bits/dim per image (CPU float64): total [B], prior L_T [B], terms [B, K] (0 is L_0).

    timesteps: the original index τ_k of each term (range(T) for the full chain).
    """

    total: Tensor
    prior: Tensor
    terms: Tensor
    timesteps: tuple[int, ...] = ()


# Ho et al. 2020, eq. (5): L_T = KL(q(x_T | x_0) ‖ N(0, I))
def prior_bpd(diff: Diffusion, x0: Tensor, t_index: int | None = None) -> Tensor:
    """Prior term L_T per image [B] in bits/dim for x0 [B,C,H,W], at index t (default T−1)."""
    t = diff.T - 1 if t_index is None else t_index
    x0 = x0.to(torch.float64)
    mean = x0 * float(diff.sqrt_alpha_bar[t])
    log_var = torch.full_like(x0, float(diff.log_one_minus_alpha_bar[t]))
    zero = torch.zeros_like(x0)
    return mean_flat(normal_kl(mean, log_var, zero, zero)) / math.log(2.0)


def even_trajectory(T: int, K: int) -> list[int]:
    """Bao et al. 2022's even trajectory round(linspace(0, T−1, K)): keeps 0 and T−1."""
    assert 2 <= K <= T or K == T, f"need 2 <= K <= T={T} steps, got K={K}"  # api.bound checks
    return list(range(T)) if K == T else timestep_spacing(T, K, "linspace")


# Ho et al. 2020, eq. (5): L_{t−1} = KL(q(x_{t−1}|x_t,x_0) ‖ p_θ(x_{t−1}|x_t)), L_0 the decoder
# (eq. 13); with σ² given per step, e.g. σ̂² (Bao et al. 2022, Theorem 1)
def vlb_terms(diff: Diffusion, out: Tensor, x0: Tensor, x_t: Tensor, t: Tensor, *,
              clip_x0: bool = False, var_type: VarType | None = None,
              log_sigma2: Tensor | None = None) -> Tensor:
    """One VLB term per example [B] in bits/dim: the decoder NLL where t == 0, else the KL.

    The reverse variance is var_type's (default diff.var_type), or log σ² with the model's mean
    when log_sigma2 is given: log_sigma2[t] of one per step [T], or per pixel [B,C,H,W].
    """
    true_mean, _, true_log_var = q_posterior(diff, x0, x_t, t)
    p = p_mean_variance_from_output(diff, out, x_t, t, clip_x0=clip_x0,
                                    var_type=var_type if log_sigma2 is None else "fixed_small")
    if log_sigma2 is None:
        log_var = p["log_variance"]
    elif log_sigma2.ndim == x_t.ndim:  # per pixel (the heads' σ²(x_t))
        assert log_sigma2.shape == x_t.shape, f"log σ² {tuple(log_sigma2.shape)} vs x_t"
        log_var = log_sigma2.to(p["mean"].dtype)
    else:
        log_var = extract(log_sigma2, t, x_t.shape, p["mean"].dtype).expand_as(x_t)
    terms = mean_flat(normal_kl(true_mean, true_log_var, p["mean"], log_var))
    first = t == 0
    if bool(first.any()):  # the decoder only where it is needed: it is the costly part
        ll = discretized_gaussian_log_likelihood(x0[first], p["mean"][first],
                                                 0.5 * log_var[first])
        terms = terms.masked_scatter(first, -mean_flat(ll))
    return terms / math.log(2.0)


# Bao et al. 2022b: σ²_{s|t}(x_t) = β̃_{s|t} + ᾱ_s β_{t|s}²/(1−ᾱ_t)² Cov[x_0|x_t] in the bound
def head_terms(diff: Diffusion, chain: Diffusion, out: Tensor, h: Tensor, x0: Tensor,
               x_t: Tensor, t: Tensor, k: Tensor, *, kind: HeadKind, clip_x0: bool) -> Tensor:
    """vlb_terms [B] with the per-pixel σ² of an NPR or SN head's h [B,C,H,W] (heads.py): ε̂ of
    the output at original index t, Cov clamped to [0, 1] when x̂_0 is clipped, the chain's
    decoder variance at k == 0."""
    from ddpm_core.heads import cov_x0, ddpm_sigma2  # heads.py imports this module

    cov = cov_x0(chain, k, h, eps_from_output(diff, out, x_t, t), kind=kind, clip=clip_x0)
    return vlb_terms(chain, out, x0, x_t, k, clip_x0=clip_x0,
                     log_sigma2=torch.log(ddpm_sigma2(chain, k, cov)))


class _Chain:
    """One K-step chain of the bound: its diffusion, positions of τ and the analytic σ²."""

    def __init__(self, diff: Diffusion, K: int, chosen: list[Sigma2],
                 gamma: Tensor | None) -> None:
        self.steps = even_trajectory(diff.T, K)
        full = K == diff.T
        # the full chain keeps the exact coefficients of diff (K = T equals bits_per_dim)
        # the decoder keeps the full chain's variance (Bao et al.'s ll/elbo.py)
        self.diff = diff if full else respace(diff, self.steps).with_decoder_variance(
            diff.decoder_variance)
        self.mu_as_x0 = not full and diff.mean_type == "mu"
        if self.mu_as_x0:
            # μ̃ outputs belong to the one-step chain: read them as x̂_0 (as the sampler does)
            self.diff = self.diff.with_mean_type("x0")
        assert full or "learned" not in chosen, f"σ² learned has no K={K}-step chain"
        self.position = {tau: k for k, tau in enumerate(self.steps)}
        self.log_sigma2 = None
        if "analytic" in chosen:  # with gamma: bits_per_dim_at_steps asserts it
            self.log_sigma2 = torch.log(analytic_sigma2(diff, gamma, None if full else self.steps))


@torch.no_grad()
def bits_per_dim_at_steps(diff: Diffusion, model: Model, x0: Tensor, *, steps: Sequence[int],
                          var_types: Sequence[Sigma2] | None = None,
                          gamma: Tensor | None = None, clip_x0: bool = True, t_batch: int = 10,
                          seed: int = 0, indices: Sequence[int] | None = None,
                          head_kinds: Sequence[HeadKind] = ()
                          ) -> dict[int, dict[Sigma2, BpdResult]]:
    """Variational bound of the K-step chains (even trajectory) for each K in steps, per σ²,
    of x0 [B,C,H,W] on the 256-level grid, in one pass (the module docstring); "analytic" needs
    gamma [T]; "npr" and "sn" a model that appends the h of the heads head_kinds, in that order
    (heads.WithHeads; an ε-model of fixed variance, the api checks). x_τ is drawn once per
    index τ: the noise of image b at τ comes from (seed, indices[b], τ) alone
    (seeds.keyed_randn; indices default 0..B−1), so no number depends on B, t_batch or the set
    of K.
    """
    assert x0.ndim == 4, f"x0 must be [B,C,H,W], got {tuple(x0.shape)}"
    assert float(x0.min()) >= -1.0 and float(x0.max()) <= 1.0, "x0 must lie in [-1, 1]"
    chosen: list[Sigma2] = [diff.var_type] if var_types is None else list(
        dict.fromkeys(var_types))  # the api validates the names (api.sigma2_of)
    assert chosen and set(chosen) <= set(SIGMA2S), f"σ² choices {chosen}"
    assert "analytic" not in chosen or gamma is not None, "σ² analytic needs gamma"
    assert {v for v in chosen if v in HEAD_KINDS} <= set(head_kinds), "σ² npr/sn need heads"
    if head_kinds:
        from ddpm_core.heads import split_heads  # heads.py imports this module
    Ks = sorted({int(K) for K in steps})
    assert Ks, "steps is empty: give the chain lengths K"
    chains = {K: _Chain(diff, K, chosen, gamma) for K in Ks}
    B, C = x0.shape[:2]
    idx = list(range(B)) if indices is None else [int(i) for i in indices]
    assert len(idx) == B, f"{len(idx)} indices for {B} images"
    x0_64 = x0.to(torch.float64)
    terms = {K: {v: torch.zeros(B, K, dtype=torch.float64, device=x0.device) for v in chosen}
             for K in Ks}
    union = sorted(set().union(*(c.steps for c in chains.values())))
    for start in range(0, len(union), t_batch):
        group = union[start:start + t_batch]
        t = torch.tensor(group, device=x0.device).repeat_interleave(B)
        x0_rep = x0_64.repeat(len(group), 1, 1, 1)
        noise = keyed_randn(seed, [(i, tau) for tau in group for i in idx], x0.shape[1:],
                            device=x0.device)
        x_t = q_sample(diff, x0_rep, t, noise)
        out = model(x_t.to(x0.dtype), t).to(torch.float64)
        out, hs = split_heads(out, C, head_kinds) if head_kinds else (out, {})
        for K, chain in chains.items():
            js = [j for j, tau in enumerate(group) if tau in chain.position]
            if not js:
                continue
            ks = [chain.position[group[j]] for j in js]
            rows = (torch.tensor(js, device=x0.device)[:, None] * B
                    + torch.arange(B, device=x0.device)[None]).reshape(-1)
            o, x0_c, x_t_c, t_orig = out[rows], x0_rep[rows], x_t[rows], t[rows]
            k = torch.tensor(ks, device=x0.device).repeat_interleave(B)  # the chain's own index
            if chain.mu_as_x0:
                o = torch.cat([predict_x0_from_mu(diff, x_t_c, t_orig, o[:, :C]), o[:, C:]], 1)
            for v in chosen:
                if v in HEAD_KINDS:
                    vt = head_terms(diff, chain.diff, o, hs[v][rows], x0_c, x_t_c, t_orig, k,
                                    kind=v, clip_x0=clip_x0)
                    terms[K][v][:, ks] = vt.reshape(len(js), B).T
                    continue
                analytic = v == "analytic"
                vt = vlb_terms(chain.diff, o, x0_c, x_t_c, k, clip_x0=clip_x0,
                               var_type=None if analytic else v,
                               log_sigma2=chain.log_sigma2 if analytic else None)
                terms[K][v][:, ks] = vt.reshape(len(js), B).T
    results: dict[int, dict[Sigma2, BpdResult]] = {}
    for K, chain in chains.items():
        prior = prior_bpd(diff, x0_64, chain.steps[-1]).cpu()
        results[K] = {v: BpdResult(total=(prior + terms[K][v].cpu().sum(dim=1)), prior=prior,
                                   terms=terms[K][v].cpu(), timesteps=tuple(chain.steps))
                      for v in chosen}
    return results
