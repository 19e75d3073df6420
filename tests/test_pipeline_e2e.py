"""End to end: the real pipeline (real DVC in a temporary git repo, real MLflow store, real
torch-fidelity) at tiny settings. Covers `dvc repro`, an idempotent re-run, `dvc exp run -S
schedule=cosine` with `dvc exp show`, and evaluating a pretrained checkpoint without training."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import REPO, tiny_params

BIN = Path(sys.executable).parent
COPY = ["ddpm_core", "pipeline", "dvc.yaml", "pyproject.toml", "README.md", ".gitignore"]
DVC = str(BIN / "dvc")


def sh(cmd: list[str], cwd: Path, env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr}"
    return r


def e2e_params() -> dict:
    p = tiny_params()
    p["variants"] = p["variants"][:2]  # simple (L_simple) and vlb (L_vlb, fixed Σ)
    return p


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    for name in COPY:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, root / name)
    (root / "params.yaml").write_text(yaml.safe_dump(e2e_params(), sort_keys=False))
    # as after the README's install: <root>/.venv holds the project (pipeline/run.py finds it)
    (root / ".venv").symlink_to(BIN.parent, target_is_directory=True)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "DVC_", "GIT_DIR", "GIT_WORK_TREE", "VIRTUAL_ENV",
                                "DDPM_"))}
    # the venv is NOT on PATH: `.venv/bin/dvc repro` must work without activating it
    env["PATH"] = os.pathsep.join(d for d in env.get("PATH", "").split(os.pathsep)
                                  if Path(d).resolve() != BIN.resolve())
    env.update(
               GIT_AUTHOR_NAME="e2e", GIT_AUTHOR_EMAIL="e2e@example.com",
               GIT_COMMITTER_NAME="e2e", GIT_COMMITTER_EMAIL="e2e@example.com",
               DVC_NO_ANALYTICS="1")
    sh(["git", "init", "-q"], root, env)
    sh([DVC, "init", "-q"], root, env)
    sh(["git", "add", "-A"], root, env)
    sh(["git", "commit", "-qm", "pipeline"], root, env)
    first = sh([DVC, "repro"], root, env)
    return root, env, first


def runs(root: Path) -> list:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{root}/mlflow.db")
    return c.search_runs([c.get_experiment_by_name("ddpm").experiment_id], max_results=1000)


@pytest.mark.slow
def test_repro_writes_every_output(repo):
    root, _, _ = repo
    p = e2e_params()
    T, n = p["diffusion"]["timesteps"], p["sample"]["num_samples"]
    index = json.loads((root / "samples" / "index.json").read_text())
    assert list(index) == ["simple", "vlb"]
    expected = {"ancestral_fixed_large", "ancestral_fixed_small", "respaced_S2", "ddim_S2"}
    for name in index:
        assert set(index[name]["samplers"]) == expected
        for s in expected:
            x = np.load(root / "samples" / name / f"{s}.npy")
            assert x.dtype == np.uint8 and x.shape == (n, 8, 8, 1)
            assert (root / "samples" / name / f"{s}.png").stat().st_size > 0
    # bits/dim: totals are the sum of the saved per-term breakdown (L_T + ... + L_0)
    bpd = json.loads((root / "metrics" / "bpd.json").read_text())
    for name in index:
        lines = (root / "bpd" / f"{name}.csv").read_text().splitlines()
        header, rows = lines[0].split(","), [ln.split(",") for ln in lines[1:]]
        assert header[:2] == ["term", "t"] and len(rows) == T + 1
        assert rows[0][0] == "L_T" and rows[-1][0] == "L_0"
        for col, key in ((2, "bpd_sigma2_beta"), (3, "bpd_sigma2_beta_tilde")):
            total = sum(float(r[col]) for r in rows)
            assert abs(total - bpd[name][key]) < 1e-3 * max(1.0, total)
    fid = json.loads((root / "metrics" / "fid.json").read_text())["fid_digits_classifier"]
    assert fid["floor_test_vs_train"] >= 0
    assert all(np.isfinite(fid[m][s]) for m in index for s in expected)
    loss = (root / "plots" / "loss" / "simple.csv").read_text().splitlines()
    assert loss[0].startswith("step,loss") and len(loss) == 1 + p["train"]["steps"]
    assert (root / "reports" / "report.html").read_text().count("data:image/png;base64,") >= 4
    assert "FID (digits classifier)" in (root / "reports" / "report.md").read_text()
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert set(lock) == {"prepare", "train", "sample", "bpd", "fid", "report", "track"}
    # MLflow: one parent, one nested run per variant with its metrics and loss history
    rs = runs(root)
    parents = [r for r in rs if r.data.tags["ddpm.level"] == "parent"]
    variants = {r.info.run_name: r for r in rs if r.data.tags["ddpm.level"] == "variant"}
    assert len(parents) == 1 and set(variants) == {"simple", "vlb"}
    assert parents[0].data.tags["git.revision"] != "unknown"
    m = variants["simple"].data.metrics
    assert m["bpd_sigma2_beta"] == bpd["simple"]["bpd_sigma2_beta"]
    assert m["fid_ancestral_fixed_large"] == fid["simple"]["ancestral_fixed_large"]
    assert "final_loss" in m and "loss" in m


@pytest.mark.slow
def test_rerun_and_sampling_change_rerun_only_what_changed(repo):
    root, env, _ = repo
    before = {r.info.run_id for r in runs(root)}
    again = sh([DVC, "repro"], root, env)
    assert "Running stage 'train'" not in again.stdout
    assert "already logged" in again.stdout
    assert {r.info.run_id for r in runs(root)} == before
    # a sampling parameter re-runs sampling (and what reads it), never training
    dry = sh([DVC, "status"], root, env)
    assert "train" not in dry.stdout
    p = yaml.safe_load((root / "params.yaml").read_text())
    p["sample"]["grid_size"] = 9
    (root / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    st = sh([DVC, "status"], root, env).stdout
    assert "sample:" in st and "train:" not in st and "bpd:" not in st
    p["sample"]["grid_size"] = 4
    (root / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))


@pytest.mark.slow
def test_exp_run_cosine_shows_both_experiments(repo):
    root, env, _ = repo
    sh(["git", "add", "-A"], root, env)
    sh(["git", "commit", "-qm", "baseline results"], root, env)
    sh([DVC, "exp", "run", "-S", "schedule=cosine", "-n", "cosine"], root, env)
    shown = json.loads(sh([DVC, "exp", "show", "--json"], root, env).stdout)
    found = {}

    def walk(node):
        if isinstance(node, dict):
            data = node.get("data") if isinstance(node.get("data"), dict) else None
            if data and "params" in data and "metrics" in data:
                sched = data["params"]["params.yaml"]["data"]["schedule"]
                bpd = data["metrics"].get("metrics/bpd.json", {}).get("data", {})
                if bpd:
                    found[(node.get("name") or data.get("name") or data.get("rev"), sched)] = bpd
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(shown)
    scheds = {s for _, s in found}
    assert scheds == {"linear", "cosine"}, found.keys()
    rs = runs(root)
    variants = [r for r in rs if r.data.tags["ddpm.level"] == "variant"]
    assert {(r.info.run_name, r.data.params["schedule"]) for r in variants} == {
        ("simple", "linear"), ("vlb", "linear"), ("simple", "cosine"), ("vlb", "cosine")}
    cos = next(r for r in rs if r.data.tags["ddpm.level"] == "parent"
               and r.data.tags["schedule"] == "cosine")
    assert cos.data.tags["dvc.exp_name"] == "cosine"


@pytest.mark.slow
def test_pretrained_checkpoint_is_evaluated_without_training(repo):
    root, env, _ = repo
    sh(["git", "checkout", "-q", "--", "params.yaml"], root, env)  # the linear baseline
    ckpts = sorted((root / "checkpoints" / "simple").rglob("ckpt_*.pt"))
    assert ckpts, "the train stage left no checkpoint"
    made = root / "external" / "ours.pt"  # a checkpoint file the test makes (outside outputs)
    made.parent.mkdir()
    shutil.copy(ckpts[-1], made)
    p = yaml.safe_load((root / "params.yaml").read_text())
    p["variants"] = []
    p["pretrained"].update(path=str(made), format="ours", name="mine")
    (root / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    out = sh([DVC, "repro"], root, env).stdout
    assert "train[" not in out  # nothing trained
    index = json.loads((root / "samples" / "index.json").read_text())
    assert list(index) == ["mine"]
    bpd = json.loads((root / "metrics" / "bpd.json").read_text())
    assert set(bpd["mine"]) == {"bpd_sigma2_beta", "bpd_sigma2_beta_tilde"}
    fid = json.loads((root / "metrics" / "fid.json").read_text())["fid_digits_classifier"]
    assert np.isfinite(fid["mine"]["ancestral_fixed_large"])
    assert "mine" in (root / "reports" / "report.md").read_text()
    assert any(r.info.run_name == "mine" for r in runs(root))
