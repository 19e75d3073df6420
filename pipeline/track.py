"""Stage `track` (always_changed): log the pipeline's results to MLflow, exactly once.

Runs after every other stage, whether they ran or DVC restored them from its run cache, and
fills the MLflow runs from the files the stages wrote. The parent run's key hashes the params and
the hash of every output recorded in dvc.lock, so the same results are never logged twice and
new results always get a new parent (see pipeline/tracking.py for the run layout).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import yaml

from ddpm_core.config import Params, to_dict
from pipeline.common import run_stage, stable_hash
from pipeline.records import REPORTS_DIR, Results, VariantResults, bpd_key, load_results
from pipeline.tracking import (
    COMPLETE_TAG,
    create_run,
    flatten,
    log_batch,
    log_once,
    run_tags,
    store,
    tracking_uri,
)

LOCK_FILE = Path("dvc.lock")


def output_hashes() -> dict:
    """{stage: {path: md5}} of every result in dvc.lock: not this stage's outputs, and not the
    timings (a forced re-run of identical work is the same result, logged once)."""
    if not LOCK_FILE.is_file():  # stages run by hand: hash the results themselves
        files = sorted(p for d in ("metrics", "samples", "bpd", "fid") for p in Path(d).rglob("*")
                       if p.is_file())
        return {"files": {str(p): stable_hash(p.read_bytes().hex()) for p in files}}
    lock = yaml.safe_load(LOCK_FILE.read_text()) or {}
    return {name: {o["path"]: o.get("md5") or o.get("hash") for o in st.get("outs", [])
                   if not str(o["path"]).startswith("timings")}
            for name, st in (lock.get("stages") or {}).items() if name != "track"}


def _loss_history(r: VariantResults) -> list[tuple[str, float, int]]:
    path = r.paths.loss_csv
    if not path.is_file():
        return []
    with path.open() as f:
        return [(k, float(row[k]), int(row["step"])) for row in csv.DictReader(f)
                for k in ("loss", "grad_norm")]


def _finish(client, run_id: str) -> None:
    client.set_tag(run_id, COMPLETE_TAG, "true")
    client.set_terminated(run_id, "FINISHED")


def log_everything(params: Params, client, exp_id: str, key: str) -> str:
    """Write the whole run tree for `key` from pipeline.records; returns the parent run id."""
    res: Results = load_results(params)
    label = res.features.label
    tags = {**run_tags(params), "fid.features": label}
    p = params
    common = {"schedule": p.schedule, "timesteps": p.diffusion.timesteps,
              "dataset": p.data.dataset, "model.preset": p.model.preset}
    parent = create_run(client, exp_id, f"{tags['dvc.exp_name']} ({p.schedule}, "
                        f"{p.data.dataset}) {key[:8]}", key, "parent", tags=tags)
    # params as training used them (e.g. train.hflip resolved for digits: see config.Params)
    log_batch(client, parent, params=flatten(to_dict(params)),
              metrics={"floor_fid": res.features.floor["fid"]})
    for f in (REPORTS_DIR / "report.html", REPORTS_DIR / "report.md"):
        if f.is_file():
            client.log_artifact(parent, str(f))
    train_keys = flatten(to_dict(params.train))
    for name, r in res.variants.items():
        v = params.variants[name]
        vparams = {"variant": name, **{k: x for k, x in flatten(to_dict(v)).items()
                                       if k != "name"}, **common}
        if v.pretrained is None:
            vparams.update({f"train.{k}": x for k, x in train_keys.items()})
        t = r.timings
        # r.bpd holds every σ² × K: bpd_<sigma2> (full chain) and bpd_<sigma2>_K<k>
        metrics = {**r.train, **r.bpd, **r.fid,
                   "train_steps": t.get("train", {}).get("steps"),
                   "train_seconds": t.get("train", {}).get("seconds"),
                   "sample_seconds": t.get("sample", {}).get("seconds"),
                   "bpd_seconds": t.get("bpd", {}).get("seconds")}
        vrun = create_run(client, exp_id, name, f"{key}/{name}", "variant", parent,
                          tags={**tags, "variant": name})
        log_batch(client, vrun, params=vparams, metrics=metrics, steps=_loss_history(r))
        for f in [r.paths.bpd_terms, r.paths.bpd_steps, r.paths.loss_csv, r.paths.fid_steps,
                  *sorted(r.paths.grids.glob("*.png"))]:
            if f.is_file():
                client.log_artifact(vrun, str(f))
        for spec in r.samplers:
            d = r.fid_details.get(spec.name, {})
            sm = {"fid": d.get("fid"), "kid_mean": d.get("kid_mean"), "kid_std": d.get("kid_std"),
                  "isc_mean": d.get("isc_mean"), "num_samples": r.num_samples.get(spec.name),
                  "sampling_seconds": t.get("sample", {}).get("samplers", {})
                  .get(spec.name, {}).get("seconds")}
            if spec.kind == "ancestral" and spec.variance is not None:
                sm["bpd"] = r.bpd.get(bpd_key(spec.variance))
            sp = {"variant": name, "sampler": spec.name, "kind": spec.kind,
                  "steps": spec.steps, "sigma2": spec.sigma2 or "ddim",
                  "spacing": spec.spacing or "all", "ddim_eta": "n/a" if spec.eta is None
                  else spec.eta, "schedule": p.schedule}
            srun = create_run(client, exp_id, f"{name} / {spec.name}",
                              f"{key}/{name}/{spec.name}", "sampler", vrun,
                              tags={**tags, "variant": name, "sampler": spec.name})
            log_batch(client, srun, params=sp, metrics=sm)
            grid = r.paths.grids / f"{spec.name}.png"
            if grid.is_file():
                client.log_artifact(srun, str(grid))
            _finish(client, srun)
        _finish(client, vrun)
    _finish(client, parent)
    return parent


def main(params: Params) -> None:
    key = stable_hash({"params": to_dict(params), "outputs": output_hashes()}, n=16)
    exp_name = os.environ.get("DVC_EXP_NAME", "workspace")
    with store(params) as (client, exp_id):
        parent, new = log_once(client, exp_id, key,
                               lambda: log_everything(params, client, exp_id, key))
        names = client.get_run(parent).data.tags.get("dvc.exp_names", "")
        if exp_name not in names.split(","):
            client.set_tag(parent, "dvc.exp_names", f"{names},{exp_name}".strip(","))
    if new:
        print(f"track: logged parent run {parent} (key {key}) to {tracking_uri(params)}")
    else:
        print(f"track: results {key} already logged as run {parent} "
              f"({tracking_uri(params)}); nothing to do")


if __name__ == "__main__":
    run_stage(main)
