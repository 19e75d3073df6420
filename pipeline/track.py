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
from pipeline.common import (
    BPD_DIR,
    FID_DIR,
    METRICS_DIR,
    PLOTS_DIR,
    REPORTS_DIR,
    SAMPLES_DIR,
    read_json,
    run_stage,
    stable_hash,
)
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
    """{stage: {path: md5}} of every stage output in dvc.lock except this stage's."""
    if not LOCK_FILE.is_file():  # stages run by hand: hash the results themselves
        files = sorted(p for d in (METRICS_DIR, SAMPLES_DIR, BPD_DIR) for p in d.rglob("*")
                       if p.is_file())
        return {"files": {str(p): stable_hash(p.read_bytes().hex()) for p in files}}
    lock = yaml.safe_load(LOCK_FILE.read_text()) or {}
    return {name: {o["path"]: o.get("md5") or o.get("hash") for o in st.get("outs", [])}
            for name, st in (lock.get("stages") or {}).items() if name != "track"}


def _loss_history(name: str) -> list[tuple[str, float, int]]:
    path = PLOTS_DIR / "loss" / f"{name}.csv"
    if not path.is_file():
        return []
    with path.open() as f:
        return [(k, float(row[k]), int(row["step"])) for row in csv.DictReader(f)
                for k in ("loss", "grad_norm")]


def log_everything(params: Params, client, exp_id: str, key: str) -> str:
    """Write the whole run tree for `key`; returns the parent run id."""
    train = read_json(METRICS_DIR / "train.json")
    bpd = read_json(METRICS_DIR / "bpd.json")
    fid_all = read_json(METRICS_DIR / "fid.json")
    details = read_json(FID_DIR / "details.json")
    index = read_json(SAMPLES_DIR / "index.json")
    fid_key = next(iter(fid_all))
    fid = fid_all[fid_key]
    label = details["label"]
    tags = {**run_tags(params), "fid.features": label}
    p = params
    parent = create_run(client, exp_id, f"{tags['dvc.exp_name']} ({p.schedule}, "
                        f"{p.data.dataset}) {key[:8]}", key, "parent", tags=tags)
    log_batch(client, parent, params=flatten(to_dict(params)),
              metrics={f"{fid_key}.floor_test_vs_train": fid["floor_test_vs_train"]})
    for f in (REPORTS_DIR / "report.html", REPORTS_DIR / "report.md"):
        if f.is_file():
            client.log_artifact(parent, str(f))
    variants = {v.name: v for v in params.variants}
    train_keys = {k: v for k, v in flatten(to_dict(params.train)).items()}
    for name, entry in index.items():
        v = variants.get(name)
        vparams = ({"variant": name, **{k: getattr(v, k) for k in
                                        ("mean_type", "var_type", "loss", "t_sampling")},
                    **{f"train.{k}": x for k, x in train_keys.items()}} if v is not None else
                   {"variant": name, **{f"pretrained.{k}": x for k, x in
                                        flatten(to_dict(params.pretrained)).items()}})
        vparams.update({"schedule": p.schedule, "timesteps": p.diffusion.timesteps,
                        "dataset": p.data.dataset, "model.preset": p.model.preset})
        metrics = {"final_loss": train.get(name, {}).get("final_loss"),
                   "train_steps": train.get(name, {}).get("steps"),
                   "train_seconds": train.get(name, {}).get("seconds")}
        metrics.update(bpd.get(name, {}))
        metrics.update({f"fid_{s}": x for s, x in fid.get(name, {}).items()})
        vrun = create_run(client, exp_id, name, f"{key}/{name}", "variant", parent,
                          tags={**tags, "variant": name})
        log_batch(client, vrun, params=vparams, metrics=metrics, steps=_loss_history(name))
        for f in [BPD_DIR / f"{name}.csv", PLOTS_DIR / "loss" / f"{name}.csv",
                  *sorted((SAMPLES_DIR / name).glob("*.png"))]:
            if f.is_file():
                client.log_artifact(vrun, str(f))
        for sampler, spec in entry["samplers"].items():
            d = details["models"].get(name, {}).get(sampler, {})
            sm = {"fid": d.get("fid"), "kid_mean": d.get("kid_mean"), "kid_std": d.get("kid_std"),
                  "isc_mean": d.get("isc_mean"), "sampling_seconds": spec.get("seconds"),
                  "num_samples": spec.get("num_samples")}
            sigma2 = spec.get("sigma2")
            if spec["kind"] == "ancestral" and sigma2 is not None:
                sm["bpd"] = bpd.get(name, {}).get(f"bpd_{sigma2}")
            sp = {"variant": name, "sampler": sampler, "kind": spec["kind"],
                  "steps": spec["steps"], "sigma2": sigma2 or "ddim",
                  "ddim_eta": spec.get("eta", "n/a"), "schedule": p.schedule}
            srun = create_run(client, exp_id, f"{name} / {sampler}", f"{key}/{name}/{sampler}",
                              "sampler", vrun, tags={**tags, "variant": name, "sampler": sampler,
                                                     "fid.features": label})
            log_batch(client, srun, params=sp, metrics=sm)
            grid = SAMPLES_DIR / name / f"{sampler}.png"
            if grid.is_file():
                client.log_artifact(srun, str(grid))
            client.set_tag(srun, COMPLETE_TAG, "true")
            client.set_terminated(srun, "FINISHED")
        client.set_tag(vrun, COMPLETE_TAG, "true")
        client.set_terminated(vrun, "FINISHED")
    client.set_tag(parent, COMPLETE_TAG, "true")
    client.set_terminated(parent, "FINISHED")
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
