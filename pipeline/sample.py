"""Stage `sample`: N samples per (model, sampler) as uint8 arrays plus a PNG grid.

Samplers, for every trained variant and the pretrained model:
  ancestral_<var>   the full T-step chain of Algorithm 2 with each fixed σ² in sample.variances
                    (a learned-variance model uses its own σ² instead);
  respaced_S<S>     ancestral σ² = β on S respaced steps (improved DDPM, Sec. 4);
  ddim_S<S>         DDIM with η = sample.ddim_eta on the same S steps.
Every sampler starts from the same x_T (seeded per batch), so grids are comparable row by row.
Writes samples/<model>/<sampler>.npy (uint8 [N, H, W, C]), samples/<model>/<sampler>.png and
samples/index.json (what each set is, and how long it took).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ddpm_core.config import ConfigError, Params
from ddpm_core.data import from_unit, to_numpy_images
from ddpm_core.diffusion import LEARNED_VAR_TYPES
from ddpm_core.distributed import cleanup, init_distributed, sample_in_batches
from ddpm_core.inference import inference_model
from ddpm_core.samplers import sample_ancestral, sample_ddim, timestep_spacing
from pipeline.common import (
    SAMPLES_DIR,
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

# config's spacing names -> samplers.timestep_spacing's (until config imports SPACINGS)
OLD_SPACING = {"uniform": "leading", "quadratic": "ddim_quadratic"}


def check(params: Params) -> None:
    """Cross-field checks before any work: step counts must fit T and the spacing."""
    check_model_names(params)
    T = params.diffusion.timesteps
    for S in params.sample.steps:
        if S > T:
            raise ConfigError(f"sample.steps: {S} exceeds diffusion.timesteps={T}")
        try:
            timestep_spacing(T, S, OLD_SPACING[params.sample.spacing])
        except ValueError as e:
            raise ConfigError(f"sample.steps: {e}") from None


def sampler_specs(params: Params, var_type: str) -> list[dict]:
    """What the sample stage draws for a model whose own variance is `var_type`."""
    s, T = params.sample, params.diffusion.timesteps
    variances = [var_type] if var_type in LEARNED_VAR_TYPES else list(s.variances)
    specs = [{"sampler": f"ancestral_{v}", "kind": "ancestral", "variance": v, "steps": T,
              "sigma2": SIGMA2_NAME[v]} for v in variances]
    respaced_var = var_type if var_type in LEARNED_VAR_TYPES else "fixed_large"
    for S in s.steps:
        specs.append({"sampler": f"respaced_S{S}", "kind": "respaced", "variance": respaced_var,
                      "steps": S, "sigma2": SIGMA2_NAME[respaced_var]})
        specs.append({"sampler": f"ddim_S{S}", "kind": "ddim", "variance": None, "steps": S,
                      "eta": s.ddim_eta})
    return specs


def draw(params: Params, m: LoadedModel, spec: dict, net: torch.nn.Module,
         dev: torch.device) -> np.ndarray:
    """num_samples images uint8 [N, H, W, C] from one sampler (this rank's batches, gathered)."""
    s, T = params.sample, m.diff.T
    timesteps = None if spec["kind"] == "ancestral" else \
        timestep_spacing(T, spec["steps"], OLD_SPACING[s.spacing])
    diff = m.diff
    if spec["kind"] in ("ancestral", "respaced") and spec["variance"] != diff.var_type:
        diff = diff.with_var_type(spec["variance"])

    def fn(n: int, gen: torch.Generator) -> torch.Tensor:
        shape = (n, *m.image_shape_chw)
        if spec["kind"] == "ddim":
            x = sample_ddim(diff, net, shape, timesteps, s.ddim_eta, gen, clip_x0=s.clip_x0)
        else:
            x = sample_ancestral(diff, net, shape, gen, timesteps=timesteps, clip_x0=s.clip_x0)
        return from_unit(x).cpu()

    x = sample_in_batches(fn, s.num_samples, s.batch_size, s.seed, device=dev)
    return to_numpy_images(x)


def save_grid(images: np.ndarray, path: Path, n: int, scale: int) -> None:
    """The first n images as a square PNG grid, each pixel shown as scale x scale."""
    images = images[:n]
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    h, w, c = images.shape[1:]
    pad = 1
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
    for i, im in enumerate(images):
        r, q = divmod(i, cols)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h,
             pad + q * (w + pad):pad + q * (w + pad) + w] = im
    grid = grid.repeat(scale, 0).repeat(scale, 1)
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(path)


def main(params: Params) -> None:
    s = params.sample
    relaunch_under_torchrun("pipeline.sample", s.nproc)
    info = init_distributed(device())
    dev = info.device
    models = load_models(params, s.use_ema)
    index = {}
    out = atomic_dir(SAMPLES_DIR) if info.is_main else scratch_dir()
    with out as tmp, torch.inference_mode():
        for m in models:
            net = inference_model(m.net.to(dev), s.precision, compile=s.compile)
            (tmp / m.name).mkdir()
            index[m.name] = {"source": m.source, "samplers": {}}
            for spec in sampler_specs(params, m.diff.var_type):
                t0 = time.perf_counter()
                images = draw(params, m, spec, net, dev)
                seconds = time.perf_counter() - t0
                np.save(tmp / m.name / f"{spec['sampler']}.npy", images, allow_pickle=False)
                scale = max(1, 64 // images.shape[1])
                save_grid(images, tmp / m.name / f"{spec['sampler']}.png",
                          params.sample.grid_size, scale)
                index[m.name]["samplers"][spec["sampler"]] = {
                    **spec, "num_samples": int(len(images)), "seconds": round(seconds, 2)}
                if info.is_main:
                    print(f"sample[{m.name}] {spec['sampler']}: {len(images)} images in "
                          f"{seconds:.1f} s", flush=True)
        write_json(index, tmp / "index.json")
    cleanup()


if __name__ == "__main__":
    run_stage(main, check)
