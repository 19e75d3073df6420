"""Inputs and signals a stage must answer with one line (issue 16, section 3): data outside
data/raw (DVC would not see it change), sample sets that cannot fit in RAM, Ctrl-C while
sampling (also when the shell started the pipeline with SIGINT ignored, as `dvc repro &` in a
script does) and SIGINT/SIGTERM before the training loop. The stages run as real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import REPO, run_stage, tiny_params
from test_params import assert_one_line_error

pytestmark = pytest.mark.slow  # subprocess pipelines (README, Tests)


def one_variant() -> dict:
    p = tiny_params()
    p["variants"] = {"simple": p["variants"]["simple"]}
    p["sample"]["variances"] = ["fixed_large"]  # no gamma stage needed
    return p


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A folder holding data/prepared and models/simple.pt of the tiny params."""
    root = tmp_path_factory.mktemp("trained")
    for stage in ("prepare", "train"):
        r = run_stage(stage, root, one_variant())
        assert r.returncode == 0, r.stderr
    return root


def start(stage: str, cwd: Path, params: dict, ignore_sigint: bool = False) -> subprocess.Popen:
    """`python -m pipeline.<stage> simple` in its own process group (a terminal's job)."""
    (cwd / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("DDPM_PARAMS", None)

    def pre() -> None:
        if ignore_sigint:  # what a non-interactive shell does to a background job
            signal.signal(signal.SIGINT, signal.SIG_IGN)

    return subprocess.Popen([sys.executable, "-m", f"pipeline.{stage}", "simple"], cwd=cwd,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=pre)


def test_data_under_data_raw_through_a_symlinked_file_is_accepted(tmp_path):
    # DVC hashes a symlinked file's content (data/raw is the prepare stage's dependency)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    rng = np.random.default_rng(0)
    np.savez(outside / "x.npz", images=rng.integers(0, 256, (20, 8, 8, 1), dtype=np.uint8))
    (tmp_path / "data" / "raw").mkdir(parents=True)
    (tmp_path / "data" / "raw" / "x.npz").symlink_to(outside / "x.npz")
    p = tiny_params()
    p["data"].update(dataset="npz", path="data/raw/x.npz")
    r = run_stage("prepare", tmp_path, p)
    assert r.returncode == 0, r.stderr
    p["data"].update(path=str(tmp_path / "data" / "raw" / "x.npz"))  # absolute, still inside
    assert run_stage("prepare", tmp_path, p).returncode == 0


def test_a_folder_reached_through_a_symlinked_folder_is_refused(tmp_path):
    # DVC does not look into a symlinked folder: replacing its images would change nothing
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (tmp_path / "data" / "raw").mkdir(parents=True)
    (tmp_path / "data" / "raw" / "imgs").symlink_to(outside, target_is_directory=True)
    p = tiny_params()
    p["data"].update(dataset="folder", path="data/raw/imgs")
    r = run_stage("prepare", tmp_path, p)
    assert_one_line_error(r, "data.path")
    assert "symlink" in r.stderr and not (tmp_path / "data" / "prepared").exists()


def test_a_sample_set_that_cannot_fit_in_ram_is_refused_before_sampling(trained):
    p = one_variant()
    p["sample"].update(num_samples=10**12, batch_size=1000)
    t0 = time.monotonic()
    r = run_stage("sample", trained, p)
    assert_one_line_error(r, "sample.num_samples")
    assert "GB" in r.stderr and time.monotonic() - t0 < 60
    assert not (trained / "samples").exists()


@pytest.mark.parametrize("ignore_sigint", [False, True], ids=["sigint", "sigint-ignored-by-shell"])
def test_ctrl_c_while_sampling_stops_within_seconds_exits_130_and_leaves_nothing(
        trained, ignore_sigint):
    p = one_variant()
    p["sample"].update(num_samples=400_000, batch_size=2000)  # minutes of sampling
    proc = start("sample", trained, p, ignore_sigint)
    deadline = time.monotonic() + 120
    # atomic_dir's temporary folder of this process: sampling has begun
    while not list((trained / "samples").glob(f".tmp-simple-{proc.pid}-*")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "sampling did not start"
        time.sleep(0.05)
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGINT)
    t0 = time.monotonic()
    try:
        _, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("SIGINT did not stop sampling within 20 s")
    assert time.monotonic() - t0 < 10
    assert proc.returncode == 130, err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("sample[")]
    assert lines == ["error: interrupted (SIGINT)"], err
    assert not (trained / "samples" / "simple").exists()
    assert not list(trained.rglob(".tmp-*")), "partial output left behind"


@pytest.mark.parametrize("sig,code,word", [(signal.SIGINT, 130, "interrupted (SIGINT)"),
                                           (signal.SIGTERM, 143, "terminated (SIGTERM)")])
def test_a_signal_before_the_training_loop_is_one_line_and_the_usual_code(
        tmp_path, trained, sig, code, word):
    (tmp_path / "data").symlink_to(trained / "data", target_is_directory=True)
    p = one_variant()
    p["train"].update(steps=100_000)
    proc = start("train", tmp_path, p)
    time.sleep(1.0)  # still importing torch: outside the loop's own handler
    os.killpg(proc.pid, sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert [ln for ln in err.splitlines() if ln.strip()] == [f"error: {word}"], err
    assert not (tmp_path / "models").exists() and not (tmp_path / "checkpoints").exists()


def test_ctrl_c_inside_a_log_window_then_rerun_gives_the_uninterrupted_loss_csv(
        tmp_path, trained):
    # plots/loss/<v>.csv and the final loss of an interrupted and re-run train@<v> must equal an
    # uninterrupted run's byte for byte (the signal's checkpoint lies inside a log window)
    p = one_variant()
    p["train"].update(steps=60, log_every=7, checkpoint_every=1000)
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    for d in (ref, cut):
        d.mkdir()
        (d / "data").symlink_to(trained / "data", target_is_directory=True)
    assert run_stage("train", ref, p).returncode == 0
    proc = start("train", cut, p)
    for line in proc.stdout:  # on_log's line of step 14: the next step is inside a window
        if line.startswith("train[simple] step 14/"):
            os.killpg(proc.pid, signal.SIGINT)
            break
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "training interrupted by SIGINT after step" in err, err
    r = run_stage("train", cut, p)
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stdout + r.stderr
    for f in ("plots/loss/simple.csv", "metrics/train/simple.json", "models/simple.pt"):
        assert (cut / f).read_bytes() == (ref / f).read_bytes(), f
