"""sample / bpd stages on 2 processes (torchrun, gloo): the same images and bounds as on 1."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import run_stage, tiny_params

pytestmark = pytest.mark.slow  # subprocess pipelines (README, Tests)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    p = tiny_params()
    p["variants"] = {"simple": p["variants"]["simple"]}
    p["sample"].update(num_samples=10, batch_size=3)  # 4 batches, uneven last one
    p["bpd"].update(num_images=10, batch_size=3)
    for stage in ("prepare", "train", "gamma", "nnhead"):
        r = run_stage(stage, root, p)
        assert r.returncode == 0, r.stderr
    return root, p


def _run(root: Path, p: dict, stage: str, nproc: int, out: str) -> Path:
    """Run `stage simple` on nproc processes; copy its output folder `out` aside."""
    q = json.loads(json.dumps(p))
    q[stage]["nproc"] = nproc
    r = run_stage(stage, root, q, env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert ("--nproc_per_node=2" in r.stdout) == (nproc == 2), r.stdout  # really relaunched
    dest = root / f"{out}_{nproc}"
    shutil.copytree(root / out, dest)
    return dest


def test_sample_stage_sharded_over_two_processes_draws_the_same_images(trained):
    root, p = trained
    one, two = (_run(root, p, "sample", n, "samples") for n in (1, 2))
    files = sorted(one.glob("simple/*.npy"))
    # ancestral and respaced (S = 2) with σ² = β, β̃, analytic, DDIM and Analytic-DDIM
    assert len(files) == 8, [f.name for f in files]
    for f in files:
        a, b = np.load(f), np.load(two / f.relative_to(one))
        assert a.shape == (10, 8, 8, 1)
        assert np.array_equal(a, b), f.name


def test_bpd_stage_sharded_over_two_processes_gives_the_same_bound(trained):
    root, p = trained
    bounds = {}
    for n in (1, 2):
        _run(root, p, "bpd", n, "bpd")
        bounds[n] = json.loads((root / "metrics" / "bpd" / "simple.json").read_text())
    assert bounds[1].keys() == bounds[2].keys() == {"simple"}
    for k, v in bounds[1]["simple"].items():
        assert bounds[2]["simple"][k] == pytest.approx(v, rel=1e-9, abs=1e-9), k
    a = (root / "bpd_1" / "simple.csv").read_text().splitlines()
    b = (root / "bpd_2" / "simple.csv").read_text().splitlines()
    assert a == b and len(a) == 1 + p["diffusion"]["timesteps"] + 1
