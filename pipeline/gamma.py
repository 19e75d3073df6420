"""Stage `gamma@<variant>`: Γ_t = E‖ε̂(x_t, t)‖²/d of the analytic σ² (Analytic-DPM, Bao et al.
2022, Thm. 1), estimated once per model by Monte Carlo on the first gamma.num_images training
images (ddpm_core.api.estimate_gamma; the draw of image m at step τ comes from
(seed, m, τ)) and read by sample@<v> and bpd@<v>.

Writes gamma/<v>.json: {"T", "num_images", "seed", "gamma": [Γ_0, ..., Γ_{T-1}]}. A model with a
learned σ² has its own variance: its file holds `"gamma": null` (no network call).
Units (blocks of gamma.batch_size images), kills and `--shard i/N`: as in pipeline/sample.py.
"""

from __future__ import annotations

import time

from ddpm_core.api import estimate_gamma
from ddpm_core.data import load_images
from ddpm_core.diffusion import LEARNED_VAR_TYPES
from ddpm_core.units import Shard
from pipeline.common import device, finish_units, run_stage, unit_store, variant_model, write_json
from pipeline.params import Params, VariantConfig
from pipeline.records import DATA_DIR, VariantPaths


def main(params: Params, v: VariantConfig, shard: Shard | None = None) -> None:
    g = params.gamma
    paths = VariantPaths(v.name)
    m = variant_model(v.name, g.use_ema)
    T = m.diffusion.T
    out = {"T": T, "num_images": None, "seed": g.seed, "gamma": None}
    units = unit_store(shard)
    if m.diffusion.var_type not in LEARNED_VAR_TYPES:
        dev = device()
        images = load_images(DATA_DIR / "train.npy")
        M = min(g.num_images, len(images))
        t0 = time.perf_counter()
        gamma = estimate_gamma(m.net.to(dev), m.diffusion, images, M=M, seed=g.seed,
                               batch_size=g.batch_size, device=dev, units=units)
        seconds = time.perf_counter() - t0
        out.update(num_images=M, gamma=[float(x) for x in gamma.cpu()])
        if shard is None:
            print(f"gamma[{v.name}]: Γ from {M} training images in {seconds:.1f} s "
                  f"(Γ_0 {out['gamma'][0]:.4f}, Γ_T-1 {out['gamma'][-1]:.4f})", flush=True)
    if shard is None:  # a shard leaves its units in the scratch area and writes no output
        write_json(out, paths.gamma)
    finish_units(units, True, f"gamma[{v.name}]")

if __name__ == "__main__":
    run_stage(main, per_variant=True, shards=True)
