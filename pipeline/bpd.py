"""Stage `bpd@<variant>`: the variational bound (bits/dim) on the test split, for the full chain
and the K-step chains of bpd.steps (even trajectory, Analytic-DPM Table 1).

For every σ² choice in bpd.variances (fixed_large, fixed_small, analytic with Γ from gamma@<v>,
npr and sn with the heads of nnhead@<v>; a model without heads leaves those out, one line)
one pass of network calls serves every σ² and every K (the engine's ddpm_core.api.bound, which
`ddpm bpd` calls too: the noise of test image i at step τ comes from (bpd.seed, i, τ), so both
give the same numbers whatever the batch sizes or processes). A learned-variance model is
evaluated with its own σ², full chain only (its σ² is trained for the T-step chain; there is
no K < T version of it). Writes metrics/bpd/<v>.json (bpd_<sigma2> for K = T,
bpd_<sigma2>_K<k> for every K including T; keys from pipeline.records.bpd_key), bpd/<v>.csv
(the full chain's mean per-term breakdown, one row per term L_T, L_{T-1}, ..., L_0, one column
per σ²), plots/bpd_steps/<v>.csv (K, one column per σ²) and timings/bpd/<v>.json.
Units, kills and `--shard i/N`: as in pipeline/sample.py.
"""

from __future__ import annotations

import time

import pandas as pd

from ddpm_core.api import bound
from ddpm_core.data import load_images
from ddpm_core.diffusion import LEARNED_VAR_TYPES
from ddpm_core.distributed import cleanup
from ddpm_core.inference import inference_model
from ddpm_core.modes import SIGMA2_MODES
from ddpm_core.units import Shard
from pipeline.common import (
    finish_units,
    run_stage,
    start_processes,
    unit_store,
    variant_heads,
    variant_model,
    write_json,
    write_text,
)
from pipeline.params import Params, VariantConfig, head_kinds_in
from pipeline.records import DATA_DIR, VariantPaths, bpd_key, read_gamma, variant_metrics


def main(params: Params, v: VariantConfig, shard: Shard | None = None) -> None:
    b = params.bpd
    info = start_processes("pipeline.bpd", b.nproc, b.nnodes)
    paths = VariantPaths(v.name)
    images = load_images(DATA_DIR / "test.npy")[:b.num_images]
    m = variant_model(v.name, b.use_ema)
    learned = m.diffusion.var_type in LEARNED_VAR_TYPES
    var_types = [m.diffusion.var_type] if learned else list(b.variances)
    n, T = len(images), m.diffusion.T
    Ks = [T] if learned else sorted(set(b.steps) | {T})
    gamma = read_gamma(paths, T) if "analytic" in var_types else None
    heads = None
    if kinds := head_kinds_in(tuple(var_types)):
        heads, why = variant_heads(v.name)
        if why is not None:
            if info.is_main:
                print(f"bpd[{v.name}]: σ² {', '.join(kinds)} left out: {why}", flush=True)
            var_types = [vt for vt in var_types if vt not in kinds]
    net = inference_model(m.net.to(info.device), b.precision, compile=b.compile)
    t0 = time.perf_counter()
    units = unit_store(shard)
    res = bound(net, m.diffusion, images, sigma2=var_types, steps=Ks, gamma=gamma, heads=heads,
                seed=b.seed, batch_size=b.batch_size, t_batch=b.t_batch, net_batch=b.net_batch,
                device=info.device, units=units, progress=info.is_main)
    seconds = time.perf_counter() - t0
    if info.is_main and shard is None:  # a shard leaves its units and writes no output
        # the mean over images of the per-image bounds, as `ddpm bpd` prints it
        totals = {K: {vt: round(float(res[K][vt].total.numpy().mean()), 5) for vt in var_types}
                  for K in Ks}
        metrics = {bpd_key(vt): totals[T][vt] for vt in var_types}
        metrics.update({bpd_key(vt, K): totals[K][vt] for K in Ks for vt in var_types})
        # rows: L_T (prior), then L_{t-1} evaluated at step t = T..1 (terms index t-1)
        terms = pd.DataFrame({"term": ["L_T"] + [f"L_{i}" for i in range(T - 1, -1, -1)],
                              "t": [None, *range(T, 0, -1)]}).astype({"t": "Int64"})
        for vt in var_types:
            r = res[T][vt]
            terms[SIGMA2_MODES[vt].key] = [float(r.prior.mean())] + r.terms.mean(0).flip(0).tolist()
        write_text(terms.to_csv(index=False, float_format="%.8g"), paths.bpd_terms)
        steps = pd.DataFrame({"K": Ks, **{SIGMA2_MODES[vt].key: [totals[K][vt] for K in Ks]
                                          for vt in var_types}})
        write_text(steps.to_csv(index=False, float_format="%.6g"), paths.bpd_steps)
        write_json(variant_metrics(v.name, metrics), paths.bpd_metrics)
        write_json({"seconds": round(seconds, 2), "images": n,
                    "images_per_s": round(n / seconds, 3)}, paths.timings("bpd"))
        print(f"bpd[{v.name}]: " + ", ".join(f"{k} {x:.4f}" for k, x in metrics.items())
              + f" on {n} test images in {seconds:.1f} s", flush=True)
    finish_units(units, info.is_main, f"bpd[{v.name}]")
    cleanup()


if __name__ == "__main__":
    run_stage(main, per_variant=True, shards=True)
