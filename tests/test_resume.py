"""Interruption: SIGKILL / SIGTERM mid-run, then resume, must equal an uninterrupted run bitwise.

The interrupted run is this file executed as a script (a real separate process); the reference
and the resumed runs happen in the test process. All three use one torch thread, so CPU kernels
reduce in the same order. The model has dropout, so the global torch RNG must be restored too.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import FakeLoss, FakeSampler, tiny_cfg, tiny_data, tiny_model

from ddpm_core.checkpoint import CheckpointError, list_checkpoints
from ddpm_core.training import train

ROOT = Path(__file__).resolve().parents[1]
STEPS, PAUSE_AT = 30, 12


def resume_cfg(**kw: object):
    """30 steps, checkpoints every 5, log (and on_log) every step, dropout model."""
    return tiny_cfg(steps=STEPS, checkpoint_every=5, log_every=1, **kw)


def run_to_end(ckpt_dir: Path, **kw: object):
    """Train (or resume) in this process to STEPS."""
    return train(tiny_model(dropout=0.2), FakeLoss(), FakeSampler(), tiny_data(), resume_cfg(**kw),
                 ckpt_dir, device="cpu")


def windows_cfg():
    """Log windows of 4 steps, checkpoints every 10: a signal lands inside a window."""
    return tiny_cfg(steps=STEPS, checkpoint_every=10, log_every=4)


def start_worker(ckpt_dir: Path, go: Path, mode: str = "steps") -> subprocess.Popen:
    """Launch the script form of this file: training that dawdles 20 ms per step."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, __file__, str(ckpt_dir), str(go), mode], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """Poll until `path` exists (the worker's first checkpoint)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"worker ended early: {proc.communicate()}"
        assert time.monotonic() < deadline, "worker wrote no checkpoint"
        time.sleep(0.005)


def assert_bitwise_equal(a, b) -> None:
    """model and EMA state dicts torch.equal, key by key."""
    for which in ("model", "ema"):
        sa, sb = getattr(a, which).state_dict(), getattr(b, which).state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{which}.{k} differs"


def steps_saved(ckpt_dir: Path) -> list[int]:
    """Steps of the checkpoints on disk."""
    return [int(re.findall(r"\d+", p.name)[0]) for p in list_checkpoints(ckpt_dir)]


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_is_bitwise_identical(tmp_path: Path, one_thread) -> None:
    reference = run_to_end(tmp_path / "ref")
    ckpt = tmp_path / "killed"
    proc = start_worker(ckpt, tmp_path / "go")
    wait_for(ckpt / "ckpt_00000005.pt", proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert 5 <= max(steps_saved(ckpt)) < STEPS  # killed after a checkpoint, before the end
    resumed = run_to_end(ckpt)
    assert resumed.resumed_from is not None and resumed.step == STEPS
    assert_bitwise_equal(resumed, reference)


@pytest.mark.slow
def test_sigterm_saves_at_step_boundary_exits_143_and_resumes_bitwise(
        tmp_path: Path, one_thread) -> None:
    reference = run_to_end(tmp_path / "ref")
    ckpt, go = tmp_path / "termed", tmp_path / "go"
    proc = start_worker(ckpt, go)
    wait_for(ckpt / "ckpt_00000005.pt", proc)
    proc.send_signal(signal.SIGTERM)
    go.touch()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    last = max(steps_saved(ckpt))
    assert 5 < last < STEPS  # a fresh checkpoint at the step where the signal was noticed
    resumed = run_to_end(ckpt)
    assert resumed.resumed_from is not None and resumed.resumed_from.name.endswith(f"{last}.pt")
    assert_bitwise_equal(resumed, reference)


def test_corrupt_latest_checkpoint_needs_resume_fallback(tmp_path: Path, one_thread) -> None:
    reference = run_to_end(tmp_path / "ref")
    ckpt = tmp_path / "c"
    train(tiny_model(dropout=0.2), FakeLoss(), FakeSampler(), tiny_data(),
          dataclasses.replace(resume_cfg(), steps=10), ckpt, device="cpu")
    newest = ckpt / "ckpt_00000010.pt"
    newest.write_bytes(newest.read_bytes()[:-7])
    with pytest.raises(CheckpointError, match=re.escape(str(newest)) + ".*truncated"):
        run_to_end(ckpt)
    with pytest.warns(UserWarning, match="falling back"):
        resumed = run_to_end(ckpt, resume_fallback=True)
    assert resumed.resumed_from == ckpt / "ckpt_00000005.pt"
    assert_bitwise_equal(resumed, reference)


def _worker(ckpt_dir: str, go: str, mode: str = "steps") -> None:
    """Script mode: train slowly; at PAUSE_AT wait for the parent's go file (a backstop).
    mode "windows": windows_cfg, every logged row appended to <ckpt_dir>.rows.jsonl."""
    torch.set_num_threads(1)
    rows = Path(ckpt_dir + ".rows.jsonl")

    def on_log(step: int, metrics: dict) -> None:
        if mode == "windows":
            with rows.open("a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
        time.sleep(0.02)
        while step == PAUSE_AT and not Path(go).exists():
            time.sleep(0.01)

    cfg = windows_cfg() if mode == "windows" else resume_cfg()
    sampler = SigintAtStep(SIGINT_AT) if mode == "windows" else FakeSampler()
    train(tiny_model(dropout=0.2), FakeLoss(), sampler, tiny_data(), cfg,
          Path(ckpt_dir), device="cpu", on_log=on_log)


SIGINT_AT = 14  # inside the log window 13..16, between the checkpoints 10 and 20


class SigintAtStep(FakeSampler):
    """FakeSampler that sends this process SIGINT while it draws t for step `at` (1-based): the
    signal lands inside a log window whatever the machine's load (a signal from the parent
    raced the worker to its next log step on a loaded CI machine)."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at, self.calls = at, 0

    def sample(self, n, generator):
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), signal.SIGINT)
        return super().sample(n, generator)


if __name__ == "__main__":
    _worker(*sys.argv[1:4])


def _logged(rows: list[dict]) -> dict[int, tuple]:
    """What the loss curve keeps of each logged row, by step (a re-logged step replaces the
    earlier row, as pipeline.train._read_history does); images/s is a timing, not history."""
    return {r["step"]: (r["loss"], r["grad_norm"], r["lr"]) for r in rows}


@pytest.mark.slow
def test_sigint_inside_a_log_window_then_resume_reproduces_the_logged_history(
        tmp_path: Path, one_thread) -> None:
    # the checkpoint written at the signal lies inside a log window: the resumed run must
    # average the whole window, not only its steps after the checkpoint
    ref_rows: list[dict] = []
    train(tiny_model(dropout=0.2), FakeLoss(), FakeSampler(), tiny_data(), windows_cfg(),
          tmp_path / "ref", device="cpu",
          on_log=lambda step, m: ref_rows.append({"step": step, **m}))
    ckpt, go = tmp_path / "inted", tmp_path / "go"
    go.touch()  # no pause: the worker signals itself at step SIGINT_AT
    proc = start_worker(ckpt, go, "windows")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    last = max(steps_saved(ckpt))
    assert last % 4 != 0 and 10 < last < STEPS, last  # inside a window, between checkpoints
    rows = [json.loads(line) for line in Path(f"{ckpt}.rows.jsonl").read_text().splitlines()]
    resumed = train(tiny_model(dropout=0.2), FakeLoss(), FakeSampler(), tiny_data(),
                    windows_cfg(), ckpt, device="cpu",
                    on_log=lambda step, m: rows.append({"step": step, **m}))
    assert resumed.resumed_from is not None and resumed.step == STEPS
    assert _logged(rows) == _logged(ref_rows)


def test_loss_history_torn_by_a_kill_mid_line_is_repaired_before_the_resumed_run_appends(
        tmp_path: Path) -> None:
    # train@<v> appends one JSON line per log step; a SIGKILL inside that write leaves a torn
    # last line. The resumed run must read the history and append to it without the fragment
    # swallowing its first new row (the loss curve must equal an uninterrupted run's).
    from pipeline.train import _read_history, _repair_history

    f = tmp_path / "history.jsonl"
    rows = [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3)]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]) + json.dumps(rows[2])[:9])
    _repair_history(f)
    assert _read_history(f) == rows[:2]
    with f.open("a") as out:  # what on_log does after the resume
        out.write(json.dumps(rows[2]) + "\n")
    assert _read_history(f) == rows
    _repair_history(tmp_path / "missing.jsonl")  # nothing to repair: no error, no file
    assert not (tmp_path / "missing.jsonl").exists()
