"""Provenance of a report: the git commit and whether the tree was dirty, a hash of the params,
the versions of the packages that made the numbers and the machine that wrote the report.

Everything here is a function of the checkout, the environment and the machine, never of the
clock, so the same inputs on the same machine give the same report byte for byte. Nothing here
raises: what cannot be found is 'unknown', with the reason.

Under `dvc exp run` the stages run in the workspace (or a temporary clone of it) with the
experiment's params applied on top of its baseline commit: the commit is that baseline and the
params it changed show up as modified files; the params hash says which params the run used.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import re
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from pipeline.common import stable_hash
from pipeline.params import Params, to_dict

# Files `dvc repro` itself rewrites while it runs: not a sign of uncommitted work.
WRITTEN_BY_DVC = ("dvc.lock",)
PACKAGES = {"torch": ("torch",), "dvc": ("dvc",), "mlflow": ("mlflow", "mlflow-skinny"),
            "torch-fidelity": ("torch-fidelity",), "numpy": ("numpy",)}
MAX_LISTED = 10  # changed files named in the report; the rest are counted


@dataclass(frozen=True)
class GitState:
    """HEAD and the uncommitted changes of the repository the stage runs in."""

    commit: str  # 40 (or 64) hex digits, or 'unknown: <why>'
    dirty: bool | None  # None: unknown
    changed: tuple[str, ...] = ()  # paths `git status --porcelain` lists (dvc.lock left out)

    def dirty_text(self) -> str:
        if self.dirty is None:
            return "unknown"
        if not self.dirty:
            return "no"
        more = len(self.changed) - MAX_LISTED
        return ("yes: " + ", ".join(self.changed[:MAX_LISTED])
                + (f" and {more} more" if more > 0 else ""))


def _git(args: list[str], cwd: str | Path | None) -> tuple[str | None, str]:
    """(stdout of `git <args>`, "") or (None, why it failed: git's first line, or git
    not being there)."""
    try:
        r = subprocess.run(["git", *args], cwd=cwd or None, capture_output=True, text=True,
                           timeout=30, check=False)
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"git not available ({type(e).__name__})"
    if r.returncode != 0:
        first = (r.stderr.strip().splitlines() or [f"git exited with {r.returncode}"])[0]
        return None, first.removeprefix("fatal: ")[:120]
    return r.stdout, ""


def git_state(cwd: str | Path | None = None) -> GitState:
    """`git rev-parse HEAD` and `git status --porcelain` in cwd; 'unknown' outside a repo."""
    head, why = _git(["rev-parse", "--verify", "HEAD"], cwd)
    commit = (head or "").strip()
    if not re.fullmatch(r"[0-9a-f]{40}([0-9a-f]{24})?", commit):
        return GitState(f"unknown: {why or 'no commit'}", None)
    status, _ = _git(["status", "--porcelain", "--untracked-files=normal"], cwd)
    if status is None:
        return GitState(commit, None)
    # porcelain v1: "XY path" or "XY old -> new"; a path with spaces comes quoted
    paths = sorted({ln[3:].split(" -> ")[-1].strip('"') for ln in status.splitlines()
                    if len(ln) > 3})
    changed = tuple(p for p in paths if p not in WRITTEN_BY_DVC)
    return GitState(commit, bool(changed), changed)


def _version(dists: tuple[str, ...]) -> str:
    """The installed version of the first of `dists` found, else 'not installed'."""
    for dist in dists:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(dist)
    return "not installed"


def device_description() -> str:
    """'CPU: <model>, N logical cores; GPU: <name> x k' per CUDA device name (or 'GPU: none');
    the CPU's model from /proc/cpuinfo on Linux, else platform."""
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                cpu = line.split(":", 1)[1].strip()
                break
    cpu = cpu or platform.processor() or platform.machine() or "unknown CPU"
    try:
        import torch

        gpus = Counter(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    except Exception:  # a broken driver must not stop the report  # noqa: BLE001
        gpus = Counter()
    gpu = "; ".join(f"{n} x {k}" for n, k in gpus.items()) or "none (no CUDA device)"
    return f"CPU: {cpu}, {os.cpu_count() or '?'} logical cores; GPU: {gpu}"


def provenance(params: Params, cwd: str | Path | None = None) -> dict[str, str]:
    """The rows of the report's provenance table, in order."""
    git = git_state(cwd)
    return {"git commit": git.commit, "uncommitted changes": git.dirty_text(),
            # of the validated params (config.to_dict, as JSON with sorted keys)
            "params hash (SHA-256)": stable_hash(to_dict(params), n=64),
            "version: python": platform.python_version(),
            **{f"version: {k}": _version(dists) for k, dists in PACKAGES.items()},
            "device (of the machine that wrote the report)": device_description()}
