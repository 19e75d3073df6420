"""Stage `sample@<variant>`: N samples per sampler as uint8 arrays plus a PNG grid.

Samplers: pipeline.records.sampler_specs for the variant's model file models/<v>.pt (ancestral_<σ²>
on all T steps, respaced_<σ²>_S<S> (improved DDPM, Sec. 4), ddim_S<S> and ddim_analytic_S<S>
(Analytic-DDIM, Bao et al. 2022), ddim_npr_S<S> and ddim_sn_S<S> (NPR-/SN-DDIM, Bao et al.
2022b: the heads' noise even at η = 0, with the heads of nnhead@<v>, at sample.head_steps);
which σ², which steps and which chains cap σ: its docstring).
Image i of every sampler starts from the same x_T, drawn from (sample.seed, i) by the engine
(ddpm_core.api.sample), so grids are comparable row by row.
Writes samples/<v>/<sampler>.npy (uint8 [N, H, W, C]), samples/<v>/index.json (the specs, with
last_sigma_cap_y and last_sigma_cap, plus num_samples, start_index, prior_kl_bpd),
grids/<v>/<sampler>.png (image plots) and timings/sample/<v>.json.

The engine works in units (ddpm_core.units: one batch each) kept in the scratch area
(common.unit_store) until the outputs are written: a rerun after a kill computes only the
missing units. `python -m pipeline.sample <v> --shard i/N` computes only shard i's units and
writes no output; the stage run afterwards (dvc repro) assembles them.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ddpm_core.api import calls_per_step, sample
from ddpm_core.chains import timestep_spacing
from ddpm_core.data import save_grid
from ddpm_core.diffusion import LEARNED_VAR_TYPES
from ddpm_core.distributed import cleanup
from ddpm_core.inference import inference_model
from ddpm_core.modes import DEFAULT_SPACING, HEAD_KINDS
from ddpm_core.progress import Progress
from ddpm_core.samplers import prior_kl_at
from ddpm_core.units import Shard
from pipeline.common import (
    atomic_dir,
    check_sample_memory,
    finish_units,
    run_stage,
    scratch_dir,
    start_processes,
    unit_store,
    variant_heads,
    variant_model,
    write_json,
)
from pipeline.params import Params, VariantConfig, head_kinds_in
from pipeline.records import SamplerSpec, VariantPaths, read_gamma, sampler_specs


def engine_args(spec: SamplerSpec) -> dict:
    """api.sample's sampler settings of one sample set."""
    if spec.kind == "ddim":
        heads = spec.variance in HEAD_KINDS  # NPR-/SN-DDIM: sampler ddim with the head's σ²
        return {"sampler": "ddim" if spec.variance is None or heads else "ddim_analytic",
                "steps": spec.steps, "spacing": spec.spacing, "eta": spec.eta or 0.0,
                **({"sigma2": spec.variance} if heads else {})}
    return {"sampler": "ancestral", "sigma2": spec.variance,
            "spacing": spec.spacing or DEFAULT_SPACING,
            "steps": None if spec.kind == "ancestral" else spec.steps}


def main(params: Params, v: VariantConfig, shard: Shard | None = None) -> None:
    s = params.sample
    info = start_processes("pipeline.sample", s.nproc, s.nnodes)
    dev = info.device
    paths = VariantPaths(v.name)
    m = variant_model(v.name, s.use_ema)
    check_sample_memory(s.num_samples, m.spec.image_shape_chw)
    heads, why = variant_heads(v.name) if head_kinds_in(s.variances) and (
        m.diffusion.var_type not in LEARNED_VAR_TYPES) else (None, None)
    if why is not None and info.is_main:
        print(f"sample[{v.name}]: σ² {', '.join(head_kinds_in(s.variances))} left out: {why}",
              flush=True)
    specs = sampler_specs(s, m.diffusion.T, m.diffusion.var_type, heads=heads is not None)
    gamma = read_gamma(paths, m.diffusion.T) if any(
        sp.variance == "analytic" for sp in specs) else None
    calls = calls_per_step(s.num_samples, s.batch_size, net_batch=s.net_batch,
                           shard=shard) * sum(spec.steps for spec in specs)
    units = unit_store(shard)
    timings: dict = {"samplers": {}}
    index = {"variant": v.name, "source": m.source, "samplers": []}
    # a shard leaves its units in the scratch area and writes no output
    writes = info.is_main and shard is None
    out_s = atomic_dir(paths.samples) if writes else scratch_dir()
    out_g = atomic_dir(paths.grids) if writes else scratch_dir()
    with out_s as tmp, out_g as tmp_grid, torch.inference_mode(), \
            Progress(calls, f"sample[{v.name}]", "calls", enabled=info.is_main) as bar:
        net = inference_model(m.net.to(dev), s.precision, compile=s.compile)
        for spec in specs:
            t0 = time.perf_counter()
            images = sample(net, m.diffusion, s.num_samples, seed=s.seed,
                            batch_size=s.batch_size, clip_x0=s.clip_x0, gamma=gamma, heads=heads,
                            last_sigma_cap_y=spec.last_sigma_cap_y, device=dev,
                            net_batch=s.net_batch, units=units, progress=bar,
                            **engine_args(spec))
            seconds = time.perf_counter() - t0
            np.save(tmp / f"{spec.name}.npy", images, allow_pickle=False)
            save_grid(images, tmp_grid / f"{spec.name}.png", s.grid_size)
            # what starting at x_t ~ N(0, I) ignores, at the chain's first index t (T - 1 for
            # the full chain): samplers.prior_kl_at, the worst case over x_0 ∈ [-1, 1]
            T = m.diffusion.T
            t_start = T - 1 if spec.kind == "ancestral" else timestep_spacing(
                T, spec.steps, spec.spacing)[-1]
            index["samplers"].append({**spec.to_dict(), "num_samples": int(len(images)),
                                      "start_index": t_start,
                                      "prior_kl_bpd": prior_kl_at(m.diffusion, t_start)})
            timings["samplers"][spec.name] = {
                "seconds": round(seconds, 2), "images_per_s": round(len(images) / seconds, 2)}
            if info.is_main:
                print(f"sample[{v.name}] {spec.name}: {len(images)} images in {seconds:.1f} s"
                      + (f" (shard {shard})" if shard else ""), flush=True)
        write_json(index, tmp / "index.json")
    if writes:
        timings["seconds"] = round(sum(t["seconds"] for t in timings["samplers"].values()), 2)
        write_json(timings, paths.timings("sample"))
    finish_units(units, info.is_main, f"sample[{v.name}]")
    cleanup()


if __name__ == "__main__":
    run_stage(main, per_variant=True, shards=True)
