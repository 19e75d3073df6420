"""The stages sample, bpd and gamma in units that survive (issue 18, §1 and §2), in a tiny repo:
SIGKILLed after some units are written, then run again, each computes only the missing units
and writes the bytes of an uninterrupted run; a corrupt unit is said in one line and computed
again; two `--shard i/N` jobs plus the normal stage run give the same bytes, the assembling run
computing nothing; a bad `--shard` is refused in one line; $DDPM_SCRATCH outside the repo works
the same.

Units (one batch each) of these params: sample 8 sample sets x 4 units (10 images in batches of
3), bpd 4 units (10 test images), gamma 4 units (10 training images). Units recomputed after
each kill (the kill comes before the n-th atomic rename, the n-th unit complete under its
temporary name):
  sample  killed at rename 8:  6 units kept, rerun computes 26 of 32 (6 reused)
  bpd     killed at rename 3:  2 units kept, rerun computes  2 of  4 (2 reused)
  gamma   killed at rename 3:  2 units kept, rerun computes  2 of  4 (2 reused)
  bpd     killed at rename 4, one of its 3 units truncated: rerun computes 2 (1 corrupt), reuses 2
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import REPO, run_stage, tiny_params

pytestmark = pytest.mark.slow  # subprocess pipelines (README, Tests)

HOOK = Path(__file__).resolve().parent / "killpoint"
V = "simple"
UNITS = {"sample": 8 * 4, "bpd": 4, "gamma": 4}  # units of an uninterrupted run


def outputs(root: Path, stage: str) -> dict[str, bytes]:
    """The stage's outputs (timings are measurements, left out), by path."""
    files = {"sample": sorted((root / "samples" / V).glob("*")),
             "bpd": [root / "metrics" / "bpd" / f"{V}.json", root / "bpd" / f"{V}.csv",
                     root / "plots" / "bpd_steps" / f"{V}.csv"],
             "gamma": [root / "gamma" / f"{V}.json"]}[stage]
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def unit_files(scratch: Path) -> list[Path]:
    """The finished units in a scratch area (temporary files are `.tmp-*.npz-<pid>-<hex>`)."""
    return sorted(scratch.rglob("*.npz"))


def units_line(stage: str, out: str) -> str | None:
    """The stage's `<stage>[<v>]: units ...` line (finish_units), if printed."""
    lines = [ln for ln in out.splitlines() if ln.startswith(f"{stage}[{V}]: units ")]
    assert len(lines) <= 1, lines
    return lines[0] if lines else None


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A tiny repo after prepare, train, gamma, nnhead, sample and bpd (uninterrupted), with
    every stage's outputs of that run."""
    root = tmp_path_factory.mktemp("units")
    p = tiny_params()
    p["variants"] = {V: p["variants"][V]}
    p["sample"].update(num_samples=10, batch_size=3)  # 4 units per sample set, the last of 1
    p["bpd"].update(num_images=10, batch_size=3)
    p["gamma"].update(num_images=10, batch_size=3)
    base = {}
    for stage in ("prepare", "train", "gamma", "nnhead", "sample", "bpd"):
        r = run_stage(stage, root, p)
        assert r.returncode == 0, r.stdout + r.stderr
        if stage in UNITS:  # nothing reused: no units line; the scratch removed
            assert units_line(stage, r.stdout) is None, r.stdout
            assert not (root / ".scratch" / "units").exists()
            base[stage] = outputs(root, stage)
    assert len(base["sample"]) == 8 + 1  # 8 sample sets and index.json
    return root, p, base


def _env(extra: dict | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HOOK), str(REPO)]),
           "OMP_NUM_THREADS": "1", **(extra or {})}
    env.pop("DDPM_PARAMS", None)
    return env


