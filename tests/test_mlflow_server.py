"""MLflow tracking: the track stage logs a run tree once (idempotent, repairs a half-written
tree), and `mlflow server` on 127.0.0.1 serves those runs through its REST API."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
from helpers import FID, free_port, make_outputs, run_stage, start_mlflow_server, stop_mlflow_server

pytestmark = pytest.mark.slow  # subprocess pipelines (README, Tests)


def _runs(db: str) -> list:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(db)
    return c.search_runs([c.get_experiment_by_name("ddpm").experiment_id], max_results=1000)


def _track(root: Path, db: str, exp_name: str = "exp-a"):
    r = run_stage("track", root, (root / "params.yaml").read_text(),
                  env={"MLFLOW_TRACKING_URI": db, "DVC_EXP_NAME": exp_name})
    assert r.returncode == 0, r.stderr
    return r


def test_track_logs_once_and_repairs_a_half_written_tree(tmp_path):
    make_outputs(tmp_path)
    db = f"sqlite:///{tmp_path}/mlflow.db"
    _track(tmp_path, db)
    runs = _runs(db)
    levels = sorted(r.data.tags["ddpm.level"] for r in runs)
    assert levels == ["parent"] + ["sampler"] * 2 * len(FID) + ["variant"] * 2
    parent = next(r for r in runs if r.data.tags["ddpm.level"] == "parent")
    assert parent.data.tags["dvc.exp_name"] == "exp-a" and parent.info.status == "FINISHED"
    # the UI's Source column: MLflow's standard source tags carry the commit
    assert parent.data.tags["mlflow.source.git.commit"] == parent.data.tags["git.revision"]
    assert parent.data.tags["mlflow.source.name"].startswith("dvc repro")
    simple = next(r for r in runs if r.info.run_name == "simple")
    assert simple.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert simple.data.metrics["bpd_sigma2_beta"] == 2.5
    assert simple.data.metrics["fid_ancestral_beta_tilde"] == 4.25
    assert simple.data.metrics["final_loss"] == 0.05
    assert simple.data.params["loss"] == "simple"
    beta_tilde = next(r for r in runs if r.info.run_name == "simple / ancestral_beta_tilde")
    assert beta_tilde.data.params["sigma2"] == "sigma2_beta_tilde"
    assert beta_tilde.data.metrics["bpd"] == 3.5 and beta_tilde.data.metrics["fid"] == 4.25

    # the same results again (a re-run, or stages restored from DVC's run cache): nothing new
    r = _track(tmp_path, db, "exp-b")
    assert "already logged" in r.stdout
    again = _runs(db)
    assert sorted(x.info.run_id for x in again) == sorted(x.info.run_id for x in runs)
    p2 = next(x for x in again if x.info.run_id == parent.info.run_id)
    assert p2.data.tags["dvc.exp_names"] == "exp-a,exp-b"

    # a tree killed half-way (no completion tag) is replaced, not duplicated
    from mlflow.tracking import MlflowClient

    MlflowClient(db).delete_tag(parent.info.run_id, "ddpm.complete")
    _track(tmp_path, db)
    repaired = _runs(db)
    assert len(repaired) == len(runs)
    assert parent.info.run_id not in {x.info.run_id for x in repaired}

    # different results (a metric changed) get a new parent
    (tmp_path / "metrics" / "bpd" / "simple.json").write_text(json.dumps(
        {"simple": {"bpd_sigma2_beta": 9.0}}))
    _track(tmp_path, db)
    assert sum(x.data.tags["ddpm.level"] == "parent" for x in _runs(db)) == 2


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def test_mlflow_server_serves_the_runs_over_rest(tmp_path):
    make_outputs(tmp_path)
    db = f"sqlite:///{tmp_path}/mlflow.db"
    _track(tmp_path, db)
    port = free_port()
    proc = start_mlflow_server(db, port, tmp_path / "mlartifacts")
    base = f"http://127.0.0.1:{port}"
    try:
        exp = json.loads(urllib.request.urlopen(
            f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=ddpm",
            timeout=30).read())["experiment"]
        found = _post(f"{base}/api/2.0/mlflow/runs/search", {
            "experiment_ids": [exp["experiment_id"]],
            "filter": "tags.`ddpm.level` = 'variant'", "max_results": 100})["runs"]
        names = sorted(r["info"]["run_name"] for r in found)
        assert names == ["simple", "vlb"]
        metrics = {m["key"]: m["value"] for m in found[0]["data"]["metrics"]}
        assert "bpd_sigma2_beta" in metrics and "fid_ancestral_beta" in metrics
    finally:
        stop_mlflow_server(proc)


def _variant_outputs(root: Path, name: str) -> list[Path]:
    """Every file the stages wrote for variant `name` under root, found through
    pipeline.records' VariantPaths (each path of its layout, a folder's files, and
    timings/<stage>/<name>.json), relative to root."""
    from pipeline.records import VariantPaths

    vp = VariantPaths(name)
    paths = vp.outputs()
    paths += [p.relative_to(root) for p in (root / "timings").glob(f"*/{name}.json")]
    files = []
    for p in paths:
        if (root / p).is_dir():
            files += [f.relative_to(root) for f in (root / p).rglob("*") if f.is_file()]
        elif (root / p).is_file():
            files.append(p)
    return sorted(set(files))


def test_every_file_a_variants_stages_wrote_downloads_from_its_run(tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline.records import VariantPaths

    make_outputs(tmp_path)
    for name in ("simple", "vlb"):  # the stages make_outputs leaves out
        (tmp_path / VariantPaths(name).gamma).parent.mkdir(exist_ok=True)
        (tmp_path / VariantPaths(name).gamma).write_text(json.dumps({"gamma": [0.5, 0.25]}))
    db = f"sqlite:///{tmp_path}/mlflow.db"
    _track(tmp_path, db)
    client = MlflowClient(db)
    for name in ("simple", "vlb"):
        run = next(r for r in _runs(db) if r.info.run_name == name)
        files = _variant_outputs(tmp_path, name)
        # the four per-variant CSVs that were all `<variant>.csv` at the artifact root
        vp = VariantPaths(name)
        assert {vp.bpd_terms, vp.bpd_steps, vp.loss_csv, vp.fid_steps, vp.gamma} <= set(files)
        # the sample arrays are the one thing not logged (up to GBs each; the grids show them)
        arrays = {f for f in files if f.parent == vp.samples and f.suffix == ".npy"}
        assert len(arrays) == len(FID)
        for f in sorted(set(files) - arrays):
            got = Path(client.download_artifacts(run.info.run_id, f.as_posix(),
                                                 str(tmp_path / "dl" / name)))
            assert got.read_bytes() == (tmp_path / f).read_bytes(), f


def test_two_clones_sharing_a_sqlite_store_keep_their_artifacts_beside_the_store(tmp_path):
    import shutil

    from mlflow.tracking import MlflowClient

    (tmp_path / "store").mkdir()
    db = f"sqlite:///{tmp_path}/store/mlflow.db"
    a, b = tmp_path / "clone_a", tmp_path / "clone_b"
    for root in (a, b):
        root.mkdir()
        make_outputs(root)
    (b / "metrics" / "bpd" / "simple.json").write_text(json.dumps(
        {"simple": {"bpd_sigma2_beta": 9.0}}))  # clone B's own results: a new parent
    _track(a, db)  # clone A creates the experiment
    _track(b, db)
    shutil.rmtree(a)  # the first clone is gone; the store is not
    (run,) = [r for r in _runs(db) if r.info.run_name == "simple"
              and r.data.metrics.get("bpd_sigma2_beta") == 9.0]
    got = Path(MlflowClient(db).download_artifacts(run.info.run_id, "plots/loss/simple.csv",
                                                   str(tmp_path / "dl")))
    assert got.read_bytes() == (b / "plots" / "loss" / "simple.csv").read_bytes()
    exp = MlflowClient(db).get_experiment_by_name("ddpm")
    assert exp.artifact_location == (tmp_path / "store" / "mlartifacts").as_uri()
