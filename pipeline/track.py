"""Stage `track` (always_changed): log the pipeline's results to MLflow, exactly once.

Runs after every other stage, whether they ran or DVC restored them from its run cache, and
fills the MLflow runs from the files the stages wrote. The parent run's key hashes the params and
the hash of every output recorded in dvc.lock, so the same results are never logged twice and
new results always get a new parent (see pipeline/tracking.py for the run layout).
"""

from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path

import yaml

from pipeline.common import run_stage, stable_hash
from pipeline.params import Params, to_dict
from pipeline.records import (
    DATA_DIR,
    REPORTS_DIR,
    Results,
    VariantPaths,
    VariantResults,
    bpd_key,
    load_results,
)
from pipeline.tracking import (
    COMPLETE_TAG,
    DATASET_CONTEXT_TAG,
    MODEL_ARTIFACT_DIR,
    MODEL_URI_TAG,
    ClaimedElsewhere,
    create_run,
    flatten,
    log_batch,
    log_once,
    run_tags,
    store,
    tracking_uri,
)

LOCK_FILE = Path("dvc.lock")


def lock_outputs() -> dict[str, dict[str, str]] | None:
    """{stage: {output path: md5}} as dvc.lock records it; None without a dvc.lock."""
    if not LOCK_FILE.is_file():
        return None
    lock = yaml.safe_load(LOCK_FILE.read_text()) or {}
    return {name: {str(o["path"]): o.get("md5") or o.get("hash") for o in st.get("outs", [])}
            for name, st in (lock.get("stages") or {}).items()}


def output_hashes(lock: dict[str, dict[str, str]] | None) -> dict:
    """{stage: {path: md5}} of every result in dvc.lock: not this stage's outputs, not the
    timings and not the report (it shows the timings; everything else in it comes from the
    results): a forced re-run of identical work is the same result, logged once."""
    if lock is None:  # stages run by hand: hash the results themselves
        files = sorted(p for d in ("metrics", "samples", "bpd", "fid") for p in Path(d).rglob("*")
                       if p.is_file())
        return {"files": {str(p): stable_hash(p.read_bytes().hex()) for p in files}}
    return {name: {path: md5 for path, md5 in outs.items()
                   if not path.startswith(("timings", "reports"))}
            for name, outs in lock.items() if name != "track"}


