"""`dvc repro` killed with SIGKILL (its whole process group) inside each stage in turn, then run
again to completion: the results are byte for byte those of an uninterrupted run, no temporary
file is left, git sees nothing new, and MLflow holds exactly one complete record (what the kill
left RUNNING is marked KILLED and deleted). Last, a bad params.yaml stops `dvc repro` in the
first stage it starts, before that stage writes anything.

Deterministic kill points without any hook in the product: tests/killpoint/sitecustomize.py is
put on the stages' PYTHONPATH, and the stage named in $DDPM_TEST_HOLD waits at a chosen point
(before its n-th atomic rename: a complete temporary file or folder, the real name not yet
written; or before the n-th call of a function) until the test has killed the process group.
The uninterrupted baseline run holds every stage at its start for a moment, so that the test
copies the repository as it was when that stage started; each kill test starts from the copy
for its stage, with DVC's cache of the whole baseline less the stage's own run-cache entry: the
stage runs (killed, then again), and the stages after it are restored from DVC's run cache,
which DVC does only when the rerun's outputs are the baseline's byte for byte (minutes saved).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from helpers import DVC, pipeline_env, pipeline_repo, sh, tiny_params

pytestmark = pytest.mark.slow  # subprocess pipelines (README, Tests)

HOOK = Path(__file__).resolve().parent / "killpoint"
RESULTS = ("data/prepared", "models", "gamma", "heads", "samples", "grids", "bpd", "features",
           "fid", "metrics", "plots", "reports")  # timings/ are measurements, not results
ORDER = ["prepare", "train", "gamma", "nnhead", "sample", "bpd", "nll", "features", "fid",
         "report", "track"]  # DVC's order (dvc.repo.reproduce.plan_repro)
DVC_NAME = {s: f"{s}@simple" if s in ("train", "gamma", "nnhead", "sample", "bpd", "nll",
                                      "fid") else s for s in ORDER}
# Where each stage is killed, and what is then in place (globs) and what is not yet written.
# The stages working in units (ddpm_core.units) rename each unit into the scratch area
# .scratch/units/ as it is finished: the rerun reuses them all (UNITS_REUSED) and removes them.
UNIT = ".scratch/units/*/*.npz"
UNITS_REUSED = {"gamma": 1, "sample": 8, "bpd": 1, "nll": 2, "features": 8, "fid": 8}
KILL_AT = {
    # data/.tmp-prepared-*/ holds train.npy and test.npy, the labels not yet
    "prepare": ("rename:3", [], ["data/prepared"]),
    # the checkpoint of step 2 saved, that of step 4 complete under its temporary name
    "train": ("rename:3", ["checkpoints/simple/*/ckpt_00000002.pt"],
              ["checkpoints/simple/*/ckpt_00000004.pt", "models/simple.pt"]),
    # the one unit of Γ in the scratch area, gamma/simple.json complete under its temporary name
    "gamma": ("rename:2", [UNIT], ["gamma/simple.json"]),
    # heads/.tmp-simple-*/ holds heads.pt and info.json, not yet renamed
    "nnhead": ("rename:3", [], ["heads/simple"]),
    # the 8 sample sets' units (one each) and grids written (renames 1-16), then index.json
    # (17): samples/.tmp-simple-*/ and grids/.tmp-simple-*/ complete, neither renamed (18)
    "sample": ("rename:18", [UNIT], ["samples/simple", "grids/simple"]),
    # the bound's one unit, then bpd/simple.csv in place
    "bpd": ("rename:3", [UNIT, "bpd/simple.csv"], ["plots/bpd_steps/simple.csv",
                                                   "metrics/bpd/simple.json"]),
    # both dequantizations' units (one each) in place, metrics/nll/simple.json complete under
    # its temporary name, timings/nll not yet written
    "nll": ("rename:3", [UNIT], ["metrics/nll/simple.json"]),
    # the classifier (1), the reference's 6 units of 256 training images (2-7), reference.npz
    # (8), the floor's 2 units (9-10), info.json (11) and features/ (12) in place
    "features": ("rename:13", [UNIT, "features/info.json"], ["metrics/features.json"]),
    # the sample sets' features (one unit each; the three respaced S = 2 sets are the same
    # images, so one unit: renames 1-6), then fid/simple.json (7)
    "fid": ("rename:8", [UNIT, "fid/simple.json"], ["metrics/fid/simple.json"]),
    "report": ("rename:4", ["reports/figures", "reports/report.md"], ["reports/report.html"]),
    # the parent and variant runs and the first sampler's run created, the rest not
    "track": ("pipeline.tracking.log_batch:3", [], []),
}


def ran(out: str) -> set[str]:
    return {ln.split("'")[1] for ln in out.splitlines() if ln.startswith("Running stage '")}


def results(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for d in RESULTS
            for p in sorted((root / d).rglob("*")) if p.is_file()}


def leftovers(root: Path) -> list[str]:
    """Temporary files and folders of the atomic writers (outermost only)."""
    found = sorted(p.relative_to(root) for p in root.rglob(".tmp-*"))
    return [str(p) for p in found if not any(q.name.startswith(".tmp-") for q in p.parents)]


def git_status(root: Path, env: dict) -> set[str]:
    return set(sh(["git", "status", "--porcelain"], root, env).stdout.splitlines())


def lock_results(root: Path) -> dict:
    """dvc.lock without the timings' hashes (measurements differ from run to run)."""
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    for st in lock.values():
        st["outs"] = [o for o in st.get("outs", []) if not o["path"].startswith("timings")]
    return lock


