"""Test-only hold points for tests/test_pipeline_kill.py, loaded through PYTHONPATH by the stage
processes of that test's `dvc repro` (the product never imports it): the stage named in
$DDPM_TEST_HOLD stops at a chosen point and waits, so that the test can kill `dvc repro` there,
deterministically, or copy the repository as it is at that moment.

DDPM_TEST_HOLD = "<stage>:<point>:<n>", <stage> as in `python -m pipeline.<stage>` (* for every
stage), <point> one of
  start     as the stage process starts (DVC has removed its outputs, nothing is written yet)
  rename    before the n-th atomic rename (os.replace / os.rename of a `.tmp-*` file or folder
            into place): the temporary copy is complete, the real name not written yet
  <module>.<function>   before the n-th call of that function (wrapped as the module is loaded)
At the point the process writes `held` (its pid, stage and point) into $DDPM_TEST_HOLD_DIR and
waits until a file `release` appears there (which it removes). $DDPM_TEST_HOLD_LOG: a file to
which every counted rename or call is appended (to choose points).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
import time
from pathlib import Path


def _stage() -> str | None:
    """`<stage>` of a `python -m pipeline.<stage>` process, else None (DVC, git, ...)."""
    argv = list(getattr(sys, "orig_argv", []))
    if "-m" in argv[:-1]:
        module = argv[argv.index("-m") + 1]
        if module.startswith("pipeline."):
            return module.split(".", 1)[1]
    return None


def _hold(what: str) -> None:
    folder = Path(os.environ["DDPM_TEST_HOLD_DIR"])
    tmp = folder / f"held-{os.getpid()}.part"
    tmp.write_text(f"{os.getpid()} {_stage()} {what}\n")
    tmp.rename(folder / "held")
    while not (folder / "release").exists():
        time.sleep(0.02)
    (folder / "release").unlink()


def _counting(fn, what: str, n: int, counted=lambda *a, **k: True, calls: list | None = None):
    """`fn` that holds before its n-th counted call."""
    calls = [0] if calls is None else calls

    def wrapper(*args, **kwargs):
        if counted(*args, **kwargs):
            calls[0] += 1
            if os.environ.get("DDPM_TEST_HOLD_LOG"):
                with open(os.environ["DDPM_TEST_HOLD_LOG"], "a") as f:
                    f.write(f"{_stage()} {what} {calls[0]} {list(map(str, args[:2]))}\n")
            if calls[0] == n:
                _hold(f"{what} {n}")
        return fn(*args, **kwargs)

    return wrapper


class _WrapOnLoad(importlib.abc.MetaPathFinder):
    """Wrap `module.function` right after `module` is executed, before anyone imports from it."""

    def __init__(self, module: str, function: str, n: int) -> None:
        self.module, self.function, self.n = module, function, n

    def find_spec(self, fullname, path, target=None):
        if fullname != self.module:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            setattr(module, self.function, _counting(getattr(module, self.function),
                                                     f"{self.module}.{self.function}", self.n))

        spec.loader.exec_module = exec_module
        return spec


def _is_tmp(src, *args, **kwargs) -> bool:
    return os.path.basename(os.fspath(src)).startswith(".tmp-")


def _install() -> None:
    stage = _stage()
    spec = os.environ.get("DDPM_TEST_HOLD")
    if stage is None:
        return
    want, point, n = spec.split(":") if spec else ("", "rename", "0")
    if want not in ("*", stage):
        point, n = "rename", "0"  # only log (if asked)
    if point == "start":
        _hold("start")
    elif point == "rename":
        if n == "0" and not os.environ.get("DDPM_TEST_HOLD_LOG"):
            return
        calls = [0]  # one count for both functions
        os.replace = _counting(os.replace, "rename", int(n), _is_tmp, calls)
        os.rename = _counting(os.rename, "rename", int(n), _is_tmp, calls)
    else:
        module, function = point.rsplit(".", 1)
        sys.meta_path.insert(0, _WrapOnLoad(module, function, int(n)))


_install()
