"""Stage `bpd`: the full-chain variational bound (bits/dim) on the test split.

For every model and every σ² choice in bpd.variances (one pass of network calls serves all
fixed choices; a learned-variance model is evaluated with its own σ²). Writes
metrics/bpd.json (the totals, what `dvc exp show` compares) and bpd/<model>.csv: the mean
per-term breakdown, one row per term (L_T, L_{T-1}, ..., L_1, L_0), one column per σ² choice.
"""

from __future__ import annotations

import time

import torch

from ddpm_core.config import Params
from ddpm_core.data import load_images, to_model_tensor, to_unit
from ddpm_core.likelihood import bits_per_dim
from pipeline.common import (
    BPD_DIR,
    DATA_DIR,
    METRICS_DIR,
    SIGMA2_NAME,
    atomic_dir,
    check_model_names,
    device,
    load_models,
    run_stage,
    write_json,
)

LEARNED = ("learned", "learned_range")


def main(params: Params) -> None:
    b, dev = params.bpd, device()
    x_all = to_model_tensor(load_images(DATA_DIR / "test.npy"))
    if b.num_images is not None:
        x_all = x_all[:b.num_images]
    metrics = {}
    with atomic_dir(BPD_DIR) as tmp:
        for m in load_models(params, b.use_ema):
            var_types = [m.diff.var_type] if m.diff.var_type in LEARNED else list(b.variances)
            net = m.net.to(dev)
            sums: dict[str, dict[str, torch.Tensor]] = {}
            t0 = time.perf_counter()
            for start in range(0, len(x_all), b.batch_size):
                x0 = to_unit(x_all[start:start + b.batch_size]).to(dev)
                gen = torch.Generator(dev).manual_seed(start)
                res = bits_per_dim(m.diff, net, x0, var_types=var_types, t_batch=b.t_batch,
                                   generator=gen)
                for v, r in res.items():
                    acc = sums.setdefault(v, {"total": 0.0, "prior": 0.0, "terms": 0.0})
                    acc["total"] = acc["total"] + r.total.sum()
                    acc["prior"] = acc["prior"] + r.prior.sum()
                    acc["terms"] = acc["terms"] + r.terms.sum(dim=0)
            seconds = time.perf_counter() - t0
            n, T = len(x_all), m.diff.T
            metrics[m.name] = {}
            columns = {}
            for v, acc in sums.items():
                metrics[m.name][f"bpd_{SIGMA2_NAME[v]}"] = round(float(acc["total"]) / n, 5)
                columns[v] = [float(acc["prior"]) / n] + \
                    [float(x) / n for x in acc["terms"].flip(0)]
            # rows: L_T (prior), then L_{t-1} evaluated at step t = T..1 (terms index t-1)
            lines = ["term,t," + ",".join(SIGMA2_NAME[v] for v in columns)]
            names = ["L_T"] + [f"L_{i}" for i in range(T - 1, -1, -1)]
            steps = [""] + list(range(T, 0, -1))  # L_T has no step: it is the prior at x_T
            for i, (name, t) in enumerate(zip(names, steps, strict=True)):
                lines.append(f"{name},{t}," + ",".join(f"{columns[v][i]:.8g}" for v in columns))
            (tmp / f"{m.name}.csv").write_text("\n".join(lines) + "\n")
            print(f"bpd[{m.name}]: " + ", ".join(f"{k} {x:.4f}" for k, x in
                                                  metrics[m.name].items())
                  + f" on {n} test images in {seconds:.1f} s", flush=True)
    write_json(metrics, METRICS_DIR / "bpd.json")


if __name__ == "__main__":
    run_stage(main, check_model_names)
