"""Stage `nnhead@<variant>`: Bao et al. 2022b's NPR and SN variance heads, trained together on
the variant's frozen ε-network (its EMA weights when nnhead.use_ema) by the one engine call
ddpm_core.api.train_heads (Adam at nnhead.lr, nnhead.steps steps of nnhead.batch_size training
images, step s drawn from (nnhead.seed, s)): the input of σ² npr and sn in sample@<v> and
bpd@<v>.

Writes heads/<v>/info.json (the settings, and `heads`: the heads file's name) and
heads/<v>/heads.pt (ddpm_core.headfile; `ddpm ... --heads heads/<v>/heads.pt` reads it) plus
timings/nnhead/<v>.json. A model the heads do not fit (a learned variance, which has its own
σ², or a model that does not predict ε) or nnhead.steps 0 gets no heads file: info.json says
`"heads": null` and why (one line), so the folder DVC caches always exists (as gamma/<v>.json
holds null for a learned σ²).
"""

from __future__ import annotations

import time

from ddpm_core.api import save_heads, sigma2_of, train_heads
from ddpm_core.data import load_images
from ddpm_core.modes import HEAD_KINDS
from pipeline.common import atomic_dir, device, run_stage, variant_model, write_json
from pipeline.params import Params, VariantConfig, to_dict
from pipeline.records import DATA_DIR, VariantPaths


def main(params: Params, v: VariantConfig) -> None:
    c = params.nnhead
    paths = VariantPaths(v.name)
    m = variant_model(v.name, c.use_ema)
    settings = to_dict(params)["nnhead"]
    info: dict = {"variant": v.name, **settings, "heads": None, "skipped": None}
    seconds = 0.0
    try:
        for kind in HEAD_KINDS:
            sigma2_of(m.diffusion, kind)  # the engine's rule: an ε-model of fixed variance
        skipped = None if c.steps > 0 else "nnhead.steps is 0"
    except ValueError as e:
        skipped = str(e)
    with atomic_dir(paths.heads_dir) as tmp:
        if skipped is None:
            dev = device()
            t0 = time.perf_counter()
            heads = train_heads(m.net.to(dev), m.diffusion, load_images(DATA_DIR / "train.npy"),
                                steps=c.steps, lr=c.lr, batch_size=c.batch_size, seed=c.seed,
                                device=dev, progress=True)
            seconds = time.perf_counter() - t0
            save_heads(heads, tmp / paths.heads.name, meta={"variant": v.name, **settings})
            info["heads"] = paths.heads.name
            print(f"nnhead[{v.name}]: {' and '.join(HEAD_KINDS)} heads, {c.steps} steps of "
                  f"{c.batch_size} images in {seconds:.1f} s", flush=True)
        else:
            info["skipped"] = skipped
            print(f"nnhead[{v.name}]: skipped, no heads: {skipped}", flush=True)
        write_json(info, tmp / paths.heads_info.name)
    write_json({"seconds": round(seconds, 2), "steps": c.steps if skipped is None else 0,
                "batch_size": c.batch_size, "skipped": skipped}, paths.timings("nnhead"))


if __name__ == "__main__":
    run_stage(main, per_variant=True)
