"""Two queued experiments run by two DVC queue workers at once, in a committed repository
without an MLflow store: all succeed, `dvc exp show` lists them, and the one new sqlite store
holds each result exactly once (2 parent runs and their children), with no "database is locked"
in any worker's log (the README's queue recipe, the venv on PATH)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from helpers import DVC, pipeline_env, pipeline_repo, sh, tiny_params

from pipeline.params import params_from_dict
from pipeline.records import sampler_specs

pytestmark = pytest.mark.slow  # subprocess pipelines (README, Tests)

EXPS = {"seed1": "train.seed=1", "cosine": "schedule=cosine"}


def queue_status(root: Path, env: dict) -> dict[str, str]:
    """{experiment name: Queued | Running | Success | Failed} from `dvc queue status`."""
    out = sh([DVC, "queue", "status"], root, env).stdout
    states = {}
    for line in out.splitlines():
        words = line.split()
        if len(words) >= 3 and words[1] in EXPS:
            states[words[1]] = words[-1]
    return states


def exp_names(node) -> set[str]:
    """Every experiment name in `dvc exp show --json`."""
    found = set()
    if isinstance(node, dict):
        if isinstance(node.get("name"), str):
            found.add(node["name"])
        for v in node.values():
            found |= exp_names(v)
    elif isinstance(node, list):
        for v in node:
            found |= exp_names(v)
    return found


def run_queue(root: Path, env: dict) -> None:
    """`dvc queue start -j 2`, then wait until nothing is queued or running. Its output goes
    to a file: the workers it starts inherit its stdout, so a pipe would stay open (and
    subprocess.run wait) until the last experiment ends."""
    try:
        with open(root.parent / "queue-start.log", "w") as log:
            r = subprocess.run([DVC, "queue", "start", "-j", "2"], cwd=root, env=env,
                               stdout=log, stderr=subprocess.STDOUT, timeout=300)
        assert r.returncode == 0, (root.parent / "queue-start.log").read_text()
        t0 = time.monotonic()
        while True:
            states = queue_status(root, env)
            if len(states) == len(EXPS) and not {"Queued", "Running"} & set(states.values()):
                return
            assert time.monotonic() - t0 < 1200, states
            time.sleep(10)
    finally:
        sh([DVC, "queue", "stop"], root, env, ok=False)


def test_two_workers_two_experiments_one_new_store_nothing_lost(tmp_path):
    p = tiny_params()
    p["variants"] = {"simple": p["variants"]["simple"]}
    env = pipeline_env(venv_on_path=True)  # the README's recipe: the workers are `dvc` from PATH
    root = pipeline_repo(tmp_path / "repo", p, env)
    for name, setting in EXPS.items():
        sh([DVC, "exp", "run", "--queue", "-S", setting, "-n", name], root, env)
    assert not (root / "mlflow.db").exists()
    assert set(queue_status(root, env).values()) == {"Queued"}
    run_queue(root, env)
    states = queue_status(root, env)
    logs = {n: sh([DVC, "queue", "logs", n], root, env).stdout for n in EXPS}
    assert states == dict.fromkeys(EXPS, "Success"), {n: logs[n][-2000:] for n in EXPS}
    assert not [log for log in logs.values() if "database is locked" in log.lower()]
    for log in logs.values():
        assert "track: logged parent run" in log, log[-2000:]
    shown = json.loads(sh([DVC, "exp", "show", "--json"], root, env).stdout)
    assert set(EXPS) <= exp_names(shown)

    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{root}/mlflow.db")
    exp = c.get_experiment_by_name("ddpm")
    runs = c.search_runs([exp.experiment_id], max_results=1000, run_view_type=ViewType.ALL)
    parents = [r for r in runs if r.data.tags["ddpm.level"] == "parent"]
    assert sorted(r.data.tags["dvc.exp_name"] for r in parents) == sorted(EXPS)
    assert len({r.data.tags["ddpm.key"] for r in parents}) == 2
    assert sorted(r.data.params["train.seed"] for r in parents) == ["0", "1"]
    assert sorted(r.data.params["schedule"] for r in parents) == ["cosine", "linear"]
    cfg = params_from_dict(p)
    samplers = len(sampler_specs(cfg.sample, cfg.diffusion.timesteps,
                                 cfg.variants["simple"].var_type))
    for parent in parents:  # each result whole: one variant run and one run per sampler
        pid = parent.info.run_id
        variants = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == pid]
        assert [r.info.run_name for r in variants] == ["simple"]
        vid = variants[0].info.run_id
        assert len([r for r in runs if r.data.tags.get("mlflow.parentRunId") == vid]) == samplers
        assert "fid_ancestral_beta" in variants[0].data.metrics
    assert len(runs) == 2 * (2 + samplers)
    assert all(r.info.status == "FINISHED" and r.info.lifecycle_stage == "active"
               for r in runs)
    assert all(r.data.tags.get("ddpm.complete") == "true" for r in runs)
