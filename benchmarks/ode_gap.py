"""Why the ODE bits/dim of the digits models lie above their variational bound (issue 19).

    python -m benchmarks.ode_gap [--models-dir models] [--images data/prepared/test.npy]
        [--names simple vlb] [--n 32] [--threads 1]

On the first n test images, per model: the DDPM bound (σ² = β, full chain, api.bound) and the
ODE bits/dim for each label convention × start time t_eps with uniform dequantization, and the
variational-dequantization ODE bound (the flow from t_first, where ᾱ(t) = ᾱ_0, plus the chain's
decoder; ode.first_step_log_likelihood_bound). Every row sees the same dequantization noise,
probes and x_1 (seeded per image as in ode.ode_bits_per_dim), so the column "− bound" is a
paired difference with its standard error over the images. Label conventions:
  matched   ContinuousSchedule.label: the fractional index whose discrete log-SNR is λ(t);
  t(T−1)    score_sde's 999·t, this project's label before the fix;
  tT−1      the grid t_i = (i + 1)/T read as index i, clamped at 0 below t = 1/T.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from pathlib import Path

import numpy as np
import torch

from ddpm_core import api
from ddpm_core.continuous import ContinuousSchedule, continuous_schedule
from ddpm_core.data import load_images, to_model_tensor
from ddpm_core.diffusion import Diffusion
from ddpm_core.ode import (
    RTOL,
    T_EPS,
    bpd_from_log_p,
    dequantize,
    first_step_log_likelihood_bound,
    first_step_noise,
    image_noise,
    ode_log_likelihood,
)

CONVENTIONS = ("matched", "t(T−1)", "tT−1")


@dataclasses.dataclass(frozen=True)
class OtherLabel(ContinuousSchedule):
    """The library's schedule with another label convention (for this comparison only)."""

    convention: str = "t(T−1)"

    def label(self, t: float) -> float:
        if self.convention == "t(T−1)":
            return t * (self.T - 1)
        return max(t * self.T - 1.0, 0.0)


def schedule(diff: Diffusion, convention: str) -> ContinuousSchedule:
    """The continuous schedule of diff with the label convention's label."""
    s = continuous_schedule(diff)
    if convention == "matched":
        return s
    fields = {f.name: getattr(s, f.name) for f in dataclasses.fields(ContinuousSchedule)}
    return OtherLabel(**fields, convention=convention)


def rows_for(name: str, path: Path, images: np.ndarray) -> list[dict]:
    """The table's rows of one model file on images [N, H, W, C] uint8."""
    net, diff = api.load_model(path)
    n = len(images)
    k = to_model_tensor(images)
    shape, D = tuple(k.shape[1:]), k[0].numel()
    noise = [image_noise(shape, 0, j, 1, "hutchinson") for j in range(n)]
    x = dequantize(k, torch.stack([u for u, _ in noise]))
    probes = torch.stack([p for _, p in noise], dim=1)
    eps = torch.stack([first_step_noise(shape, 0, j) for j in range(n)])
    x0 = k.double() / 127.5 - 1.0
    bound = api.bound(net, diff, images, sigma2=["fixed_large"], seed=0)[diff.T]
    b = bound["fixed_large"].total.numpy()
    t_first = continuous_schedule(diff).t_first()
    out = [dict(model=name, convention="—", deq="DDPM bound σ²=β", t_eps=math.nan,
                bpd=b.mean(), se=b.std(ddof=1) / math.sqrt(n), nfe=diff.T, diff=0.0, diff_se=0.0)]
    for conv in CONVENTIONS:
        s = schedule(diff, conv)
        for t_eps in (T_EPS, 1e-3, 1.0 / diff.T, t_first, None):
            t0 = time.perf_counter()
            with torch.no_grad():
                if t_eps is None:
                    r = first_step_log_likelihood_bound(diff, net, x0, eps, probes, RTOL, RTOL, s)
                    bpd = (-r.log_p[:, 0] / (D * math.log(2.0))).numpy()
                else:
                    r = ode_log_likelihood(diff, net, x, probes, t_eps, RTOL, RTOL, s)
                    bpd = bpd_from_log_p(r.log_p[:, 0], D).numpy()
            d = bpd - b
            out.append(dict(model=name, convention=conv,
                            deq="uniform" if t_eps is not None else "variational (1st step)",
                            t_eps=t_first if t_eps is None else t_eps, bpd=bpd.mean(),
                            se=bpd.std(ddof=1) / math.sqrt(n), nfe=r.nfe, diff=d.mean(),
                            diff_se=d.std(ddof=1) / math.sqrt(n),
                            seconds=time.perf_counter() - t0))
            print(f"  {name} {conv} {out[-1]['deq']} t_eps={out[-1]['t_eps']:.2e}: "
                  f"{bpd.mean():.4f} ({out[-1]['seconds']:.0f} s)", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models-dir", type=Path, default=Path("models"))
    ap.add_argument("--images", type=Path, default=Path("data/prepared/test.npy"))
    ap.add_argument("--names", nargs="+", default=["simple", "vlb"])
    ap.add_argument("--n", type=int, default=32, help="first n test images")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    images = load_images(a.images)[:a.n]
    rows = [r for name in a.names for r in rows_for(name, a.models_dir / f"{name}.pt", images)]
    print(f"\n{len(images)} test images, rtol = atol = {RTOL}, Hutchinson (1 probe), paired noise")
    print("| model | label | dequantization | t_eps | bits/dim | SE | NFE | − bound (paired) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        t_eps = "" if math.isnan(r["t_eps"]) else f"{r['t_eps']:.2e}"
        diff = "" if r["convention"] == "—" else f"{r['diff']:+.3f} ± {r['diff_se']:.3f}"
        print(f"| {r['model']} | {r['convention']} | {r['deq']} | {t_eps} | {r['bpd']:.3f} | "
              f"{r['se']:.3f} | {r['nfe']} | {diff} |")


if __name__ == "__main__":
    main()
