"""Faults in a real DVC pipeline at tiny settings: a `dvc repro` that fails early (a bad
param) takes nothing away that `dvc checkout` cannot bring back byte for byte, and a forced
re-run of identical training is byte-identical: every downstream stage stays up to date and
MLflow gets no second record."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from helpers import DVC, pipeline_env, pipeline_repo, sh, tiny_params

pytestmark = pytest.mark.slow  # subprocess pipelines (README, Tests)

OUTPUTS = ("data/prepared", "models", "samples", "grids", "bpd", "features", "fid", "metrics",
           "plots", "reports")


def snapshot(root: Path) -> dict[str, bytes]:
    """Every result file (timings excluded: they are measurements, not results)."""
    return {str(p.relative_to(root)): p.read_bytes() for d in OUTPUTS
            for p in sorted((root / d).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    p = tiny_params()
    p["variants"] = {"simple": p["variants"]["simple"]}
    env = pipeline_env()
    root = pipeline_repo(tmp_path_factory.mktemp("faults"), p, env)
    sh([DVC, "repro"], root, env)
    return root, env


def _mlflow_parents(root: Path) -> list:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{root}/mlflow.db")
    exp = c.get_experiment_by_name("ddpm")
    return [r for r in c.search_runs([exp.experiment_id], max_results=1000)
            if r.data.tags.get("ddpm.level") == "parent"]


@pytest.mark.parametrize("key,value", [("diffusion.timesteps", 0),
                                       ("train.batch_size", 100000),
                                       ("sample.num_samples", 1)])
def test_failed_repro_then_dvc_checkout_brings_every_output_back(repo, key, value):
    root, env = repo
    good = (root / "params.yaml").read_text()
    before = snapshot(root)
    bad = yaml.safe_load(good)
    section, name = key.split(".")
    bad[section][name] = value
    (root / "params.yaml").write_text(yaml.safe_dump(bad, sort_keys=False))
    r = sh([DVC, "repro"], root, env, ok=False)
    assert r.returncode != 0
    assert f"error: {key}" in r.stderr + r.stdout
    (root / "params.yaml").write_text(good)
    sh([DVC, "checkout", "-f"], root, env)
    after = snapshot(root)
    assert sorted(after) == sorted(before)
    assert all(after[k] == before[k] for k in before), [k for k in before if after[k] != before[k]]
    assert not [p for p in root.rglob(".tmp-*")], "temporary files left behind"
    assert sh([DVC, "status", "--json"], root, env).stdout.strip() in ("{}", '{"track": '
                                                                       '["always changed"]}')


def test_forced_training_rerun_is_byte_identical_and_logs_no_second_record(repo):
    root, env = repo
    before = snapshot(root)
    parents = _mlflow_parents(root)
    assert len(parents) == 1
    sh([DVC, "repro", "-s", "-f", "train@simple"], root, env)
    assert snapshot(root) == before  # model file, loss curve and metrics byte for byte
    status = sh([DVC, "status"], root, env).stdout
    assert "sample@simple" not in status and "bpd@simple" not in status, status
    out = sh([DVC, "repro"], root, env).stdout
    assert "Running stage 'sample@simple'" not in out and "already logged" in out, out
    assert [p.info.run_id for p in _mlflow_parents(root)] == [parents[0].info.run_id]
