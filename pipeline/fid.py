"""Stage `fid@<variant>`: FID and KID (IS for Inception) of every sample set of the variant
against the reference statistics of the `features` stage (never recomputed here).

Writes metrics/fid/<v>.json (keys from pipeline.records.fid_key), fid/<v>.json (FID, KID, IS
per sampler), plots/fid_steps/<v>.csv (FID against the number of sampling steps: DDIM,
Analytic-DDIM and respaced ancestral per σ², the full chain at S = T) and timings/fid/<v>.json.
"""

from __future__ import annotations

import time

import numpy as np

from ddpm_core.fid import feature_network, load_reference, metrics_against
from pipeline.common import run_stage, write_json, write_text
from pipeline.features import features_pass
from pipeline.params import Params, VariantConfig
from pipeline.records import (
    CLASSIFIER_FILE,
    REFERENCE_FILE,
    SamplerSpec,
    VariantPaths,
    fid_key,
    read_json,
    variant_metrics,
)


def steps_csv(specs: list[SamplerSpec], fids: dict[str, float]) -> str:
    """steps,ddim,ddim_analytic,respaced,respaced_beta_tilde,respaced_analytic: FID against S;
    `respaced` is σ² = β (or the learned σ²); the full chains are the respaced points S = T."""
    cols = {"fixed_large": "respaced", "learned": "respaced", "learned_range": "respaced",
            "fixed_small": "respaced_beta_tilde", "analytic": "respaced_analytic"}
    names = ["ddim", "ddim_analytic", "respaced", "respaced_beta_tilde", "respaced_analytic"]
    rows: dict[int, dict[str, float]] = {}
    for s in specs:
        if s.kind == "ddim":
            col = "ddim" if s.variance is None else "ddim_analytic"
            rows.setdefault(s.steps, {})[col] = fids[s.name]
        elif s.variance in cols:
            rows.setdefault(s.steps, {})[cols[s.variance]] = fids[s.name]

    def cell(x: float | None) -> str:
        return "" if x is None else f"{x:.6g}"

    return "\n".join([f"steps,{','.join(names)}"] + [
        f"{S}," + ",".join(cell(r.get(c)) for c in names) for S, r in sorted(rows.items())
    ]) + "\n"


def main(params: Params, v: VariantConfig) -> None:
    paths = VariantPaths(v.name)
    ref = load_reference(REFERENCE_FILE)
    net = feature_network(ref.features, classifier_path=CLASSIFIER_FILE
                          if ref.features == "digits_classifier" else None,
                          inception_weights=params.fid.inception_weights)
    index = read_json(paths.sample_index)
    details, fids, seconds = {}, {}, {}
    for d in index["samplers"]:
        spec = SamplerSpec.from_dict(d)
        samples = np.load(paths.samples / f"{spec.name}.npy", allow_pickle=False)
        t0 = time.perf_counter()
        r = metrics_against(net, features_pass(net, samples, spec.name, f"fid[{v.name}]"), ref,
                            kid_subset_size=params.fid.kid_subset_size)
        seconds[spec.name] = round(time.perf_counter() - t0, 2)
        details[spec.name] = {"images": int(len(samples)), **r}
        fids[spec.name] = r["fid"]
        print(f"fid[{v.name}] {spec.name}: FID {r['fid']:.3f} (KID {r['kid_mean']:.4f})",
              flush=True)
    specs = [SamplerSpec.from_dict(d) for d in index["samplers"]]
    write_json(details, paths.fid_details)
    write_json(variant_metrics(v.name, {fid_key(s): round(fids[s.name], 5) for s in specs}),
               paths.fid_metrics)
    write_text(steps_csv(specs, fids), paths.fid_steps)
    write_json({"seconds": seconds}, paths.timings("fid"))


if __name__ == "__main__":
    run_stage(main, per_variant=True)
