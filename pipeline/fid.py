"""Stage `fid@<variant>`: FID and KID (IS for Inception) of every sample set of the variant
against the reference statistics of the `features` stage (never recomputed here).

Writes metrics/fid/<v>.json (keys from pipeline.records.fid_key), fid/<v>.json (FID, KID, IS
per sampler), plots/fid_steps/<v>.csv (FID against the number of sampling steps: DDIM,
Analytic-, NPR- and SN-DDIM and respaced ancestral per σ², the full chain at S = T) and
timings/fid/<v>.json.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

from ddpm_core.fid import feature_network, features_pass, load_reference, metrics_against
from ddpm_core.modes import LEARNED_VAR_TYPES, SIGMA2_MODES
from pipeline.common import finish_units, run_stage, unit_store, write_json, write_text
from pipeline.params import VARIANCES, Params, VariantConfig
from pipeline.records import (
    CLASSIFIER_FILE,
    DDIM_NAMES,
    REFERENCE_FILE,
    SamplerSpec,
    VariantPaths,
    fid_key,
    read_json,
    variant_metrics,
)

# plots/fid_steps/<v>.csv: one `ddim` column and one ddim_<short> per DDIM with a σ²'s noise
# (records.DDIM_NAMES: Analytic-, NPR-, SN-DDIM), one `respaced` column for σ² = β or a model's
# own learned σ², one respaced_<short> per other σ² the pipeline draws (params.VARIANCES;
# dvc.yaml's plot names them: tests/test_modes.py compares)
_RESPACED = ("fixed_large", *LEARNED_VAR_TYPES)
STEPS_COLUMNS = ("ddim", *(f"ddim_{SIGMA2_MODES[v].short}" for v in DDIM_NAMES if v), "respaced",
                 *(f"respaced_{SIGMA2_MODES[v].short}" for v in VARIANCES if v not in _RESPACED))


def steps_column(s: SamplerSpec) -> str:
    """The column of a sample set in plots/fid_steps/<v>.csv (one of STEPS_COLUMNS)."""
    short = None if s.variance is None else SIGMA2_MODES[s.variance].short
    if s.kind == "ddim":
        return "ddim" if short is None else f"ddim_{short}"
    return "respaced" if s.variance in _RESPACED else f"respaced_{short}"


def steps_csv(specs: list[SamplerSpec], fids: dict[str, float]) -> str:
    """steps,<STEPS_COLUMNS>: FID against S; the full chains are the respaced points S = T."""
    rows: dict[int, dict[str, float]] = {}
    for s in specs:
        rows.setdefault(s.steps, {})[steps_column(s)] = fids[s.name]
    df = pd.DataFrame.from_dict(rows, orient="index", columns=list(STEPS_COLUMNS)).sort_index()
    return df.to_csv(index_label="steps", float_format="%.6g", lineterminator="\n")


def main(params: Params, v: VariantConfig) -> None:
    paths = VariantPaths(v.name)
    ref = load_reference(REFERENCE_FILE)
    net = feature_network(ref.features, classifier_path=CLASSIFIER_FILE,
                          inception_weights=params.fid.inception_weights)
    specs = [SamplerSpec.from_dict(d) for d in read_json(paths.sample_index)["samplers"]]
    details, fids, seconds = {}, {}, {}
    units = unit_store(None)
    for spec in specs:
        samples = np.load(paths.samples / f"{spec.name}.npy", allow_pickle=False)
        t0 = time.perf_counter()
        r = metrics_against(net, features_pass(net, samples, spec.name, f"fid[{v.name}]", units),
                            ref, kid_subset_size=params.fid.kid_subset_size)
        seconds[spec.name] = round(time.perf_counter() - t0, 2)
        details[spec.name] = {"images": int(len(samples)), **r}
        fids[spec.name] = r["fid"]
        print(f"fid[{v.name}] {spec.name}: FID {r['fid']:.3f} (KID {r['kid_mean']:.4f})",
              flush=True)
    write_json(details, paths.fid_details)
    write_json(variant_metrics(v.name, {fid_key(s): round(fids[s.name], 5) for s in specs}),
               paths.fid_metrics)
    write_text(steps_csv(specs, fids), paths.fid_steps)
    write_json({"seconds": seconds}, paths.timings("fid"))
    finish_units(units, True, f"fid[{v.name}]")


if __name__ == "__main__":
    run_stage(main, per_variant=True)
