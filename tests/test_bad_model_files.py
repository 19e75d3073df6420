"""Malformed or hostile model sources are one line naming the file, through the library, the
CLI (`ddpm sample`, `ddpm convert`) and a `pretrained` variant: a diffusers config.json that lacks
a key, is not JSON or asks for absurd sizes, a .bin whose pickle holds code, and one of our model
files whose spec asks for a network its weights are not. Sizes are checked against the stored
tensors before anything is allocated: the absurd cases run under an address-space cap of a few
GB, so a build of the network they ask for (17 GB and up) fails instead of being attempted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tiny import make_diffusers_folder, make_model_file

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = "diffusion_pytorch_model.safetensors"


class Payload:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _edit_config(folder: Path, **changes) -> Path:
    conf = json.loads((folder / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            conf.pop(k)
        else:
            conf[k] = v
    (folder / "config.json").write_text(json.dumps(conf))
    return folder / "config.json"


def _bad_folders(tmp: Path) -> dict[str, tuple[Path, list[str]]]:
    """name -> (diffusers folder, words its one-line error must hold)."""
    out = {}

    def folder(name: str) -> Path:
        make_diffusers_folder(tmp / name, T=8)
        return tmp / name

    f = folder("lacks_key")
    out["lacks_key"] = (f, [str(_edit_config(f, block_out_channels=None)), "block_out_channels"])
    f = folder("wrong_type")
    out["wrong_type"] = (f, [str(_edit_config(f, block_out_channels=128)), "block_out_channels"])
    f = folder("not_json")
    (f / "config.json").write_text("{not json")
    out["not_json"] = (f, [str(f / "config.json"), "JSON"])
    f = folder("payload")
    (f / WEIGHTS).unlink()
    torch.save({"conv_in.weight": Payload(tmp / "pwned")}, f / "diffusion_pytorch_model.bin")
    out["payload"] = (f, [str(f / "diffusion_pytorch_model.bin"), "refused"])
    f = folder("corrupt_weights")
    (f / WEIGHTS).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    out["corrupt_weights"] = (f, [str(f / WEIGHTS)])
    return out


def _huge_folders(tmp: Path) -> dict[str, tuple[Path, list[str]]]:
    out = {}
    for name, change, word in [("wide", {"block_out_channels": [32768, 32768]}, "32768"),
                               ("deep", {"layers_per_block": 10_000_000}, "10000000")]:
        make_diffusers_folder(tmp / name, T=8)
        out[name] = (tmp / name, [str(_edit_config(tmp / name, **change)), word])
    return out


def _huge_model_files(tmp: Path) -> dict[str, tuple[Path, list[str]]]:
    out = {}
    for name, key, value in [("wide_ours", "base_channels", 1 << 20),
                             ("deep_ours", "num_res_blocks", 10_000_000)]:
        path = tmp / f"{name}.pt"
        make_model_file(path)
        blob = torch.load(path, weights_only=True)
        blob["spec"]["unet"][key] = value
        torch.save(blob, path)
        out[name] = (path, [str(path), str(value)])
    return out


def _one_line(err: str, words: list[str]) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip() and "%|" not in ln]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and "weights_only=False" not in err, err
    for w in words:
        assert w in lines[0], (w, lines[0])


def _pretrained_params(tmp: Path, sources: dict[str, tuple[Path, str]]) -> Path:
    """params.yaml with one pretrained variant per source (name -> (path, format))."""
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["variants"] = {name: {"pretrained": str(path), "format": fmt, "mean_type": "eps",
                            "var_type": "fixed_large"} for name, (path, fmt) in sources.items()}
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(p))
    return path


# Runs ddpm CLI calls and train stages in a fresh interpreter whose address space is capped at
# what torch takes plus 1.5 GB: building a 17 GB network there fails instead of being attempted.
CAPPED = r"""
import contextlib, io, json, resource, sys
import torch
from pipeline import train
from pipeline.common import run_stage
from ddpm_core.cli import main

