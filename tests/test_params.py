"""Malformed params.yaml through the real stage entry points: one line `error: <key>: ...` on
stderr, exit status 2, no traceback, no work done and earlier outputs left as they were."""

from __future__ import annotations

import pytest
from helpers import REPO, run_stage, tiny_params  # noqa: F401


def assert_one_line_error(r, key: str, code: int = 2) -> None:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert key in lines[0], (key, lines[0])


# (stage, mutation of the tiny params, key the message must name)
CASES = [
    ("prepare", lambda p: p["data"].update(tets_fraction=0.2), "data.tets_fraction"),
    ("prepare", lambda p: p["data"].update(test_fraction=1.5), "data.test_fraction"),
    ("train", lambda p: p["train"].update(steps="many"), "train.steps"),
    ("train", lambda p: p["train"].update(ema_decay=1.5), "train.ema_decay"),
    ("sample", lambda p: p["sample"].update(num_samples=0), "sample.num_samples"),
    ("sample", lambda p: p["sample"].update(steps=[50]), "sample.steps"),  # > T = 10
    ("bpd", lambda p: p["bpd"].update(variances=["learned"]), "bpd.variances"),
    ("features", lambda p: p["fid"].update(features="clip"), "fid.features"),
    ("fid", lambda p: p["fid"].update(kid_subset_size=1), "fid.kid_subset_size"),
    ("sample", lambda p: p["variants"].update(bad={"los": "vlb"}), "variants.bad.los"),
    ("train", lambda p: p.update(variants=[{"name": "a"}]), "variants: expected a mapping"),
    ("report", lambda p: p.update(schedule="cosin"), "schedule"),
    ("track", lambda p: p["mlflow"].update(experimnt="x"), "mlflow.experimnt"),
    ("bpd", lambda p: p["bpd"].update(steps=[1]), "bpd.steps"),
    ("nll", lambda p: p["nll"].update(rtol=0), "nll.rtol"),
    ("train", lambda p: p["variants"]["simple"].update(loss="hybrid"), "variants.simple.var_type"),
    ("prepare", lambda p: p.update(variants={1: p["variants"]["simple"]}), "variants.1"),
    # DVC tracks data/raw only: data anywhere else would go stale unnoticed
    ("prepare", lambda p: p["data"].update(dataset="npz", path="/tmp/elsewhere.npz"), "data.path"),
    ("prepare", lambda p: p["data"].update(dataset="npz", path="data/raw/../x.npz"), "data.path"),
]
assert {s for s, _, _ in CASES} == {"prepare", "train", "sample", "bpd", "nll", "features",
                                   "fid", "report", "track"}


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "mutate", "key"), CASES,
                         ids=[f"{s}-{k}" for s, _, k in CASES])
def test_bad_value_fails_before_work_with_one_line_naming_the_key(tmp_path, stage, mutate, key):
    p = tiny_params()
    mutate(p)
    # outputs of an earlier run must survive the failed one
    sentinels = [tmp_path / "data" / "prepared" / "info.json",
                 tmp_path / "samples" / "simple" / "index.json",
                 tmp_path / "metrics" / "bpd" / "simple.json", tmp_path / "reports" / "report.md"]
    for s in sentinels:
        s.parent.mkdir(parents=True, exist_ok=True)
        s.write_text("earlier output")
    r = run_stage(stage, tmp_path, p, env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"})
    assert_one_line_error(r, key)
    assert all(s.read_text() == "earlier output" for s in sentinels)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "m.db").exists()


@pytest.mark.slow
def test_invalid_yaml_names_the_line(tmp_path):
    r = run_stage("prepare", tmp_path, "schedule: linear\ntrain: [\n")
    assert_one_line_error(r, "params.yaml")


@pytest.mark.slow
def test_nan_loss_exits_nonzero_and_marks_the_mlflow_run_failed(tmp_path):
    from mlflow.tracking import MlflowClient

    p = tiny_params()
    p["variants"] = {"simple": p["variants"]["simple"]}
    assert run_stage("prepare", tmp_path, p).returncode == 0
    p["train"].update(lr=1e30, warmup_steps=0, grad_clip=1e30)
    db = f"sqlite:///{tmp_path}/mlflow.db"
    r = run_stage("train", tmp_path, p, env={"MLFLOW_TRACKING_URI": db})
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "NaN" in r.stderr
    client = MlflowClient(db)
    runs = client.search_runs([client.get_experiment_by_name("ddpm").experiment_id])
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FAILED"}
    assert any("NaN" in r.data.tags.get("ddpm.error", "") for r in runs)
    assert not (tmp_path / "models" / "simple.pt").exists()


@pytest.mark.slow
def test_a_per_variant_stage_names_an_unknown_variant(tmp_path):
    r = run_stage("sample", tmp_path, tiny_params(), variant="nope")
    assert_one_line_error(r, "variants.nope: no such variant")


def test_hflip_auto_is_resolved_where_mlflow_reads_it():
    from pipeline.params import params_from_dict, to_dict

    p = tiny_params()
    assert p["train"]["hflip"] == "auto"
    digits = params_from_dict(p)
    assert digits.train.hflip is False and to_dict(digits)["train"]["hflip"] is False
    p["data"].update(dataset="cifar10")
    assert params_from_dict(p).train.hflip is True
    p["train"]["hflip"] = False
    assert params_from_dict(p).train.hflip is False


@pytest.mark.slow
def test_a_batch_larger_than_the_training_split_is_a_params_error_before_training(tmp_path):
    p = tiny_params()
    assert run_stage("prepare", tmp_path, p).returncode == 0
    p["train"]["batch_size"] = 100000
    r = run_stage("train", tmp_path, p)
    assert_one_line_error(r, "train.batch_size")
    assert "training images" in r.stderr
    assert not (tmp_path / "models").exists()


def test_out_of_memory_is_one_line_naming_the_batch_params(monkeypatch, capsys):
    import torch

    from pipeline.common import run_stage as run

    def main(params):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as e:
        run(main)
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: out of memory")
    assert "sample.batch_size" in err[0] and "bpd.t_batch" in err[0]
