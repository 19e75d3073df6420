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
from ddpm_core.diffusion import LEARNED_VAR_TYPES
from ddpm_core.distributed import cleanup, init_distributed, map_shards
from ddpm_core.inference import inference_model
from ddpm_core.likelihood import bits_per_dim
from pipeline.common import (
    BPD_DIR,
    DATA_DIR,
    METRICS_DIR,
    SIGMA2_NAME,
    LoadedModel,
    atomic_dir,
    check_model_names,
    device,
    load_models,
    relaunch_under_torchrun,
    run_stage,
    scratch_dir,
    write_json,
)


def per_image_bounds(params: Params, m: LoadedModel, net: torch.nn.Module, x_all: torch.Tensor,
                     var_types: list[str], dev: torch.device) -> torch.Tensor:
    """[N, V, T + 1] bits/dim per test image and σ² choice: L_T, then terms index 0..T-1.

    Batch j (seeded by its first image) goes to one rank; the shares are gathered in order, so
    the numbers do not depend on the number of processes."""
    b = params.bpd
    starts = list(range(0, len(x_all), b.batch_size))

    def run(batches: range) -> torch.Tensor:
        rows = [torch.zeros(0, len(var_types), m.diff.T + 1, dtype=torch.float64)]
        for j in batches:
            start = starts[j]
            x0 = to_unit(x_all[start:start + b.batch_size]).to(dev)
            gen = torch.Generator(dev).manual_seed(start)
            res = bits_per_dim(m.diff, net, x0, var_types=var_types, t_batch=b.t_batch,
                               generator=gen)
            rows.append(torch.stack([torch.cat([res[v].prior[:, None], res[v].terms], dim=1)
                                     for v in var_types], dim=1))
        return torch.cat(rows).to(dev)

    return map_shards(run, len(starts)).cpu()


def main(params: Params) -> None:
    b = params.bpd
    relaunch_under_torchrun("pipeline.bpd", b.nproc)
    info = init_distributed(device())
    dev = info.device
    x_all = to_model_tensor(load_images(DATA_DIR / "test.npy"))
    if b.num_images is not None:
        x_all = x_all[:b.num_images]
    metrics = {}
    out = atomic_dir(BPD_DIR) if info.is_main else scratch_dir()
    with out as tmp:
        for m in load_models(params, b.use_ema):
            learned = m.diff.var_type in LEARNED_VAR_TYPES
            var_types = [m.diff.var_type] if learned else list(b.variances)
            net = inference_model(m.net.to(dev), b.precision, compile=b.compile)
            t0 = time.perf_counter()
            bounds = per_image_bounds(params, m, net, x_all, var_types, dev)
            seconds = time.perf_counter() - t0
            n, T = len(x_all), m.diff.T
            mean = bounds.mean(dim=0)  # [V, T + 1]
            metrics[m.name] = {f"bpd_{SIGMA2_NAME[v]}": round(float(mean[i].sum()), 5)
                               for i, v in enumerate(var_types)}
            # rows: L_T (prior), then L_{t-1} evaluated at step t = T..1 (terms index t-1)
            columns = {v: [float(mean[i, 0])] + [float(x) for x in mean[i, 1:].flip(0)]
                       for i, v in enumerate(var_types)}
            lines = ["term,t," + ",".join(SIGMA2_NAME[v] for v in columns)]
            names = ["L_T"] + [f"L_{i}" for i in range(T - 1, -1, -1)]
            steps = [""] + list(range(T, 0, -1))  # L_T has no step: it is the prior at x_T
            for i, (name, t) in enumerate(zip(names, steps, strict=True)):
                lines.append(f"{name},{t}," + ",".join(f"{columns[v][i]:.8g}" for v in columns))
            (tmp / f"{m.name}.csv").write_text("\n".join(lines) + "\n")
            if info.is_main:
                print(f"bpd[{m.name}]: " + ", ".join(f"{k} {x:.4f}" for k, x in
                                                      metrics[m.name].items())
                      + f" on {n} test images in {seconds:.1f} s", flush=True)
    if info.is_main:
        write_json(metrics, METRICS_DIR / "bpd.json")
    cleanup()


if __name__ == "__main__":
    run_stage(main, check_model_names)