def vm_bytes():
    for line in open("/proc/self/status"):
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024

resource.setrlimit(resource.RLIMIT_AS,
                   (vm_bytes() + 1_500_000_000, resource.getrlimit(resource.RLIMIT_AS)[1]))
results = []
for call in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            if call[0] == "cli":
                code = main(call[1])
            else:
                sys.argv = ["train", call[2]]
                run_stage(train.main, params_path=call[1], per_variant=True)
                code = 0
        except SystemExit as e:
            code = e.code
        except BaseException as e:  # a traceback for the user
            import traceback
            traceback.print_exc(file=err)
            code = "traceback"
    results.append({"code": code, "err": err.getvalue()})
print(json.dumps(results))
"""


def _run_capped(calls: list, cwd: Path) -> list[dict]:
    r = subprocess.run([sys.executable, "-c", CAPPED, json.dumps(calls)], capture_output=True,
                       text=True, cwd=cwd, timeout=600,
                       env={**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}",
                            "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_bad_diffusers_folders_are_one_line_errors_in_the_library(tmp_path: Path) -> None:
    import ddpm_core
    from ddpm_core.convert import load_diffusers_unet

    for name, (folder, words) in _bad_folders(tmp_path).items():
        for load in (ddpm_core.load_model, load_diffusers_unet):
            with pytest.raises(ValueError) as e:
                load(folder)
            msg = str(e.value)
            assert "\n" not in msg and "weights_only=False" not in msg, (name, msg)
            assert all(w in msg for w in words), (name, words, msg)
            assert e.value.__cause__ is None and (e.value.__context__ is None
                                                  or e.value.__suppress_context__), name
    assert not (tmp_path / "pwned").exists()


def test_pickle_with_code_is_refused_and_says_why(tmp_path: Path) -> None:
    import ddpm_core

    folder, _ = _bad_folders(tmp_path)["payload"]
    with pytest.raises(ValueError) as e:
        ddpm_core.load_model(folder)
    msg = str(e.value)
    assert "refused to load" in msg and "code or objects other than tensors" in msg, msg
    assert "safetensors" in msg and "weights_only=False" not in msg
    assert not (tmp_path / "pwned").exists()


@pytest.mark.slow
def test_bad_and_huge_sources_are_one_line_through_cli_and_pretrained(tmp_path: Path) -> None:
    """Every bad source, through `ddpm sample`, `ddpm convert` and a pretrained variant, under
    the address-space cap; the error names the file (exit 2 in the CLI, 1 in the stage)."""
    cases = {**_bad_folders(tmp_path), **_huge_folders(tmp_path),
             **_huge_model_files(tmp_path)}
    sources = {name: (path, "ours" if path.suffix == ".pt" else "diffusers")
               for name, (path, _) in cases.items()}
    params = _pretrained_params(tmp_path, sources)
    calls, expect = [], []
    for name, (path, words) in cases.items():
        calls += [["cli", ["sample", str(path), "-n", "1", "--device", "cpu",
                           "-o", str(tmp_path / "s.npz")]],
                  ["cli", ["convert", str(path), str(tmp_path / "out.pt")]],
                  ["stage", str(params), name]]
        expect += [(name, "sample", 2, words), (name, "convert", 2, words),
                   (name, "pretrained", 1, [f"variants.{name}.pretrained", *words])]
    results = _run_capped(calls, tmp_path)
    problems = []
    for (name, how, code, words), got in zip(expect, results, strict=True):
        try:
            assert got["code"] == code, f"exit {got['code']}"
            _one_line(got["err"], words)
        except AssertionError as e:
            problems.append(f"{name} via {how}: {e} | {got['err'][-400:]!r}")
    assert not problems, "\n".join(problems)
    assert not (tmp_path / "pwned").exists()
    assert not (tmp_path / "out.pt").exists() and not (tmp_path / "models").exists()