def mlflow_runs(root: Path) -> list:
    """Every run in the repository's store (deleted ones included)."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    if not (root / "mlflow.db").is_file():
        return []
    c = MlflowClient(f"sqlite:///{root}/mlflow.db")
    exp = c.get_experiment_by_name("ddpm")
    if exp is None:
        return []
    return c.search_runs([exp.experiment_id], max_results=1000, run_view_type=ViewType.ALL)


def record(runs: list) -> list[tuple]:
    """The active runs as (level, name, status, complete tag, metrics without timings)."""
    return sorted((r.data.tags.get("ddpm.level"), r.info.run_name, r.info.status,
                   r.data.tags.get("ddpm.complete"), sorted(
                       (k, v) for k, v in r.data.metrics.items() if not k.endswith("_seconds")))
                  for r in runs if r.info.lifecycle_stage == "active")


def run_cache(root: Path) -> set[str]:
    """DVC's run-cache entries (`runs/<key[:2]>/<key[2:]>`: one per stage and inputs)."""
    runs = root / ".dvc" / "cache" / "runs"
    return {str(p.relative_to(runs)) for p in runs.glob("*/*")} if runs.is_dir() else set()


def _gone(pid: int) -> bool:
    """The process has exited (a zombie counts: it runs nothing)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def _wait_held(proc: subprocess.Popen, hold: Path, log: Path, timeout: float = 600) -> str:
    """The `held` line of the stage waiting at its point; fails if `dvc repro` ends first."""
    t0 = time.monotonic()
    while not (hold / "held").exists():
        if proc.poll() is not None:
            raise AssertionError(f"dvc repro ended ({proc.returncode}) before the hold point:\n"
                                 + log.read_text()[-3000:])
        assert time.monotonic() - t0 < timeout, "no stage reached the hold point"
        time.sleep(0.05)
    return (hold / "held").read_text().strip()


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """An uninterrupted `dvc repro`; `snap/<stage>` is the repository as `<stage>` started."""
    base = tmp_path_factory.mktemp("kill")
    root, snaps, hold = base / "base", base / "snap", base / "hold"
    hold.mkdir()
    p = tiny_params()
    p["variants"] = {"simple": p["variants"]["simple"]}
    env = pipeline_env()
    pipeline_repo(root, p, env)
    log = base / "baseline.log"
    held_env = {**env, "PYTHONPATH": str(HOOK), "DDPM_TEST_HOLD": "*:start:0",
                "DDPM_TEST_HOLD_DIR": str(hold)}
    with log.open("w") as out:
        proc = subprocess.Popen([DVC, "repro"], cwd=root, env=held_env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        for stage in ORDER:
            _pid, held_stage, _point = _wait_held(proc, hold, log).split(" ", 2)
            assert held_stage == stage  # DVC runs them in this order
            shutil.copytree(root, snaps / stage, symlinks=True,
                            ignore=lambda d, names: ["tmp"] if Path(d) == root / ".dvc" else [])
            (hold / "held").unlink()
            (hold / "release").touch()
        assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert ran(log.read_text()) == set(DVC_NAME.values())
    runs = mlflow_runs(root)
    # each stage's entries in DVC's run cache: those added while it ran
    entries = [run_cache(snaps / s) for s in ORDER] + [run_cache(root)]
    own = {s: entries[i + 1] - entries[i] for i, s in enumerate(ORDER)}
    assert all(own[s] for s in ORDER if s != "track"), own  # track is always_changed: none
    return {"root": root, "snaps": snaps, "env": env, "results": results(root), "own": own,
            "lock": lock_results(root), "git": git_status(root, env), "runs": record(runs),
            "key": next(r.data.tags["ddpm.key"] for r in runs
                        if r.data.tags.get("ddpm.level") == "parent")}


@pytest.mark.parametrize("stage", ORDER)
def test_killed_inside_a_stage_then_rerun_loses_nothing(baseline, stage, tmp_path):
    root, hold, log = tmp_path / "repo", tmp_path / "hold", tmp_path / "killed.log"
    hold.mkdir()
    shutil.copytree(baseline["snaps"] / stage, root, symlinks=True)
    # DVC's cache as after the whole baseline, less this stage's run-cache entry: the stage
    # really runs (and is killed, and runs again), the stages after it, given the same inputs,
    # are restored from the run cache (which only happens if the rerun's outputs are the
    # baseline's byte for byte), and track logs to the new store
    shutil.copytree(baseline["root"] / ".dvc" / "cache", root / ".dvc" / "cache",
                    dirs_exist_ok=True)
    for entry in baseline["own"][stage]:
        shutil.rmtree(root / ".dvc" / "cache" / "runs" / entry)
    env = baseline["env"]
    point, present, absent = KILL_AT[stage]
    held_env = {**env, "PYTHONPATH": str(HOOK), "DDPM_TEST_HOLD": f"{stage}:{point}",
                "DDPM_TEST_HOLD_DIR": str(hold)}
    with log.open("w") as out:
        proc = subprocess.Popen([DVC, "repro"], cwd=root, env=held_env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    held_pid = None
    try:
        pid, held_stage, _ = _wait_held(proc, hold, log).split(" ", 2)
        held_pid = int(pid)
        assert held_stage == stage
        os.killpg(proc.pid, signal.SIGKILL)  # dvc, the shell, the stage: the whole group
        proc.wait(timeout=60)
        t0 = time.monotonic()
        while not _gone(held_pid) and time.monotonic() - t0 < 30:
            time.sleep(0.05)
        assert _gone(held_pid), "the stage process outlived the kill of the process group"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if held_pid is not None and not _gone(held_pid):
            os.kill(held_pid, signal.SIGKILL)
    assert ran(log.read_text()) == {DVC_NAME[stage]}  # killed in the first stage it ran
    assert all(list(root.glob(g)) for g in present), present
    assert not [p for g in absent for p in root.glob(g)], absent
    left = leftovers(root)
    running = [r for r in mlflow_runs(root) if r.info.status == "RUNNING"]
    if stage == "track":  # the kill came in the middle of logging
        assert len(running) == 3 and not left, (running, left)  # parent, variant, sampler
    else:  # the kill came in the middle of writing: a temporary copy was left
        assert left and not running, (left, running)
    print(f"\nkill[{stage}] at {point}: left {left or 'no temporary file'}, "
          f"{len(running)} MLflow run(s) RUNNING")

    again = sh([DVC, "repro"], root, env)
    assert ran(again.stdout) == {DVC_NAME[stage], "track"}, again.stdout
    for later in ORDER[ORDER.index(stage) + 1:-1]:
        assert f"Stage '{DVC_NAME[later]}' is cached - skipping run" in again.stdout, later
    label = stage if stage == "features" else f"{stage}[simple]"
    units = [ln for ln in again.stdout.splitlines() if ln.startswith(f"{label}: units")]
    if stage in UNITS_REUSED:  # every unit was finished before the kill: none computed again
        assert units == [f"{label}: units 0 computed, {UNITS_REUSED[stage]} reused"], (
            again.stdout)
    else:
        assert units == [], again.stdout
    assert not (root / ".scratch" / "units").exists()
    if stage == "train":  # the rerun resumed from the checkpoint the kill left
        assert "resumed from" in again.stdout and "ckpt_00000002.pt" in again.stdout
    got = results(root)
    metrics = sorted(k for k in baseline["results"] if k.startswith("metrics/"))
    assert metrics and all(got.get(k) == baseline["results"][k] for k in metrics), [
        k for k in metrics if got.get(k) != baseline["results"][k]]
    assert sorted(got) == sorted(baseline["results"])
    assert [k for k in got if got[k] != baseline["results"][k]] == []
    assert lock_results(root) == baseline["lock"]
    assert leftovers(root) == []
    assert git_status(root, env) == baseline["git"]
    status = json.loads(sh([DVC, "status", "--json"], root, env).stdout)
    assert status == {"track": ["always changed"]}, status
    # MLflow: the same complete record as the uninterrupted run, under the same key; what the
    # kill left RUNNING is now KILLED (and deleted with its tree before the tree was rewritten)
    runs = mlflow_runs(root)
    assert record(runs) == baseline["runs"]
    assert [r.data.tags["ddpm.key"] for r in runs if r.info.lifecycle_stage == "active"
            and r.data.tags.get("ddpm.level") == "parent"] == [baseline["key"]]
    assert not [r for r in runs if r.info.status == "RUNNING"]
    deleted = [r for r in runs if r.info.lifecycle_stage == "deleted"]
    assert sorted(r.info.run_id for r in deleted) == sorted(r.info.run_id for r in running)
    assert all(r.info.status == "KILLED" for r in deleted)
    print(f"kill[{stage}] rerun: ran {sorted(ran(again.stdout))}; MLflow: "
          f"{len(runs) - len(deleted)} active runs, {len(deleted)} KILLED and deleted")


# ----------------------------------------------------------------------------- bad params
# Every stage loads and validates the whole params.yaml before any work (pipeline.common.
# run_stage), so a key that no stage tracks (an unknown top-level key) stops the first stage
# DVC starts: prepare in a new repository, track (always run) in a finished one.


def _add_unknown_key(root: Path) -> None:
    path = root / "params.yaml"
    path.write_text(path.read_text() + "bogus: 1\n")


def _error_lines(r: subprocess.CompletedProcess) -> list[str]:
    return [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("error:")]


UNKNOWN = ("error: bogus: unknown key; delete it or use one of params.yaml's keys: bpd, data, "
           "diffusion, fid, gamma, mlflow, model, nll, nnhead, sample, schedule, train, variants")


def test_an_unknown_top_level_key_stops_a_new_repro_before_prepare_writes(baseline, tmp_path):
    root = tmp_path / "repo"
    shutil.copytree(baseline["snaps"] / "prepare", root, symlinks=True)  # nothing run yet
    _add_unknown_key(root)
    r = subprocess.run([DVC, "repro"], cwd=root, env=baseline["env"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode != 0
    assert _error_lines(r) == [UNKNOWN], r.stdout + r.stderr
    assert ran(r.stdout) == {"prepare"}
    assert not (root / "data" / "prepared").exists() and not (root / "dvc.lock").exists()
    assert leftovers(root) == []


def test_an_unknown_top_level_key_in_a_finished_repo_fails_and_changes_nothing(baseline,
                                                                                tmp_path):
    root = tmp_path / "repo"
    shutil.copytree(baseline["root"], root, symlinks=True,
                    ignore=lambda d, names: ["tmp"] if Path(d) == baseline["root"] / ".dvc"
                    else [])
    every = {str(p.relative_to(root)): p.read_bytes() for d in (*RESULTS, "timings")
             for p in sorted((root / d).rglob("*")) if p.is_file()}
    lock = (root / "dvc.lock").read_bytes()
    _add_unknown_key(root)
    r = subprocess.run([DVC, "repro"], cwd=root, env=baseline["env"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode != 0
    assert _error_lines(r) == [UNKNOWN], r.stdout + r.stderr
    assert ran(r.stdout) == {"track"}  # the only stage DVC starts: no other stage's params changed
    after = {str(p.relative_to(root)): p.read_bytes() for d in (*RESULTS, "timings")
             for p in sorted((root / d).rglob("*")) if p.is_file()}
    assert sorted(after) == sorted(every)
    assert [k for k in every if after[k] != every[k]] == []
    assert (root / "dvc.lock").read_bytes() == lock
    assert record(mlflow_runs(root)) == baseline["runs"] and len(mlflow_runs(root)) == len(
        baseline["runs"])
