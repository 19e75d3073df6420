"""Stage `bpd@<variant>`: the variational bound (bits/dim) on the test split, for the full chain
and the K-step chains of bpd.steps (even trajectory, Analytic-DPM Table 1).

For every σ² choice in bpd.variances (fixed_large, fixed_small, analytic with Γ from gamma@<v>)
one pass of network calls serves every σ² and every K (ddpm_core.likelihood
.bits_per_dim_at_steps). A learned-variance model is evaluated with its own σ², full chain only
(its σ² is trained for the T-step chain; there is no K < T version of it). Writes
metrics/bpd/<v>.json (bpd_<sigma2> for K = T, bpd_<sigma2>_K<k> for every K including T; keys
from pipeline.records.bpd_key), bpd/<v>.csv (the full chain's mean per-term breakdown, one row
per term L_T, L_{T-1}, ..., L_0, one column per σ²), plots/bpd_steps/<v>.csv (K, one column per
σ²) and timings/bpd/<v>.json.
"""

from __future__ import annotations

import math
import time

import torch

from ddpm_core.data import load_images, to_model_tensor, to_unit
from ddpm_core.diffusion import LEARNED_VAR_TYPES
from ddpm_core.distributed import cleanup, map_shards
from ddpm_core.inference import inference_model
from ddpm_core.likelihood import bits_per_dim_at_steps
from ddpm_core.modelfile import LoadedModel
from ddpm_core.modes import SIGMA2_MODES
from ddpm_core.progress import Progress, counting
from pipeline.common import (
    StageError,
    run_stage,
    start_processes,
    variant_model,
    write_json,
    write_text,
)
from pipeline.gamma import read_gamma
from pipeline.params import Params, VariantConfig
from pipeline.records import DATA_DIR, VariantPaths, bpd_key, variant_metrics


def per_image_bounds(params: Params, m: LoadedModel, net: torch.nn.Module, x_all: torch.Tensor,
                     var_types: list[str], dev: torch.device, Ks: list[int],
                     gamma: torch.Tensor | None = None) -> torch.Tensor:
    """[N, V, Σ_K (K + 1)] bits/dim per test image and σ² choice; for each K of Ks in order the
    prior term, then the K terms (chain index 0..K-1).

    Batch j (seeded by its first image) goes to one rank; the shares are gathered in order, so
    the numbers do not depend on the number of processes."""
    b = params.bpd
    starts = list(range(0, len(x_all), b.batch_size))

    def run(batches: range) -> torch.Tensor:
        width = sum(K + 1 for K in Ks)
        rows = [torch.zeros(0, len(var_types), width, dtype=torch.float64)]
        for j in batches:
            start = starts[j]
            x0 = to_unit(x_all[start:start + b.batch_size]).to(dev)
            gen = torch.Generator(dev).manual_seed(start)
            res = bits_per_dim_at_steps(m.diffusion, net, x0, Ks, var_types=var_types,
                                        gamma=gamma, t_batch=b.t_batch, generator=gen)
            rows.append(torch.stack([torch.cat([torch.cat([res[K][v].prior[:, None],
                                                           res[K][v].terms], dim=1)
                                                for K in Ks], dim=1)
                                     for v in var_types], dim=1))
        return torch.cat(rows).to(dev)

    return map_shards(run, len(starts)).cpu()


def main(params: Params, v: VariantConfig) -> None:
    b = params.bpd
    info = start_processes("pipeline.bpd", b.nproc)
    dev = info.device
    paths = VariantPaths(v.name)
    x_all = to_model_tensor(load_images(DATA_DIR / "test.npy"))
    if b.num_images is not None:
        x_all = x_all[:b.num_images]
    m = variant_model(v.name, b.use_ema)
    learned = m.diffusion.var_type in LEARNED_VAR_TYPES
    var_types = [m.diffusion.var_type] if learned else list(b.variances)
    n, T = len(x_all), m.diffusion.T
    too_long = [K for K in b.steps if K > T]
    if too_long:
        raise StageError(f"bpd.steps: {too_long} exceed the model's T={T}; give K <= T")
    Ks = [T] if learned else sorted(set(b.steps) | {T})
    gamma = None if learned or "analytic" not in var_types else read_gamma(paths, T)
    batches = -(-n // b.batch_size)
    calls = -(-batches // info.world_size) * math.ceil(T / b.t_batch)
    with Progress(calls, f"bpd[{v.name}]", "calls", enabled=info.is_main) as bar:
        net = counting(inference_model(m.net.to(dev), b.precision, compile=b.compile), bar)
        t0 = time.perf_counter()
        bounds = per_image_bounds(params, m, net, x_all, var_types, dev, Ks, gamma)
        seconds = time.perf_counter() - t0
    if info.is_main:
        means, offset = {}, 0
        for K in Ks:  # [V, K + 1] per K
            means[K] = bounds[:, :, offset:offset + K + 1].mean(dim=0)
            offset += K + 1
        totals = {K: {vt: round(float(means[K][i].sum()), 5) for i, vt in enumerate(var_types)}
                  for K in Ks}
        metrics = {bpd_key(vt): totals[T][vt] for vt in var_types}
        metrics.update({bpd_key(vt, K): totals[K][vt] for K in Ks for vt in var_types})
        mean = means[T]
        # rows: L_T (prior), then L_{t-1} evaluated at step t = T..1 (terms index t-1)
        columns = {vt: [float(mean[i, 0])] + [float(x) for x in mean[i, 1:].flip(0)]
                   for i, vt in enumerate(var_types)}
        lines = ["term,t," + ",".join(SIGMA2_MODES[vt].key for vt in columns)]
        names = ["L_T"] + [f"L_{i}" for i in range(T - 1, -1, -1)]
        steps = [""] + list(range(T, 0, -1))  # L_T has no step: it is the prior at x_T
        for i, (name, t) in enumerate(zip(names, steps, strict=True)):
            lines.append(f"{name},{t}," + ",".join(f"{columns[vt][i]:.8g}" for vt in columns))
        write_text("\n".join(lines) + "\n", paths.bpd_terms)
        steps_lines = ["K," + ",".join(SIGMA2_MODES[vt].key for vt in var_types)]
        steps_lines += [f"{K}," + ",".join(f"{totals[K][vt]:.6g}" for vt in var_types)
                        for K in Ks]
        write_text("\n".join(steps_lines) + "\n", paths.bpd_steps)
        write_json(variant_metrics(v.name, metrics), paths.bpd_metrics)
        write_json({"seconds": round(seconds, 2), "images": n,
                    "images_per_s": round(n / seconds, 3)}, paths.timings("bpd"))
        print(f"bpd[{v.name}]: " + ", ".join(f"{k} {x:.4f}" for k, x in metrics.items())
              + f" on {n} test images in {seconds:.1f} s", flush=True)
    cleanup()


if __name__ == "__main__":
    run_stage(main, per_variant=True)
