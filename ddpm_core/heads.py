"""Per-pixel, state-dependent reverse variances from a head on the frozen ε-network: SN-DPM and
NPR-DPM (Bao, Li, Sun, Zhu & Zhang, ICML 2022, "Estimating the Optimal Covariance with
Imperfect Mean in Diffusion Probabilistic Models"; code baofff/Extended-Analytic-DPM).

Index convention and notation as in diffusion.py; on a chain τ_0 < … < τ_{K−1} (chains.py)
index k is the chain's own step s = τ_{k−1} < t = τ_k and the network sees τ_k. Per pixel:

    eps_hat     ε̂(x_t, t), the backbone's noise prediction (its mean channels read as ε)
    h           the head's output h(x_t, t) [B,C,H,W]
    sn          SN-DPM:  h ≈ E[ε² | x_t], trained on the target ε²
    npr         NPR-DPM: h ≈ E[(ε − ε̂(x_t))² | x_t], trained on (ε − ε̂)² with ε̂ detached
    cov_x0      Cov[x_0 | x_t] (its diagonal): SN (1−ᾱ_t)/ᾱ_t (h − ε̂²), NPR (1−ᾱ_t)/ᾱ_t h
    beta        β_{t|s} = 1 − ᾱ_t/ᾱ_s (the chain's β'_k)
    beta_tilde  β̃_{s|t} = β_{t|s} (1 − ᾱ_s)/(1 − ᾱ_t)
    sigma2      σ²_{s|t}(x_t) = β̃_{s|t} + ᾱ_s β_{t|s}²/(1 − ᾱ_t)² · Cov[x_0 | x_t] (DDPM)
                or λ² + (√ᾱ_s − √((1 − ᾱ_s − λ²) ᾱ_t/(1 − ᾱ_t)))² · Cov[x_0 | x_t] (DDIM),
                λ² = η² β̃_{s|t}

Cov is clamped to [0, 1] when x̂_0 is clipped (their `clip_cov_x0`, which defaults to clip_x0):
data in [−1, 1] have Var(x_0 | x_t) ≤ 1. Replacing Cov by its data average
(1−ᾱ_t)/ᾱ_t (1 − Γ_t) gives Analytic-DPM's σ̂² exactly (analytic.py). With SN the clamp at 0
is what keeps σ² ≥ β̃ where h < ε̂².

The head, as in their code (`UNetModel4Pretrained`, mode "simple"): GroupNorm, SiLU and a
zero-initialised 3×3 convolution from the U-Net's last feature map (the input of its own output
norm) to the image channels. The backbone is frozen: one forward pass of it per step, without
gradients, and a backward pass through the head alone. Zero initialisation makes h = 0 before
training: NPR then has Cov = 0 (σ² = β̃), and SN has Cov = −(1−ᾱ_t)/ᾱ_t ε̂², clamped to 0
(σ² = β̃ as well; h = 1 would give their backbone-only heuristic (1−ᾱ_t)/ᾱ_t (1 − ε̂²)).
The paper derives SN's Cov as the optimal diagonal covariance when the mean is exact and NPR's
as its correction for an imperfect mean; the citations below name the method, not an equation
number (not checked against the paper's text here).

Training (their criterions, `pretrained` methods): t uniform, the loss per image the squared
error summed over pixels (here its mean over pixels: a constant factor 1/d, immaterial for
Adam). Unlike their code, t = 0 is not drawn (fit_heads' t_min = 1): no σ² reads a head there
(the decoder has the original chain's β̃, the last sampling step adds no noise), and the least
squares of one small head over every t let that step's targets pull h everywhere else. With
T = 1000 it is 0.1 % of the draws; at T = 100 it is 1 %, and a network whose ε̂ is poor at
t = 0 (the digits vlb model: E‖ε̂‖²/d = 5.4, targets (ε − ε̂)² of mean 6 against ≤ 0.5 at
t ≥ 1) dominated the loss, so that longer training made h worse where it is read: negative
(Cov clamped to 0, σ² = β̃) in 13 % of the pixels at t = 1 after 2000 steps, and NPR's bound
above Analytic-DPM's (benchmarks/heads_ablation.py). Both heads can train from one backbone
call (head_train_step), in fit_heads' loop (api.train_heads). In the engine, WithHeads
appends the heads' h to the network's output, so the samplers and the bound read σ²(x_t) from
their one network call per step (σ² npr, sn).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ddpm_core.analytic import eps_from_output
from ddpm_core.diffusion import Diffusion, extract, q_sample
from ddpm_core.likelihood import mean_flat, vlb_terms
from ddpm_core.modes import HEAD_KINDS, HeadKind
from ddpm_core.seeds import image_seed
from ddpm_core.unet import UNet, group_norm

# (x_t [B,C,H,W], t [B]) -> (the network's output [B,C',H,W], its features [B,F,H,W])
Backbone = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def _check_kind(kind: str) -> None:
    if kind not in HEAD_KINDS:
        raise ValueError(f"unknown head kind {kind!r}; expected one of {HEAD_KINDS}")


# Bao et al. 2022b, code (UNetModel4Pretrained, mode "simple"): norm, SiLU, zero 3×3 conv
class VarianceHead(nn.Module):
    """h [B, C, H, W] from the backbone's last feature map [B, F, H, W]; 0 before training."""

    def __init__(self, feature_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm = group_norm(feature_channels)
        self.conv = nn.Conv2d(feature_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv.weight)  # their zero_module: every parameter of the conv
        nn.init.zeros_(self.conv.bias)

    def forward(self, features: Tensor) -> Tensor:
        features = features.to(self.conv.weight.dtype)  # bf16 features of an autocast backbone
        return self.conv(torch.nn.functional.silu(self.norm(features)))


def find_unet(net: nn.Module) -> UNet:
    """The one ddpm_core UNet inside `net` (wrappers: inference, counting; not compiled ones)."""
    if "torch._dynamo" in sys.modules and any(  # nothing is compiled before dynamo is imported
            isinstance(m, sys.modules["torch._dynamo"].eval_frame.OptimizedModule)
            for m in net.modules()):
        raise ValueError("the variance heads read the UNet's last feature map through a hook, "
                         "which torch.compile does not run: use the network without compile "
                         "(compile: false)")
    found = [m for m in net.modules() if isinstance(m, UNet)]
    if len(found) != 1:
        raise ValueError(f"the variance head needs one ddpm_core UNet inside the network, "
                         f"found {len(found)}")
    return found[0]


def head_for(net: nn.Module) -> VarianceHead:
    """A zero-initialised head sized for the UNet inside `net` (features of its first level)."""
    unet = find_unet(net)
    return VarianceHead(unet.norm_out.num_channels, unet.cfg.in_channels)


def unet_backbone(net: nn.Module) -> Backbone:
    """(output, last feature map) of `net` in one forward pass, without gradients.

    The feature map is the input of the UNet's `norm_out` (the output block is conv_out(SiLU(
    norm_out(h)))), caught by a forward pre-hook that lives for the one call only: unet.py is
    unchanged and the output is bit-identical to net(x_t, t). A wrapper may call the UNet in
    chunks, in order, padded at the end (api.FixedRows): the first B rows caught are the batch's.
    Not through torch.compile (a compiled graph need not run the hook). The backbone must be
    in eval mode (frozen: no dropout noise in ε̂).
    """
    unet = find_unet(net)

    def call(x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        if unet.training:  # the wrappers' own flags do not matter
            raise ValueError("the backbone of a variance head must be frozen: call net.eval()")
        caught: list[Tensor] = []
        hook = unet.norm_out.register_forward_pre_hook(
            lambda _m, args: caught.append(args[0].clone()))  # a copy: CUDA graphs reuse memory
        try:
            with torch.no_grad():
                out = net(x_t, t)
        finally:
            hook.remove()
        B = x_t.shape[0]
        assert sum(c.shape[0] for c in caught) >= B, "the UNet's norm_out did not see the batch"
        return out, torch.cat(caught)[:B]

    return call


class WithHeads(nn.Module):
    """`net(x_t, t)` [B,C',H,W] with each head's h [B,C,H,W] appended, in the order of `heads`.

    One network call gives the output and the features the heads read (unet_backbone), so the
    samplers and the bound keep their one call per step through api.FixedRows and the progress
    counter; split_heads takes the h off again. Without gradients (a frozen backbone).
    """

    def __init__(self, net: nn.Module, heads: Mapping[HeadKind, nn.Module]) -> None:
        super().__init__()
        for kind in heads:
            _check_kind(kind)
        self.net, self.heads = net, nn.ModuleDict(dict(heads))
        self.backbone = unet_backbone(net)

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        out, features = self.backbone(x_t, t)
        with torch.no_grad():
            hs = [head(features).to(out.dtype) for head in self.heads.values()]
        return torch.cat([out, *hs], dim=1)


def split_heads(out: Tensor, C: int, kinds: Sequence[HeadKind]) -> tuple[Tensor, dict[str, Tensor]]:
    """(the network's output, {kind: h [B,C,H,W]}) of a WithHeads output with heads `kinds`."""
    if not kinds:
        return out, {}
    n = len(kinds) * C
    assert out.shape[1] > n, f"output of {out.shape[1]} channels holds no {len(kinds)} heads"
    return out[:, :-n], dict(zip(kinds, out[:, -n:].split(C, dim=1), strict=True))


def fit_heads(diff: Diffusion, backbone: Backbone, heads: Mapping[HeadKind, nn.Module],
              x0: Tensor, *, steps: int, lr: float, batch_size: int, seed: int, t_min: int = 1,
              progress: Callable[[dict[str, Tensor]], None] | None = None) -> None:
    """Train the heads {kind: head} on the images x0 [N,C,H,W] in [-1, 1] (their code: Adam,
    t uniform; here over t_min..T−1, t_min = 1: the steps whose σ² reads a head, the module
    docstring; 0 is their code's): step s draws its images, t and ε from a generator seeded
    (seed, s) alone, so a rerun is identical. progress(losses) after each step."""
    assert x0.ndim == 4 and steps >= 0 and batch_size >= 1, "the api validates the settings"
    assert 0 <= t_min < diff.T, f"t_min {t_min} outside 0..T−1 = {diff.T - 1}"
    params = [p for head in heads.values() for p in head.parameters()]
    optimizer = torch.optim.Adam(params, lr=lr)
    N, dev = x0.shape[0], x0.device
    for step in range(steps):
        g = torch.Generator().manual_seed(image_seed(seed, step))
        idx = torch.randint(N, (batch_size,), generator=g)
        t = torch.randint(t_min, diff.T, (batch_size,), generator=g)
        eps = torch.randn((batch_size, *x0.shape[1:]), generator=g, dtype=x0.dtype)
        losses = head_train_step(diff, backbone, heads, x0[idx.to(dev)], optimizer=optimizer,
                                 t=t.to(dev), eps=eps.to(dev))
        if progress is not None:
            progress(losses)


# Bao et al. 2022b, SN-DPM: E[ε² | x_t] is the minimiser of E‖ε² − h(x_t)‖²
def sn_target(eps: Tensor) -> Tensor:
    """Regression target ε² [B,C,H,W] of the SN head."""
    return eps**2


# Bao et al. 2022b, NPR-DPM: E[(ε − ε̂(x_t))² | x_t] minimises E‖(ε − ε̂)² − h(x_t)‖²
def npr_target(eps: Tensor, eps_hat: Tensor) -> Tensor:
    """Regression target (ε − ε̂)² [B,C,H,W] of the NPR head, ε̂ detached."""
    return (eps - eps_hat.detach()) ** 2


def head_target(kind: str, eps: Tensor, eps_hat: Tensor) -> Tensor:
    """The target [B,C,H,W] of an SN or NPR head."""
    _check_kind(kind)
    return sn_target(eps) if kind == "sn" else npr_target(eps, eps_hat)


# Bao et al. 2022b, code (criterions dt_dsdm, dt_dsdm_err): the squared error of the head
def head_loss(kind: str, h: Tensor, eps: Tensor, eps_hat: Tensor) -> Tensor:
    """Per-example loss [B]: mean over pixels of (target − h)² (their sum over pixels / d)."""
    assert h.shape == eps.shape == eps_hat.shape, f"h {tuple(h.shape)} vs ε {tuple(eps.shape)}"
    return mean_flat((head_target(kind, eps, eps_hat) - h) ** 2)


def head_train_step(diff: Diffusion, backbone: Backbone, heads: Mapping[str, nn.Module],
                    x0: Tensor, *, optimizer: torch.optim.Optimizer, t: Tensor, eps: Tensor
                    ) -> dict[str, Tensor]:
    """One optimizer step of the heads {kind: head} on x_t = q_sample(x0 [B,C,H,W], t, ε).

    One backbone call serves every head: it is frozen (no gradient), so SN and NPR heads train
    together for the price of one, their losses summed (independent parameters: each gets its
    own loss's gradient; with Adam one optimizer is the same as one per head). Returns each
    head's loss [B], detached.
    """
    assert x0.ndim == 4 and eps.shape == x0.shape, f"x0 {tuple(x0.shape)}, ε {tuple(eps.shape)}"
    assert heads, "no head to train"
    x_t = q_sample(diff, x0, t, eps)
    out, features = backbone(x_t.to(x0.dtype), t)
    eps_hat = eps_from_output(diff, out.detach(), x_t, t)
    features = features.detach()
    losses = {kind: head_loss(kind, head(features).to(eps_hat.dtype), eps.to(eps_hat.dtype),
                              eps_hat) for kind, head in heads.items()}
    optimizer.zero_grad(set_to_none=True)
    sum(loss.mean() for loss in losses.values()).backward()
    optimizer.step()
    return {kind: loss.detach() for kind, loss in losses.items()}


def _ratio(diff: Diffusion, t: Tensor, like: Tensor) -> Tensor:
    # (1 − ᾱ_t)/ᾱ_t: Cov[x_0|x_t] = (1−ᾱ_t)/ᾱ_t · Cov[ε|x_t] since x_0 = (x_t − √(1−ᾱ_t) ε)/√ᾱ_t
    return extract(1.0 / diff.alpha_bar - 1.0, t, like.shape, like.dtype)


def _clamp(cov: Tensor, clip: bool) -> Tensor:
    return cov.clamp(0.0, 1.0) if clip else cov


# Bao et al. 2022b, SN-DPM: Cov[x_0|x_t] = (1−ᾱ_t)/ᾱ_t (E[ε²|x_t] − E[ε|x_t]²)
def sn_cov_x0(diff: Diffusion, t: Tensor, h: Tensor, eps_hat: Tensor, *, clip: bool) -> Tensor:
    """Cov[x_0 | x_t] [B,C,H,W] of the SN head h ≈ E[ε²|x_t]; clamped to [0, 1] if clip."""
    assert h.shape == eps_hat.shape, f"h {tuple(h.shape)} vs ε̂ {tuple(eps_hat.shape)}"
    return _clamp(_ratio(diff, t, h) * (h - eps_hat**2), clip)


# Bao et al. 2022b, NPR-DPM: Cov[x_0|x_t] corrected for ε̂: (1−ᾱ_t)/ᾱ_t E[(ε − ε̂)²|x_t]
def npr_cov_x0(diff: Diffusion, t: Tensor, h: Tensor, *, clip: bool) -> Tensor:
    """Cov[x_0 | x_t] [B,C,H,W] of the NPR head h ≈ E[(ε − ε̂)²|x_t]; clamped if clip."""
    return _clamp(_ratio(diff, t, h) * h, clip)


# Bao et al. 2022b, code (DTDPM._predict_cov_x0, typ "eps"): E[ε²|x_t] ≈ 1, no head
def heuristic_cov_x0(diff: Diffusion, t: Tensor, eps_hat: Tensor, *, clip: bool) -> Tensor:
    """Their backbone-only Cov[x_0 | x_t] ≈ (1−ᾱ_t)/ᾱ_t (1 − ε̂²) [B,C,H,W]; clamped if clip."""
    return _clamp(_ratio(diff, t, eps_hat) * (1.0 - eps_hat**2), clip)


def cov_x0(diff: Diffusion, t: Tensor, h: Tensor, eps_hat: Tensor, *, kind: str,
           clip: bool) -> Tensor:
    """Cov[x_0 | x_t] [B,C,H,W] of an SN or NPR head (diff: any chain; t: its own index)."""
    _check_kind(kind)
    if kind == "sn":
        return sn_cov_x0(diff, t, h, eps_hat, clip=clip)
    return npr_cov_x0(diff, t, h, clip=clip)


# Bao et al. 2022b (DDPM, λ² = β̃): σ²_{s|t} = β̃_{s|t} + ᾱ_s β_{t|s}²/(1−ᾱ_t)² Cov[x_0|x_t]
def ddpm_sigma2(chain: Diffusion, k: Tensor, cov: Tensor) -> Tensor:
    """σ² [B,C,H,W] of the step τ_k -> τ_{k−1} of `chain` (chains.chain_of) per pixel.

    Where k == 0 (the decoder p(x_0 | x_{τ_0}); sampling adds no noise there) it is the chain's
    decoder_variance, as for Analytic-DPM (analytic.analytic_sigma2): the bound passes the full
    chain's (chains.respace(...).with_decoder_variance(diff.decoder_variance)).
    """
    dt = cov.dtype
    coef = extract(chain.alpha_bar_prev * chain.betas**2 / (1.0 - chain.alpha_bar) ** 2,
                   k, cov.shape, dt)
    sigma2 = extract(chain.beta_tilde, k, cov.shape, dt) + coef * cov
    first = (k == 0).reshape(-1, *([1] * (cov.ndim - 1)))
    return torch.where(first, torch.full_like(sigma2, chain.decoder_variance), sigma2)


# Bao et al. 2022b (DDIM, λ² = η² β̃): σ² = λ² + (√ᾱ_s − √((1−ᾱ_s−λ²) ᾱ_t/(1−ᾱ_t)))² Cov
def ddim_sigma2(chain: Diffusion, k: Tensor, cov: Tensor, *, eta: float) -> Tensor:
    """σ² [B,C,H,W] of the DDIM step τ_k -> τ_{k−1} per pixel; η = 0 still adds the head's noise.

    Index 0 (the deterministic last step) is unused, as in analytic.ddim_analytic_sigma2.
    """
    assert 0.0 <= eta <= 1.0, f"eta must lie in [0, 1], got {eta}"
    ab, ab_prev = chain.alpha_bar, chain.alpha_bar_prev
    lam2 = eta**2 * chain.beta_tilde
    rest = (1.0 - ab_prev - lam2).clamp(min=0.0)
    coef = (ab_prev.sqrt() - (rest * ab / (1.0 - ab)).sqrt()) ** 2
    dt = cov.dtype
    return extract(lam2, k, cov.shape, dt) + extract(coef, k, cov.shape, dt) * cov


# Ho et al. 2020, eq. (5) with a per-pixel σ²(x_t): KL(q(x_s|x_t,x_0) ‖ N(μ_θ(x_t), σ²(x_t)))
def head_vlb_terms(chain: Diffusion, out: Tensor, x0: Tensor, x_t: Tensor, k: Tensor, *,
                   sigma2: Tensor, clip_x0: bool) -> Tensor:
    """One bound term per example [B] in bits/dim with σ² [B,C,H,W]: decoder NLL where k == 0.

    likelihood.vlb_terms (the mean of the model's output, x̂_0 clipped if clip_x0) with a
    per-pixel variance instead of one per step.
    """
    assert sigma2.shape == x_t.shape, f"σ² {tuple(sigma2.shape)} vs x_t {tuple(x_t.shape)}"
    return vlb_terms(chain, out, x0, x_t, k, clip_x0=clip_x0, log_sigma2=torch.log(sigma2))
