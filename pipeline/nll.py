"""Stage `nll@<variant>`: the exact bits/dim of the model by its probability-flow ODE (Song et al.
2021, uniform dequantization, Hutchinson divergence) on the first nll.num_images test images,
through the one engine call ddpm_core.api.nll (the `ddpm nll` command calls it too).

Image i of the test split has index i: its dequantization noise and probes come from
(nll.seed, i). Images of one batch of nll.batch_size share one adaptive solve and its steps, so
the number depends on nll.batch_size within the tolerance; fixed params give the same number.
The ODE uses the mean's ε only: learned-variance models work, x_0-predicting ones give the ε
derived; a μ-predicting model has no continuous-time ε, so its file holds no numbers (one line
says so). Writes metrics/nll/<v>.json ({<v>: {nll_ode_bpd, nll_ode_bpd_se, nll_nfe_mean}},
keys from pipeline.records) and timings/nll/<v>.json.
"""

from __future__ import annotations

import math
import time

from ddpm_core.api import nll
from ddpm_core.data import load_images
from pipeline.common import device, run_stage, variant_model, write_json
from pipeline.params import Params, VariantConfig
from pipeline.records import (
    DATA_DIR,
    NLL_NFE_MEAN,
    NLL_ODE_BPD,
    NLL_ODE_BPD_SE,
    VariantPaths,
    variant_metrics,
)


def main(params: Params, v: VariantConfig) -> None:
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
    res = nll(m.net, m.diffusion, images, rtol=c.rtol, atol=c.atol, repeats=c.repeats,
              batch_size=c.batch_size, seed=c.seed, device=device(), progress=True)
    seconds = time.perf_counter() - t0
    se = res.standard_error  # NaN for one image: left out (JSON has no NaN)
    metrics = {NLL_ODE_BPD: round(res.mean, 5),
               NLL_ODE_BPD_SE: round(se, 5) if math.isfinite(se) else None,
               NLL_NFE_MEAN: round(res.nfe_mean, 2)}
    write_json(variant_metrics(v.name, metrics), paths.nll_metrics)
    write_json({"seconds": round(seconds, 2), "images": n, "images_per_s": round(n / seconds, 3),
                "nfe_mean": metrics[NLL_NFE_MEAN]}, paths.timings("nll"))
    print(f"nll[{v.name}]: ODE bits/dim {res.mean:.5f} ± {res.standard_error:.5f} (standard "
          f"error), mean NFE {res.nfe_mean:.1f}, on {n} test images in {seconds:.1f} s",
          flush=True)


if __name__ == "__main__":
    run_stage(main, per_variant=True)