def data_digest(lock: dict[str, dict[str, str]] | None) -> str:
    """DVC's md5 of data/prepared as dvc.lock records it (stages run by hand, no lock entry:
    the md5 of its files' names and bytes)."""
    recorded = (lock or {}).get("prepare", {}).get(str(DATA_DIR))
    if recorded:
        return recorded
    h = hashlib.md5()
    for f in sorted(p for p in DATA_DIR.rglob("*") if p.is_file()):
        h.update(f.relative_to(DATA_DIR).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def data_inputs(params: Params, digest: str, trained: bool) -> list:
    """The splits as MLflow dataset inputs (`digits-train`, `digits-test`, the labels beside
    an array as its targets) with the DVC hash as digest and the UI's dataset badge (training
    or evaluation); none when data/prepared is absent (results copied in without their data).
    The arrays are memory-mapped, as MLflow reads only their shape and dtype."""
    import numpy as np
    from mlflow.data import from_numpy
    from mlflow.entities import DatasetInput, InputTag

    inputs = []
    for split, context in (("train", "training" if trained else "evaluation"),
                           ("test", "evaluation")):
        path, labels = DATA_DIR / f"{split}.npy", DATA_DIR / f"{split}_labels.npy"
        if path.is_file():
            ds = from_numpy(np.load(path, mmap_mode="r"), source=str(path), digest=digest,
                            name=f"{params.data.dataset}-{split}",
                            targets=np.load(labels, mmap_mode="r") if labels.is_file() else None)
            inputs.append(DatasetInput(ds._to_mlflow_entity(),
                                       tags=[InputTag(DATASET_CONTEXT_TAG, context)]))
    return inputs


def variant_params(params: Params, name: str) -> dict[str, str]:
    """Every setting in effect for one variant: its own (loss, mean_type, ...), then the shared
    sections as params.yaml names them (train.* as training used them; none of train.* and
    model.* for imported weights), then the network the model file holds (net.*)."""
    tree = to_dict(params)
    own = tree.pop("variants")[name]
    tree.pop("mlflow")
    if params.variants[name].pretrained is not None:  # the file's network; no training here
        del tree["train"], tree["model"]
    out = {"variant": name, **flatten(own), **flatten(tree)}
    model = VariantPaths(name).model
    if model.is_file():
        from ddpm_core.modelfile import load_model_file  # torch: not on the error path

        out.update(flatten({"net": load_model_file(model).spec.to_dict()["unet"]}))
    return out


def train_window(r: VariantResults) -> tuple[int, int] | None:
    """(start, end) of the training in ms since the epoch: it ended when timings/train/<v>.json
    was written (or restored by DVC) and took the wall seconds that file holds."""
    f = r.paths.timings("train")
    seconds = r.timings.get("train", {}).get("seconds")
    if seconds is None or not f.is_file():
        return None
    end = int(f.stat().st_mtime * 1000)
    return end - int(round(float(seconds) * 1000)), end


def _loss_history(r: VariantResults) -> list[tuple[str, float, int]]:
    path = r.paths.loss_csv
    if not path.is_file():
        return []
    with path.open() as f:
        return [(k, float(row[k]), int(row["step"])) for row in csv.DictReader(f)
                for k in ("loss", "grad_norm")]


def variant_files(paths: VariantPaths) -> list[Path]:
    """Every file the stages wrote for a variant, found through pipeline.records' VariantPaths
    (each path, a folder's files, timings/<stage>/<v>.json), less the model file (logged as
    model/<v>.pt) and the sample arrays (up to GBs each; the grids show them)."""
    found = paths.outputs() + sorted(Path("timings").glob(f"*/{paths.name}.json"))
    files: list[Path] = []
    for p in found:
        files += sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    return [f for f in dict.fromkeys(files) if f.is_file() and f != paths.model
            and not (f.parent == paths.samples and f.suffix == ".npy")]


def _finish(client, run_id: str, end_time: int | None = None) -> None:
    client.set_tag(run_id, COMPLETE_TAG, "true")
    client.set_terminated(run_id, "FINISHED", end_time=end_time)


def log_everything(params: Params, client, exp_id: str, key: str,
                   lock: dict[str, dict[str, str]] | None) -> str:
    """Write the whole run tree for `key` from pipeline.records (lock: lock_outputs());
    returns the parent run id."""
    res: Results = load_results(params)
    tags = {**run_tags(params), "fid.features": res.features.label}
    p = params
    digest = data_digest(lock) if DATA_DIR.is_dir() else ""
    parent = create_run(client, exp_id, f"{tags['dvc.exp_name']} ({p.schedule}, "
                        f"{p.data.dataset}) {key[:8]}", key, "parent", tags=tags)
    # r.bpd holds every σ² × K: bpd_<sigma2> (full chain) and bpd_<sigma2>_K<k>
    results = {name: {**r.train, **r.bpd, **r.nll, **r.fid} for name, r in res.variants.items()}
    # params as training used them (e.g. train.hflip resolved for digits: see config.Params);
    # the parent's metrics named as `dvc exp show` names them: <variant>.<metric key of
    # pipeline.records> (simple.bpd_sigma2_beta, vlb.fid_ancestral_beta)
    log_batch(client, parent, params=flatten(to_dict(params)),
              metrics={"floor_fid": res.features.floor["fid"],
                       **{f"{n}.{k}": x for n, m in results.items() for k, x in m.items()}})
    trained = any(v.pretrained is None for v in p.variants.values())
    if inputs := data_inputs(p, digest, trained):
        client.log_inputs(parent, datasets=inputs)
    for f in (REPORTS_DIR / "report.html", REPORTS_DIR / "report.md"):
        if f.is_file():
            client.log_artifact(parent, str(f))
    for name, r in res.variants.items():
        t = r.timings
        metrics = {**results[name], "train_steps": t.get("train", {}).get("steps"),
                   **{f"{s}_seconds": t.get(s, {}).get("seconds")
                      for s in ("train", "nnhead", "sample", "bpd", "nll")}}
        start, end = train_window(r) or (None, None)
        vrun = create_run(client, exp_id, name, f"{key}/{name}", "variant", parent,
                          tags={**tags, "variant": name}, start_time=start)
        log_batch(client, vrun, params=variant_params(p, name), metrics=metrics,
                  steps=_loss_history(r))
        if inputs := data_inputs(p, digest, p.variants[name].pretrained is None):
            client.log_inputs(vrun, datasets=inputs)
        if r.paths.model.is_file():
            client.log_artifact(vrun, str(r.paths.model), MODEL_ARTIFACT_DIR)
            client.set_tag(vrun, MODEL_URI_TAG,
                           f"runs:/{vrun}/{MODEL_ARTIFACT_DIR}/{r.paths.model.name}")
        for f in variant_files(r.paths):  # under the stage output's own path: bpd/<v>.csv, ...
            client.log_artifact(vrun, str(f), f.parent.as_posix())
        for spec in r.samplers:
            d = r.fid_details.get(spec.name, {})
            sm = {**{k: d.get(k) for k in ("fid", "kid_mean", "kid_std", "isc_mean")},
                  "num_samples": r.num_samples.get(spec.name),
                  "sampling_seconds": t.get("sample", {}).get("samplers", {})
                  .get(spec.name, {}).get("seconds")}
            if spec.kind == "ancestral" and spec.variance is not None:
                sm["bpd"] = r.bpd.get(bpd_key(spec.variance))
            sp = {"variant": name, "sampler": spec.name, "kind": spec.kind,
                  "steps": spec.steps, "sigma2": spec.sigma2 or "ddim",
                  "spacing": spec.spacing or "all", "ddim_eta": "n/a" if spec.eta is None
                  else spec.eta, "schedule": p.schedule,
                  "last_sigma_cap_y": "none" if spec.last_sigma_cap_y is None
                  else spec.last_sigma_cap_y}
            srun = create_run(client, exp_id, f"{name} / {spec.name}",
                              f"{key}/{name}/{spec.name}", "sampler", vrun,
                              tags={**tags, "variant": name, "sampler": spec.name})
            log_batch(client, srun, params=sp, metrics=sm)
            grid = r.paths.grids / f"{spec.name}.png"
            if grid.is_file():
                client.log_artifact(srun, str(grid))
            _finish(client, srun)
        _finish(client, vrun, end)
    _finish(client, parent)
    return parent


def main(params: Params) -> None:
    lock = lock_outputs()
    key = stable_hash({"params": to_dict(params), "outputs": output_hashes(lock)}, n=16)
    exp_name = os.environ.get("DVC_EXP_NAME", "workspace")
    with store(params) as (client, exp_id):
        try:
            parent, new = log_once(client, exp_id, key,
                                   lambda: log_everything(params, client, exp_id, key, lock))
        except ClaimedElsewhere as e:  # another clone is logging the same results
            print(f"track: {e}")
            return
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
