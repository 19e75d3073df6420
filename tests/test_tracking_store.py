"""The MLflow store under faults: concurrent first use of a new sqlite store, concurrent "log
once" with the same key, runs left RUNNING by a killed process, and a tracking server that is
down (a real `mlflow server` on 127.0.0.1, stopped and started again)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import free_port, start_mlflow_server, stop_mlflow_server

REPO = Path(__file__).resolve().parents[1]

# One `track`-like process: open the store under its lock and log the tree of KEY once.
LOG_ONCE = r"""
import sys, time

from pipeline.params import params_from_dict
from pipeline.tracking import COMPLETE_TAG, create_run, log_once, store

key = sys.argv[1]
params = params_from_dict({})

def write():
    time.sleep(0.3)  # widen the window in which a second writer would duplicate the tree
    parent = create_run(client, exp_id, key, key, "parent")
    child = create_run(client, exp_id, key + "/v", key + "/v", "variant", parent)
    for run in (child, parent):
        client.set_tag(run, COMPLETE_TAG, "true")
        client.set_terminated(run, "FINISHED")
    return parent

with store(params) as (client, exp_id):
    parent, new = log_once(client, exp_id, key, write)
print("RESULT", "new" if new else "found", parent)
"""


def _result(stdout: str) -> list[str]:
    """The RESULT line of LOG_ONCE (MLflow prints its own lines too)."""
    return next(x.split()[1:] for x in stdout.splitlines() if x.startswith("RESULT "))


def _env(uri: str, **extra: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": uri, **extra}
    env.pop("DDPM_MLFLOW_TIMEOUT", None)
    env.update(extra)
    return env


def _runs(uri: str) -> list:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("ddpm")
    from mlflow.entities import ViewType

    return c.search_runs([exp.experiment_id], max_results=1000, run_view_type=ViewType.ALL)


@pytest.mark.slow
def test_concurrent_track_on_a_new_store_logs_each_key_exactly_once(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    keys = ["a", "a", "a", "b", "c"]
    procs = [subprocess.Popen([sys.executable, "-c", LOG_ONCE, k], cwd=tmp_path, env=_env(uri),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k in keys]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
    assert sorted(_result(o)[0] for o, _ in outs) == ["found", "found", "new", "new", "new"]
    runs = _runs(uri)
    parents = [r for r in runs if r.data.tags["ddpm.level"] == "parent"]
    assert sorted(r.data.tags["ddpm.key"] for r in parents) == ["a", "b", "c"]
    assert len(runs) == 6 and all(r.info.status == "FINISHED" for r in runs)
    assert all(r.info.lifecycle_stage == "active" for r in runs)
    from mlflow.tracking import MlflowClient

    exp = MlflowClient(uri).get_experiment_by_name("ddpm")  # the UI's model-training view
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"


@pytest.mark.slow
def test_runs_left_running_by_a_kill_are_marked_killed_when_the_rerun_logs(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    from pipeline.params import params_from_dict
    from pipeline.tracking import create_run, store

    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        with store(params_from_dict({})) as (client, exp_id):
            half = create_run(client, exp_id, "a", "a", "parent")  # killed before complete
            orphan = create_run(client, exp_id, "a/v", "a/v", "variant", half)
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    r = subprocess.run([sys.executable, "-c", LOG_ONCE, "a"], cwd=tmp_path, env=_env(uri),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    c = MlflowClient(uri)
    for run_id in (half, orphan):
        old = c.get_run(run_id)
        assert old.info.status == "KILLED" and old.info.lifecycle_stage == "deleted"
    live = [x for x in _runs(uri) if x.info.lifecycle_stage == "active"]
    assert len(live) == 2 and all(x.info.status == "FINISHED" for x in live)
    assert all(x.info.run_id not in (half, orphan) for x in live)


@pytest.mark.slow
def test_tracking_server_down_is_one_line_within_the_timeout_then_logs_once_when_back(tmp_path):
    db = f"sqlite:///{tmp_path}/server.db"
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    proc = start_mlflow_server(db, port, tmp_path / "artifacts")
    stop_mlflow_server(proc)  # the store exists; the server is away

    (tmp_path / "params.yaml").write_text("{}\n")
    (tmp_path / "keep.txt").write_text("earlier output")
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "pipeline.track"], cwd=tmp_path,
                       env=_env(uri, DDPM_MLFLOW_TIMEOUT="3"), capture_output=True, text=True,
                       timeout=120)
    took = time.monotonic() - t0
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert took < 30, f"gave up after {took:.0f} s, not within seconds"
    line = r.stderr.strip()
    assert line.startswith("error: ") and uri in line and "not reachable" in line
    assert "MLFLOW_TRACKING_URI" in line
    assert (tmp_path / "keep.txt").read_text() == "earlier output"

    proc = start_mlflow_server(db, port, tmp_path / "artifacts")
    try:
        for expected in ("new", "found"):
            r = subprocess.run([sys.executable, "-c", LOG_ONCE, "a"], cwd=tmp_path,
                               env=_env(uri), capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, r.stderr[-2000:]
            assert _result(r.stdout)[0] == expected
    finally:
        stop_mlflow_server(proc)
    runs = [x for x in _runs(db) if x.data.tags["ddpm.level"] != "claim"]
    assert len(runs) == 2 and all(x.info.status == "FINISHED" for x in runs)


@pytest.mark.slow
def test_a_deleted_experiment_is_a_one_line_error(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    c = MlflowClient(uri)
    c.delete_experiment(c.create_experiment("ddpm"))
    r = subprocess.run([sys.executable, "-c", LOG_ONCE, "a"], cwd=tmp_path, env=_env(uri),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "deleted" in r.stderr.strip().splitlines()[-1]
    assert "mlflow experiments restore" in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("bad", ["::not a uri::", "foo://bar", "http://", "mlflow.db"])
def test_a_garbage_tracking_uri_is_one_line_naming_the_key_exit_2(tmp_path, bad):
    (tmp_path / "params.yaml").write_text(f"mlflow:\n  tracking_uri: {bad!r}\n")
    env = _env("")
    del env["MLFLOW_TRACKING_URI"]
    r = subprocess.run([sys.executable, "-m", "pipeline.track"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    line = r.stderr.strip()
    assert line.startswith("error: mlflow.tracking_uri: ") and repr(bad) in line
    assert "http://" in line and "sqlite:///" in line  # what a valid value looks like
    # the same value from the environment names the variable
    (tmp_path / "params.yaml").write_text("{}\n")
    r = subprocess.run([sys.executable, "-m", "pipeline.track"], cwd=tmp_path,
                       env=_env(bad), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: MLFLOW_TRACKING_URI: "), r.stderr
    assert "Traceback" not in r.stderr


def test_valid_tracking_uris_are_accepted():
    from pipeline.params import params_from_dict

    for uri in ("http://127.0.0.1:5000", "https://mlflow.example.org/", "sqlite:///mlflow.db",
                "sqlite:////abs/path/mlflow.db", "postgresql+psycopg2://u:p@host:5432/db",
                "mysql://u@h/db", "databricks", "file:///abs/mlruns"):
        assert params_from_dict({"mlflow": {"tracking_uri": uri}}).mlflow.tracking_uri == uri


@pytest.mark.slow
def test_the_server_dying_while_track_logs_is_one_line_and_the_next_run_repairs(tmp_path):
    """A hold point (tests/killpoint) stops `track` at its first log_batch, after the parent
    run exists; the server is killed there, then `track` goes on."""
    from helpers import make_outputs

    db = f"sqlite:///{tmp_path}/server.db"
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    work, hold = tmp_path / "work", tmp_path / "hold"
    work.mkdir(), hold.mkdir()
    make_outputs(work)
    proc = start_mlflow_server(db, port, tmp_path / "artifacts")
    try:
        env = _env(uri, DDPM_MLFLOW_TIMEOUT="3", DDPM_TEST_HOLD_DIR=str(hold),
                   DDPM_TEST_HOLD="track:pipeline.tracking.log_batch:1",
                   PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests' / 'killpoint'}")
        track = subprocess.Popen([sys.executable, "-m", "pipeline.track"], cwd=work, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while not (hold / "held").exists():
            assert track.poll() is None and time.monotonic() < deadline, track.communicate()
            time.sleep(0.1)
    finally:
        stop_mlflow_server(proc)
    t0 = time.monotonic()
    (hold / "release").write_text("")
    out, err = track.communicate(timeout=120)
    assert track.returncode == 1, (out, err)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    line = err.strip()
    assert line.startswith("error: mlflow: ") and uri in line and "stopped answering" in line
    assert time.monotonic() - t0 < 60

    # the server back: the half-written tree is replaced by one complete tree
    proc = start_mlflow_server(db, port, tmp_path / "artifacts")
    try:
        env = _env(uri, PYTHONPATH=str(REPO))
        r = subprocess.run([sys.executable, "-m", "pipeline.track"], cwd=work, env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    finally:
        stop_mlflow_server(proc)
    live = [x for x in _runs(db) if x.info.lifecycle_stage == "active"
            and x.data.tags.get("ddpm.level") in ("parent", "variant", "sampler")]
    assert sum(x.data.tags["ddpm.level"] == "parent" for x in live) == 1
    assert all(x.info.status == "FINISHED" for x in live)


def _tree(db: str) -> list:
    """The active runs of our run trees (no claim runs)."""
    return [x for x in _runs(db) if x.info.lifecycle_stage == "active"
            and x.data.tags.get("ddpm.level") in ("parent", "variant", "sampler")]


@pytest.mark.slow
def test_two_clones_tracking_the_same_results_to_one_server_log_one_tree(tmp_path):
    """Clone A's `track` is held (tests/killpoint) after writing its parent run; clone B's
    `track` of the same results must neither delete A's runs nor log a second tree: it waits
    for A (or, with a short wait, skips with one line), and both exit 0."""
    from helpers import FID, make_outputs

    db = f"sqlite:///{tmp_path}/server.db"
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    a, b, hold = tmp_path / "clone_a", tmp_path / "clone_b", tmp_path / "hold"
    for d in (a, b, hold):
        d.mkdir()
    for root in (a, b):
        make_outputs(root)
    track = [sys.executable, "-m", "pipeline.track"]
    pipe = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc = start_mlflow_server(db, port, tmp_path / "artifacts")
    try:
        held = subprocess.Popen(track, cwd=a, **pipe, env=_env(
            uri, DDPM_TEST_HOLD="track:pipeline.tracking.log_batch:1",
            DDPM_TEST_HOLD_DIR=str(hold),
            PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests' / 'killpoint'}"))
        deadline = time.monotonic() + 120
        while not (hold / "held").exists():
            assert held.poll() is None and time.monotonic() < deadline, held.communicate()
            time.sleep(0.1)
        quick = subprocess.run(track, cwd=b, env=_env(uri, DDPM_MLFLOW_CLAIM_WAIT="2"),
                               capture_output=True, text=True, timeout=120)
        assert quick.returncode == 0, (quick.stdout, quick.stderr)
        assert "Traceback" not in quick.stderr, quick.stderr
        (skip,) = [x for x in quick.stdout.splitlines() if "skipped" in x]
        assert skip.startswith("track: ") and "another process" in skip
        waiter = subprocess.Popen(track, cwd=b, env=_env(uri), **pipe)
        first = ""
        while "waiting" not in first and waiter.poll() is None:
            first = waiter.stdout.readline()
        assert "waiting" in first, (first, waiter.communicate())
        (hold / "release").write_text("")
        outs = [p.communicate(timeout=300) for p in (held, waiter)]
    finally:
        stop_mlflow_server(proc)
    for p, (out, err) in zip((held, waiter), outs, strict=True):
        assert p.returncode == 0 and "Traceback" not in err, (out, err)
    assert "logged parent run" in outs[0][0] and "already logged" in outs[1][0]
    runs = _tree(db)
    assert sorted(r.data.tags["ddpm.level"] for r in runs) == (
        ["parent"] + ["sampler"] * 2 * len(FID) + ["variant"] * 2)
    assert all(r.info.status == "FINISHED" for r in runs)
    assert not [r for r in _runs(db) if r.info.status == "RUNNING"]  # no claim left behind


@pytest.mark.slow
def test_a_claim_of_a_dead_writer_on_a_server_is_taken_over_and_its_tree_repaired(tmp_path):
    """A claim whose heartbeat stopped (its writer was killed) and the half-written tree it
    left: the next writer of the key waits DDPM_MLFLOW_CLAIM_STALE seconds, marks both KILLED,
    deletes them and writes the tree once."""
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import CLAIM_TAG, LEVEL_TAG

    db = f"sqlite:///{tmp_path}/server.db"
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    proc = start_mlflow_server(db, port, tmp_path / "artifacts")
    try:
        c = MlflowClient(uri)
        exp_id = c.create_experiment("ddpm")
        dead = c.create_run(exp_id, run_name="claim a", tags={CLAIM_TAG: "a",
                                                              LEVEL_TAG: "claim"}).info.run_id
        half = c.create_run(exp_id, run_name="a", tags={"ddpm.key": "a",
                                                        LEVEL_TAG: "parent"}).info.run_id
        r = subprocess.run([sys.executable, "-c", LOG_ONCE, "a"], cwd=tmp_path,
                           env=_env(uri, DDPM_MLFLOW_CLAIM_STALE="3"), capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        assert _result(r.stdout)[0] == "new"
    finally:
        stop_mlflow_server(proc)
    c = MlflowClient(db)
    for run_id in (dead, half):
        old = c.get_run(run_id)
        assert old.info.status == "KILLED" and old.info.lifecycle_stage == "deleted"
    live = _tree(db)
    assert len(live) == 2 and all(x.info.status == "FINISHED" for x in live)


def test_track_imports_no_torch_before_it_needs_a_model_file():
    """The stage's own imports stay light, so a store that is away answers in seconds (the
    rest of the error path is pipeline.common's)."""
    code = "import sys, pipeline.track; print(sorted({'torch', 'mlflow'} & set(sys.modules)))"
    r = subprocess.run([sys.executable, "-c", code], env=_env("sqlite:///unused.db"),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", (r.stdout, r.stderr)
