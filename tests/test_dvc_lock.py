"""The committed dvc.lock matches the committed code and params: `dvc exp show`'s baseline is
then what the commit says, and a fresh clone's `dvc repro` leaves dvc.lock as it was (apart from
output hashes that carry wall times). Outputs missing on a fresh clone are not drift."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DVC = Path(sys.executable).parent / "dvc"


def lock_drift(status: dict) -> list[str]:
    """Every way `dvc status --json` says a stage's recorded deps, params or command differ from
    the working tree; deps that are missing (outputs of other stages, not yet computed) are not
    drift, and `always_changed` stages always say so."""
    drift = []
    for stage, entries in status.items():
        for entry in entries:
            if not isinstance(entry, dict):
                if entry != "always changed":
                    drift.append(f"{stage}: {entry}")
                continue
            for kind, what in entry.items():
                if kind == "changed outs":
                    continue
                if kind == "changed deps":
                    drift += [f"{stage}: {path} {how}" for path, how in what.items()
                              if how != "deleted"]
                else:
                    drift.append(f"{stage}: {kind} {what}")
    return drift


def test_lock_drift_sees_a_modified_dependency_and_ignores_missing_outputs() -> None:
    status = {"train@a": [{"changed deps": {"data/prepared/train.npy": "deleted",
                                            "ddpm_core": "modified"}},
                          {"changed outs": {"models/a.pt": "not in cache"}}],
              "track": ["always changed"],
              "report": [{"changed params": {"params.yaml": {"variants": "modified"}}}]}
    assert lock_drift(status) == ["train@a: ddpm_core modified",
                                  "report: changed params {'params.yaml': {'variants': "
                                  "'modified'}}"]


@pytest.mark.slow
def test_committed_dvc_lock_matches_the_code_and_params() -> None:
    r = subprocess.run([str(DVC), "status", "--json"], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    drift = lock_drift(json.loads(r.stdout or "{}"))
    assert not drift, ("dvc.lock is stale (run `dvc repro` and commit dvc.lock):\n"
                       + "\n".join(drift))
