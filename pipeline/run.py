"""Launcher of the DVC stage commands: `python3 pipeline/run.py <stage> [variant]` runs
`python -m pipeline.<stage> [variant]` with the project's interpreter, so `.venv/bin/dvc repro`
works without an activated virtual environment (DVC runs commands with the caller's PATH).

The commands in dvc.yaml name no variant: a foreach stage's variant is a key of params.yaml,
which must never reach the shell (a name like `x;touch FILE` would run). Under DVC it comes
from DVC_STAGE (`train@simple`, set by DVC for every stage) and goes to the stage as an
argument of exec, where params validation refuses a bad name in one line.

Interpreter: $DDPM_PYTHON, else the active $VIRTUAL_ENV, else <DVC_ROOT>/.venv (DVC sets
DVC_ROOT to the main repository, also for queued and temporary experiments), else ./.venv,
else this interpreter. Standard library only.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def interpreter() -> str:
    """The Python that has the project installed."""
    if os.environ.get("DDPM_PYTHON"):
        return os.environ["DDPM_PYTHON"]
    candidates = [os.environ.get("VIRTUAL_ENV"), os.environ.get("DVC_ROOT") and
                  str(Path(os.environ["DVC_ROOT"]) / ".venv"), ".venv"]
    for env in candidates:
        if env and (Path(env) / "bin" / "python").is_file():
            return str(Path(env) / "bin" / "python")
    return sys.executable


def stage_args(argv: list[str], dvc_stage: str | None) -> list[str]:
    """The stage's arguments: `[variant]` as given, else the variant of DVC's foreach stage
    `<stage>@<variant>` (DVC_STAGE, prefixed `<dvc.yaml path>:` outside the root dvc.yaml)."""
    if len(argv) == 2 or not dvc_stage or "@" not in dvc_stage:
        return argv[1:]
    stage, _, variant = dvc_stage.partition("@")
    return [variant] if stage.rpartition(":")[2] == argv[0] else []


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3) or not sys.argv[1].isidentifier():
        sys.exit("usage: python3 pipeline/run.py <stage> [variant]")
    py = interpreter()
    os.execv(py, [py, "-m", f"pipeline.{sys.argv[1]}",
                  *stage_args(sys.argv[1:], os.environ.get("DVC_STAGE"))])
