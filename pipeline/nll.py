"""Stage `nll@<variant>`: the exact bits/dim of the model by its probability-flow ODE (Song et al.
2021, Hutchinson divergence) on the first nll.num_images test images, for each of
nll.dequantization (uniform: Song et al.'s; variational: through the chain's first step and its
decoder, on the DDPM bound's footing), through the one engine call ddpm_core.api.nll (the
`ddpm nll` command calls it too).

Image i of the test split has index i: its dequantization noise and probes come from
(nll.seed, i). Images of one batch of nll.batch_size share one adaptive solve and its steps, so
the number depends on nll.batch_size within the tolerance; fixed params give the same number.
The ODE uses the mean's ε only: learned-variance models work, x_0-predicting ones give the ε
derived; a μ-predicting model has no continuous-time ε, so its file holds no numbers (one line
says so). Writes metrics/nll/<v>.json ({<v>: {nll_ode_bpd, nll_ode_bpd_se, nll_nfe_mean, and the
variational ones}}, keys from pipeline.records.NLL_KEYS) and timings/nll/<v>.json.
Units (the solves' batches), kills and `--shard i/N`: as in pipeline/sample.py.
"""

from __future__ import annotations

import math
import time

from ddpm_core.api import nll
from ddpm_core.data import load_images
from ddpm_core.units import Shard
from pipeline.common import device, finish_units, run_stage, unit_store, variant_model, write_json
from pipeline.params import Params, VariantConfig
from pipeline.records import DATA_DIR, NLL_KEYS, VariantPaths, variant_metrics


def main(params: Params, v: VariantConfig, shard: Shard | None = None) -> None:
    c = params.nll
    paths = VariantPaths(v.name)
    m = variant_model(v.name, c.use_ema)
    images = load_images(DATA_DIR / "test.npy")[:c.num_images]  # None: the whole split
    n = len(images)
    if m.diffusion.mean_type == "mu":
        print(f"nll[{v.name}]: skipped: a μ-predicting model has no continuous-time ε, so no "
              "probability-flow ODE (use mean_type eps or x0)", flush=True)
        write_json(variant_metrics(v.name, {}), paths.nll_metrics)
        write_json({"seconds": 0.0, "images": 0, "skipped": "mean_type mu"},
                   paths.timings("nll"))
        return
    t0 = time.perf_counter()
    metrics, nfe = {}, {}
    units = unit_store(shard)
    for deq in c.dequantization:
        res = nll(m.net, m.diffusion, images, rtol=c.rtol, atol=c.atol, repeats=c.repeats,
                  batch_size=c.batch_size, seed=c.seed, dequantization=deq, device=device(),
                  units=units, progress=True)
        if shard is not None:
            continue
        se = res.standard_error  # NaN for one image: left out (JSON has no NaN)
        bpd_key, se_key, nfe_key = NLL_KEYS[deq]
        metrics |= {bpd_key: round(res.mean, 5),
                    se_key: round(se, 5) if math.isfinite(se) else None,
                    nfe_key: round(res.nfe_mean, 2)}
        nfe[deq] = metrics[nfe_key]
        print(f"nll[{v.name}]: ODE bits/dim ({deq} dequantization) {res.mean:.5f} ± {se:.5f} "
              f"(standard error), mean NFE {res.nfe_mean:.1f}, on {n} test images", flush=True)
    seconds = time.perf_counter() - t0
    if shard is None:  # a shard leaves its units in the scratch area and writes no output
        write_json(variant_metrics(v.name, metrics), paths.nll_metrics)
        write_json({"seconds": round(seconds, 2), "images": n,
                    "images_per_s": round(n / seconds, 3), "nfe_mean": nfe},
                   paths.timings("nll"))
    finish_units(units, True, f"nll[{v.name}]")


if __name__ == "__main__":
    run_stage(main, per_variant=True, shards=True)
