"""Multi-node stages through torchrun's c10d rendezvous: the command, its one-line errors, and two
"nodes" on localhost (two torchrun agents of the same stage command in one checkout, as on a
shared filesystem; gloo, one process each) against one process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import REPO, free_port, run_stage, tiny_params

from pipeline import common
from pipeline.params import ConfigError, params_from_dict, rendezvous

# as tests/test_distributed.py: two half-batch gradient means averaged vs one full mean
ATOL, RTOL = 1e-6, 1e-5


def _relaunch_command(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], n: int,
                      nnodes: int) -> list[str]:
    """The torchrun command relaunch_under_torchrun runs for `python -m pipeline.train simple`."""
    calls: list[list[str]] = []
    for k in ("LOCAL_RANK", "DDPM_RDZV_ENDPOINT", "DDPM_RDZV_ID", "SLURM_JOB_ID"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(sys, "argv", ["-m", "simple"])
    monkeypatch.setattr(common.subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    with pytest.raises(SystemExit) as e:
        common.relaunch_under_torchrun("pipeline.train", n, nnodes)
    assert e.value.code == 0
    return calls[0]


def test_two_nodes_relaunch_under_torchrun_with_the_c10d_rendezvous_of_the_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    cmd = _relaunch_command(monkeypatch, {"DDPM_RDZV_ENDPOINT": "node001:29500",
                                          "SLURM_JOB_ID": "4242"}, 2, 3)
    assert cmd[cmd.index("--nnodes=3"):] == [
        "--nnodes=3", "--nproc_per_node=2", "--rdzv_backend=c10d",
        "--rdzv_endpoint=node001:29500", "--rdzv_id=4242", "-m", "pipeline.train", "simple"]
    ids = _relaunch_command(monkeypatch, {"DDPM_RDZV_ENDPOINT": "node001:29500",
                                          "DDPM_RDZV_ID": "mine", "SLURM_JOB_ID": "4242"}, 1, 2)
    assert "--rdzv_id=mine" in ids and "--nproc_per_node=1" in ids
    # one machine: standalone, whatever the environment says
    one = _relaunch_command(monkeypatch, {"DDPM_RDZV_ENDPOINT": "node001:29500"}, 2, 1)
    assert "--standalone" in one and not any(a.startswith("--rdzv") for a in one)


@pytest.mark.parametrize("endpoint, why", [
    (None, "sample.nnodes: 2 machines meet at a rendezvous endpoint; export DDPM_RDZV_ENDPOINT="),
    ("node001", "sample.nnodes: DDPM_RDZV_ENDPOINT='node001' is not host:port"),
    (":29500", "is not host:port"),
    ("node001:http", "is not host:port"),
    ("node001:70000", "is not host:port")])
def test_two_nodes_without_a_usable_endpoint_is_one_line_naming_the_key(
        endpoint: str | None, why: str) -> None:
    env = {} if endpoint is None else {"DDPM_RDZV_ENDPOINT": endpoint}
    with pytest.raises(ConfigError) as e:
        rendezvous("sample.nnodes", 2, env)
    msg = str(e.value)
    assert msg.startswith("sample.nnodes: ") and why in msg and "\n" not in msg
    assert rendezvous("sample.nnodes", 1, env) is None  # one machine needs none


def test_train_batch_divides_over_the_processes_of_every_node() -> None:
    p = tiny_params()
    p["train"].update(batch_size=8, nproc=2, nnodes=3)
    with pytest.raises(ConfigError, match=r"^train.batch_size: must be divisible by nproc=2 x "
                                          r"nnodes=3"):
        params_from_dict(p)
    p["train"].update(nnodes=2)
    assert params_from_dict(p).train.nnodes == 2


# ----------------------------------------------------------------------------- two nodes


def _params() -> dict:
    p = tiny_params()
    p["variants"] = {"simple": p["variants"]["simple"]}
    # each rank draws its dropout masks from its own stream (seed + rank, ddpm_core.training),
    # so only without dropout are the weights independent of the process count
    p["model"]["dropout"] = 0.0
    p["sample"].update(num_samples=10, batch_size=3, variances=["fixed_large"])  # uneven shares
    return p


def run_two_nodes(root: Path, stage: str, params: dict, timeout: float = 300) -> tuple[list[str],
                                                                                      float]:
    """`python -m pipeline.<stage> simple` twice in `root`, each a torchrun agent of a 2-node
    c10d rendezvous on 127.0.0.1; their outputs and the wall time. Both must exit 0."""
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "DDPM_RDZV_ENDPOINT": f"127.0.0.1:{free_port()}", "DDPM_RDZV_ID": f"test-{stage}"}
    env.pop("DDPM_PARAMS", None)
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-m", f"pipeline.{stage}", "simple"], cwd=root,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    try:
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    seconds = time.perf_counter() - t0
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out
        assert "--nnodes=2 --nproc_per_node=1 --rdzv_backend=c10d" in out, out
    print(f"two-node {stage}: {seconds:.1f} s wall", flush=True)
    return outs, seconds


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("one_node")
    p = _params()
    for stage in ("prepare", "train"):
        r = run_stage(stage, root, p, env={"OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr
    return root, p


def _weights(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    from ddpm_core.modelfile import load_model_file

    return {w: load_model_file(path, w).net.state_dict() for w in ("model", "ema")}


@pytest.mark.slow
def test_train_on_two_localhost_nodes_equals_one_process_with_the_same_global_batch(
        trained: tuple[Path, dict], tmp_path: Path) -> None:
    root, p = trained
    shutil.copytree(root / "data", tmp_path / "data")  # the shared checkout, prepared
    q = json.loads(json.dumps(p))
    q["train"]["nnodes"] = 2  # global batch 8: 4 images on each node
    outs, _ = run_two_nodes(tmp_path, "train", q)
    one, two = (_weights(r / "models" / "simple.pt") for r in (root, tmp_path))
    for which in ("model", "ema"):
        for k, v in one[which].items():
            torch.testing.assert_close(two[which][k], v, atol=ATOL, rtol=RTOL)
    steps = q["train"]["steps"]
    assert sum(f"train[simple]: {steps} steps" in out for out in outs) == 1  # global rank 0 only
    loss = [json.loads((r / "metrics/train/simple.json").read_text())["simple"]["final_loss"]
            for r in (root, tmp_path)]
    assert loss[1] == pytest.approx(loss[0], rel=1e-5)  # the mean over both nodes' halves


@pytest.mark.slow
def test_sample_on_two_localhost_nodes_draws_the_images_of_one_process(
        trained: tuple[Path, dict]) -> None:
    root, p = trained
    r = run_stage("sample", root, p, env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    one = root / "samples_one"
    shutil.copytree(root / "samples", one)
    shutil.rmtree(root / "samples")
    q = json.loads(json.dumps(p))
    q["sample"]["nnodes"] = 2
    outs, _ = run_two_nodes(root, "sample", q)
    files = sorted(one.glob("simple/*.npy"))
    assert len(files) == 3, [f.name for f in files]  # ancestral, respaced S = 2 and DDIM
    for f in files:
        a, b = np.load(f), np.load(root / "samples" / f.relative_to(one))
        assert a.shape == (10, 8, 8, 1)
        assert np.array_equal(a, b), f.name
    assert (root / "samples/simple/index.json").read_text() == \
        (one / "simple/index.json").read_text()
    assert sum("sample[simple] ancestral_beta: 10 images" in out for out in outs) == 1


@pytest.mark.slow
def test_a_two_node_stage_without_an_endpoint_stops_with_one_line_and_exit_2(
        trained: tuple[Path, dict], monkeypatch: pytest.MonkeyPatch) -> None:
    root, p = trained
    monkeypatch.delenv("DDPM_RDZV_ENDPOINT", raising=False)
    q = json.loads(json.dumps(p))
    q["bpd"]["nnodes"] = 2
    r = run_stage("bpd", root, q)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.startswith("error: bpd.nnodes: 2 machines meet at a rendezvous endpoint; "
                               "export DDPM_RDZV_ENDPOINT="), r.stderr
    assert r.stderr.count("\n") == 1 and "torchrun" not in r.stdout