def kill_at(root: Path, stage: str, point: str, hold: Path, env: dict | None = None) -> None:
    """Run `python -m pipeline.<stage> simple` until it holds at `point` of the killpoint hook,
    then SIGKILL its process group."""
    hold.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", f"pipeline.{stage}", V], cwd=root, start_new_session=True,
        env=_env({**(env or {}), "DDPM_TEST_HOLD": f"{stage}:{point}",
                  "DDPM_TEST_HOLD_DIR": str(hold)}),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        t0 = time.monotonic()
        while not (hold / "held").exists():
            assert proc.poll() is None, f"{stage} ended before {point}:\n{proc.stdout.read()}"
            assert time.monotonic() - t0 < 300, f"{stage} did not reach {point}"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def rerun(root: Path, p: dict, stage: str, env: dict | None = None,
          args: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`python -m pipeline.<stage> simple [args]` to its end, without any hold."""
    (root / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    return subprocess.run([sys.executable, "-m", f"pipeline.{stage}", V, *args], cwd=root,
                          env=_env(env), capture_output=True, text=True, timeout=300)


# sample renames 4 units then the set's grid (save_grid is atomic) per sample set: its 8th
# rename is the second set's 3rd unit, 6 units (4 + 2) in place
@pytest.mark.parametrize(("stage", "rename", "kept_n"), [("sample", 8, 6), ("bpd", 3, 2),
                                                       ("gamma", 3, 2)])
def test_a_stage_killed_after_some_units_computes_only_the_rest(repo, stage, rename, kept_n,
                                                               tmp_path):
    root, p, base = repo
    kill_at(root, stage, f"rename:{rename}", tmp_path / "hold")
    kept = unit_files(root / ".scratch" / "units")
    assert len(kept) == kept_n, kept  # the units renamed into place before the kill
    r = rerun(root, p, stage)
    assert r.returncode == 0, r.stdout + r.stderr
    computed = UNITS[stage] - len(kept)
    assert units_line(stage, r.stdout) == (
        f"{stage}[{V}]: units {computed} computed, {len(kept)} reused"), r.stdout
    assert outputs(root, stage) == base[stage]
    assert not (root / ".scratch" / "units").exists()
    print(f"\nkill[{stage}] at rename {rename}: {len(kept)} units kept; rerun computed "
          f"{computed} of {UNITS[stage]}")


def test_a_truncated_unit_is_said_in_one_line_and_computed_again(repo, tmp_path):
    root, p, base = repo
    kill_at(root, "bpd", "rename:4", tmp_path / "hold")
    kept = unit_files(root / ".scratch" / "units")
    assert len(kept) == 3, kept
    bad = kept[1]
    bad.write_bytes(bad.read_bytes()[:100])  # truncated
    r = rerun(root, p, "bpd")
    assert r.returncode == 0, r.stdout + r.stderr
    said = [ln for ln in r.stderr.splitlines() if ln.startswith("units: ")]
    assert said == [f"units: {bad.relative_to(root)} is truncated or corrupt (checksum); "
                    "computing it again"], r.stderr
    assert units_line("bpd", r.stdout) == (
        f"bpd[{V}]: units 2 computed, 2 reused, 1 corrupt computed again"), r.stdout
    assert outputs(root, "bpd") == base["bpd"]
    assert not (root / ".scratch" / "units").exists()


@pytest.mark.parametrize("stage", ["sample", "bpd"])
def test_two_shard_jobs_then_the_stage_run_give_the_bytes_of_one_run(repo, stage):
    root, p, base = repo
    for path in base[stage]:  # the shard jobs write no output: remove it to see that
        (root / path).unlink()
    half = UNITS[stage] // 2  # 4 units per engine call: 2 for each shard
    for i in (0, 1):
        r = rerun(root, p, stage, args=("--shard", f"{i}/2"))
        assert r.returncode == 0, r.stdout + r.stderr
        assert units_line(stage, r.stdout) == (
            f"{stage}[{V}]: units {half} computed, 0 reused (shard {i}/2: kept in "
            f"{Path('.scratch') / 'units'} for the stage run without --shard to assemble)"), \
            r.stdout
        assert not [path for path in base[stage] if (root / path).exists()]
        assert len(unit_files(root / ".scratch" / "units")) == half * (i + 1)
    r = rerun(root, p, stage)
    assert r.returncode == 0, r.stdout + r.stderr
    assert units_line(stage, r.stdout) == (
        f"{stage}[{V}]: units 0 computed, {UNITS[stage]} reused"), r.stdout
    assert outputs(root, stage) == base[stage]
    assert not (root / ".scratch" / "units").exists()


@pytest.mark.parametrize("stage", ["sample", "bpd", "gamma"])
def test_a_shard_out_of_range_is_refused_in_one_line_writing_nothing(repo, stage):
    root, p, base = repo
    before = outputs(root, stage)
    r = rerun(root, p, stage, args=("--shard", "2/2"))
    assert r.returncode == 2
    assert r.stdout == "" and r.stderr.splitlines() == [
        "error: --shard '2/2': expected i/N with 0 <= i < N, e.g. 0/4"], r.stderr
    assert outputs(root, stage) == before == base[stage]
    assert not (root / ".scratch" / "units").exists()


def test_a_scratch_area_outside_the_repo_works_the_same(repo, tmp_path):
    root, p, base = repo
    scratch = tmp_path / "shared-scratch"
    env = {"DDPM_SCRATCH": str(scratch)}
    kill_at(root, "gamma", "rename:2", tmp_path / "hold", env)
    assert not (root / ".scratch" / "units").exists()
    assert len(unit_files(scratch / "units")) == 1
    r = rerun(root, p, "gamma", env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert units_line("gamma", r.stdout) == f"gamma[{V}]: units 3 computed, 1 reused"
    assert outputs(root, "gamma") == base["gamma"]
    assert not (scratch / "units").exists() and not (root / ".scratch" / "units").exists()
