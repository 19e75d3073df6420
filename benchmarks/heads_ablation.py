"""Ablation of the NPR/SN variance heads (Bao et al. 2022b) against Analytic-DPM on the bound:
bits/dim at K = 10/25/50/100 of the even trajectory, per head variant, through the engine
(ddpm_core.api.train_heads and api.bound), on the test images the bpd stage uses.

    python -m benchmarks.heads_ablation --model models/vlb.pt --gamma gamma/vlb.json \
        --train data/prepared/train.npy --test data/prepared/test.npy [--images 359] \
        [--variants npr,npr_avg,npr_x2,npr_s2000] [--per-step]

Variants (each a head the engine reads through api.bound's `heads`):
  npr, sn            train_heads with --steps (the nnhead stage's 400), t drawn from 1..T−1
  npr_s<N>           trained N steps instead (also sn_s<N>)
  npr_t0[_s<N>]      t drawn from 0..T−1, as in Bao et al.'s code (heads.fit_heads(t_min=0))
  npr_avg            Cov averaged over the pixels of each image (their code's avg_cov flag)
  npr_x<F>           h times F (F > 1: an over-estimate, F < 1: an under-estimate)
--per-step prints the mean bound term of analytic and npr − analytic at every step of the
shortest chain and per group of t of the longest (t = 0: the decoder, the same for both).
Two threads, 359 test images: about a minute per variant trained 400 steps.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from torch import Tensor, nn

from ddpm_core.api import bound, load_model, train_heads
from ddpm_core.data import load_images, to_unit
from ddpm_core.heads import VarianceHead, fit_heads, head_for, unet_backbone
from ddpm_core.modes import HEAD_KINDS

KS = (10, 25, 50, 100)


class _Mapped(nn.Module):
    """A trained head whose h goes through fn(h, t-free): keeps `.conv` for api.check_heads."""

    def __init__(self, head: VarianceHead, fn) -> None:
        super().__init__()
        self.head, self.fn, self.conv = head, fn, head.conv

    def forward(self, features: Tensor) -> Tensor:
        return self.fn(self.head(features))


def _avg(h: Tensor) -> Tensor:  # their avg_cov: Cov (a constant times h per image) averaged
    return h.mean(dim=(1, 2, 3), keepdim=True).expand_as(h)


def fit(net: nn.Module, diff, images: np.ndarray, *, steps: int, lr: float, seed: int,
        t_min: int | None) -> dict:
    """train_heads' heads (t_min None), or fit_heads' with t drawn from [t_min, T)."""
    if t_min is None:
        return train_heads(net, diff, images, steps=steps, lr=lr, seed=seed)
    heads = {kind: head_for(net) for kind in HEAD_KINDS}
    x0 = to_unit(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
    fit_heads(diff, unet_backbone(net), heads, x0, steps=steps, lr=lr, batch_size=128,
              seed=seed, t_min=t_min)
    return {kind: head.eval().requires_grad_(False) for kind, head in heads.items()}


def heads_of(variant: str, base: dict, train) -> nn.Module:
    """The head module of `variant` (module docstring)."""
    if variant in ("npr", "sn"):
        return base[variant]
    if variant == "npr_avg":
        return _Mapped(base["npr"], _avg)
    if variant.startswith("npr_x"):
        f = float(variant[5:])
        return _Mapped(base["npr"], lambda h: f * h)
    kind, *opts = variant.split("_")
    o = {x[0]: int(x[1:]) for x in opts}
    if kind not in HEAD_KINDS or not set(o) <= {"s", "t"}:
        raise SystemExit(f"error: --variants: unknown variant {variant!r}")
    return train(o.get("s"), o.get("t"))[kind]


def per_step(ref: dict, T: int, Ks: list[int]) -> None:
    """Mean bound term (bits/dim) of analytic and npr − analytic: every step of the shortest
    chain, and groups of t of the full one (t = 0: the decoder)."""
    for K in sorted({min(Ks), max(Ks)}):
        d = (ref[K]["npr"].terms - ref[K]["analytic"].terms).mean(0).numpy()
        an = ref[K]["analytic"].terms.mean(0).numpy()
        taus = ref[K]["analytic"].timesteps
        edges = [0, 1, 2, 3, 5, 10, 20, 40, 70, T] if K == T else list(range(K + 1))
        print(f"# K = {K}: mean term per step (group of chain positions k; t = tau_k)")
        print(f"{'t':<10}{'analytic':>10}{'npr-ana':>10}")
        for lo, hi in zip(edges, edges[1:], strict=False):
            name = f"{taus[lo]}" if hi == lo + 1 else f"{taus[lo]}..{taus[hi - 1]}"
            print(f"{name:<10}{an[lo:hi].sum():10.4f}{d[lo:hi].sum():+10.4f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--gamma", required=True, help="gamma/<v>.json of the gamma stage")
    p.add_argument("--train", required=True)
    p.add_argument("--test", required=True)
    p.add_argument("--images", type=int, default=None, help="first N test images (all)")
    p.add_argument("--steps", type=int, default=400, help="head training steps (nnhead.steps)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", default="npr,sn,npr_avg,npr_x2,npr_x0.5")
    p.add_argument("--ks", default=",".join(map(str, KS)))
    p.add_argument("--per-step", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    net, diff = load_model(a.model)
    gamma = torch.tensor(json.load(open(a.gamma))["gamma"], dtype=torch.float64)
    train_images, test = load_images(a.train), load_images(a.test)[:a.images]
    Ks = [int(k) for k in a.ks.split(",")]

    def train(steps: int | None, t_min: int | None = None) -> dict:
        t0, steps = time.perf_counter(), a.steps if steps is None else steps
        h = fit(net, diff, train_images, steps=steps, lr=a.lr, seed=a.seed, t_min=t_min)
        print(f"# trained heads: {steps} steps, t >= {1 if t_min is None else t_min}, in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
        return h

    base = train(None)
    variants = a.variants.split(",")
    rows: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    ref = bound(net, diff, test, sigma2=["analytic", "npr"], steps=Ks, gamma=gamma, heads=base,
                batch_size=len(test), t_batch=4)
    rows["analytic"] = [float(ref[K]["analytic"].total.mean()) for K in Ks]
    print(f"# bound of analytic, npr: {time.perf_counter() - t0:.1f} s", flush=True)
    for v in variants:
        if v == "npr":
            rows[v] = [float(ref[K]["npr"].total.mean()) for K in Ks]
            continue
        kind = "sn" if v.startswith("sn") else "npr"
        res = bound(net, diff, test, sigma2=[kind], steps=Ks, gamma=gamma,
                    heads={kind: heads_of(v, base, train)}, batch_size=len(test), t_batch=4)
        rows[v] = [float(res[K][kind].total.mean()) for K in Ks]
    print(f"{'variant':<12}" + "".join(f"{'K=' + str(K):>9}" for K in Ks))
    for v, vals in rows.items():
        print(f"{v:<12}" + "".join(f"{x:9.3f}" for x in vals))
    print(f"{'npr - ana':<12}" + "".join(
        f"{x - y:+9.3f}" for x, y in zip(rows.get("npr", rows["analytic"]), rows["analytic"],
                                     strict=True)))
    if a.per_step:
        per_step(ref, diff.T, Ks)


if __name__ == "__main__":
    main()
