"""Start-up and error paths stay light: `ddpm --help`, usage errors, a missing local model and a
stage's one-line errors answer without importing torch, scikit-learn, SciPy or torch-fidelity;
running out of memory (CUDA's wording, the CPU allocator's, MemoryError) is the one-line hint."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "sklearn", "scipy", "torch_fidelity")


def _probe(code: str, cwd: Path = ROOT, env: dict | None = None) -> dict:
    """Run `code` in a fresh interpreter; it prints one JSON line (the last line of stdout)."""
    import os

    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd,
                       env={**os.environ, **(env or {})}, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


CLI_PROBE = """
import contextlib, io, json, sys
from ddpm_core.cli import main
err = io.StringIO()
with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
    code = main({argv!r})
print(json.dumps({{"code": code, "err": err.getvalue(),
                   "heavy": [m for m in {heavy!r} if m in sys.modules]}}))
"""


@pytest.mark.parametrize(("argv", "code", "words"), [
    (["--help"], 0, []),
    (["sample", "--help"], 0, []),
    (["bpd", "--help"], 0, []),
    (["sample"], 2, ["model"]),
    (["frobnicate"], 2, ["invalid choice"]),
    (["sample", "m.pt", "--steps", "ten"], 2, ["--steps", "ten"]),
    (["sample", "mdoels/simple.pt"], 2, ["mdoels/simple.pt: not found"]),
    (["bpd", "./typo", "x.npz"], 2, ["./typo: not found"]),
    (["convert", "nowhere.safetensors", "out.pt"], 2, ["nowhere.safetensors: not found"]),
    (["bpd", "presets", "no-such-images.npz"], 2, ["no-such-images.npz: not found"]),
    (["nll", "--help"], 0, []),
    (["nll", "./typo", "x.npz"], 2, ["./typo: not found"]),
    (["nll", "presets", "no-such-images.npz"], 2, ["no-such-images.npz: not found"]),
    (["preset", "no-such-preset"], 2, ["no such preset"]),
])
def test_help_usage_errors_and_missing_paths_import_nothing_heavy(argv, code, words) -> None:
    got = _probe(CLI_PROBE.format(argv=argv, heavy=HEAVY))
    assert got["code"] == code, got
    assert got["heavy"] == [], f"{argv} imported {got['heavy']}"
    if code:
        lines = got["err"].strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), got["err"]
        assert all(w in lines[0] for w in words), (words, lines[0])


def test_help_and_a_usage_error_answer_quickly() -> None:
    for argv in (["--help"], ["sample", "--help"], ["sample"]):
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "ddpm_core.cli", *argv], capture_output=True,
                           text=True, cwd=ROOT, timeout=60)
        took = time.perf_counter() - t0
        assert r.returncode in (0, 2), r.stderr
        assert took < 5, f"ddpm {' '.join(argv)} took {took:.1f} s"


STAGE_PROBE = """
import contextlib, io, json, runpy, sys
sys.argv = [{module!r}, *{args!r}]
err = io.StringIO()
code = 0
with contextlib.redirect_stderr(err):
    try:
        {run}
    except SystemExit as e:
        code = e.code
    except Exception:  # what would reach the user as a traceback
        import traceback
        traceback.print_exc()
        code = 1
print(json.dumps({{"code": code, "err": err.getvalue(),
                   "heavy": [m for m in {heavy!r} if m in sys.modules]}}))
"""


def _params(tmp_path: Path, **top) -> Path:
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p.update(top)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(p))
    return path


def test_a_bad_params_file_is_answered_without_sklearn_scipy_or_fidelity(tmp_path) -> None:
    bad = _params(tmp_path, bogus=1)
    run = "runpy.run_module('pipeline.sample', run_name='__main__')"
    got = _probe(STAGE_PROBE.format(module="pipeline.sample", args=["simple"], run=run,
                                    heavy=HEAVY[1:]), env={"DDPM_PARAMS": str(bad)})
    assert got["code"] == 2, got
    assert got["err"].strip().startswith("error: bogus") and got["err"].count("\n") == 1
    assert got["heavy"] == [], f"imported {got['heavy']}"


@pytest.mark.parametrize("exc", ["StageError('x.csv: not found; run the stage')",
                                 "FileNotFoundError('x.csv: missing')",
                                 "RuntimeError('something else broke')"])
def test_the_runtime_error_path_imports_nothing_heavy(exc) -> None:
    run = ("from pipeline.common import run_stage, StageError\n"
           "        def main(params):\n"
           f"            raise {exc}\n"
           "        run_stage(main)")
    code = STAGE_PROBE.format(module="stage", args=[], run=run, heavy=HEAVY)
    got = _probe(code)
    assert got["heavy"] == [], f"the error path imported {got['heavy']}"
    if exc.startswith("RuntimeError"):  # not one of ours: its traceback stays
        assert "Traceback" in got["err"] and got["code"] == 1
    else:
        assert got["code"] == 1 and got["err"].startswith("error: x.csv")


# ----------------------------------------------------------------------------- out of memory


def _cpu_oom() -> RuntimeError:
    """The CPU allocator's own error (1 PiB cannot be had)."""
    import torch

    try:
        torch.empty(1 << 50, dtype=torch.uint8)
    except RuntimeError as e:
        return e
    pytest.fail("1 PiB was allocated")


@pytest.mark.parametrize("kind", ["cuda", "cpu", "memory_error", "numpy"])
def test_out_of_memory_is_one_line_with_the_hint_in_a_stage(kind, capsys) -> None:
    import numpy as np

    from pipeline.common import OOM_HINT, run_stage

    def main(params) -> None:
        if kind == "cuda":
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore")
        if kind == "cpu":
            raise _cpu_oom()
        if kind == "numpy":
            np.empty(1 << 60, dtype=np.uint8)
        raise MemoryError()

    with pytest.raises(SystemExit) as e:
        run_stage(main, params_path=ROOT / "params.yaml")
    err = capsys.readouterr().err
    assert e.value.code == 1
    assert err.count("\n") == 1 and err.startswith("error: out of memory"), err
    assert OOM_HINT in err


@pytest.mark.parametrize("kind", ["cpu", "memory_error"])
def test_out_of_memory_is_one_line_with_the_hint_in_the_cli(kind, tmp_path, monkeypatch,
                                                            capsys) -> None:
    import ddpm_core.api
    from ddpm_core.cli import main

    def load_model(*args, **kwargs):
        if kind == "cpu":
            raise _cpu_oom()
        raise MemoryError()

    monkeypatch.setattr(ddpm_core.api, "load_model", load_model)
    (tmp_path / "m.pt").write_bytes(b"")
    code = main(["sample", str(tmp_path / "m.pt"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("error: out of memory"), err
    assert "--batch-size" in err
