"""Helpers shared by the tests: a tiny network, loss and timestep sampler for the
training loop, and tiny
pipeline params with a runner for the stage scripts. `from helpers import ...` works under pytest
(rootdir-less tests/ is put on sys.path) and in the scripts tests run as (their own folder)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from torch import Tensor, nn

from ddpm_core import distributed as D
from ddpm_core.config import TrainConfig

# ----------------------------------------------------------------------------- training loop

T_FAKE = 10


class TinyNet(nn.Module):
    """conv -> + embedding(t) -> SiLU -> dropout -> conv: a stand-in for the U-Net."""

    def __init__(self, channels: int = 3, hidden: int = 8, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(channels, hidden, 3, padding=1)
        self.emb = nn.Embedding(T_FAKE, hidden)
        self.norm = nn.GroupNorm(2, hidden)
        self.drop = nn.Dropout(dropout)
        self.conv_out = nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        h = self.conv_in(x) + self.emb(t)[:, :, None, None]
        return self.conv_out(self.drop(nn.functional.silu(self.norm(h))))


class FakeLoss:
    """The Loss protocol on a toy forward process; NaN at a chosen call."""

    def __init__(self, nan_at_call: int | None = None) -> None:
        self.alpha_bar = torch.linspace(0.99, 0.1, T_FAKE)
        self.calls, self.nan_at_call = 0, nan_at_call

    def losses(self, model, x0: Tensor, t: Tensor, noise: Tensor) -> dict[str, Tensor]:
        a = self.alpha_bar.to(x0.device)[t][:, None, None, None]
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        mse = ((model(x_t, t) - noise) ** 2).mean(dim=(1, 2, 3))
        self.calls += 1
        if self.calls == self.nan_at_call:
            mse = mse * float("nan")
        return {"loss": mse, "mse": mse}


class FakeSampler:
    """The timestep-sampler protocol; weights depend on the loss history (state to resume)."""

    def __init__(self) -> None:
        self.history = torch.zeros(T_FAKE, dtype=torch.float64)
        self.count = torch.zeros(T_FAKE, dtype=torch.int64)

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        dev = generator.device
        t = torch.randint(0, T_FAKE, (n,), generator=generator, device=dev)
        mean = self.history / self.count.clamp(min=1)
        w = (1.0 + 0.1 * torch.tanh(mean)).float().to(dev)
        return t, w[t]

    def update(self, t: Tensor, losses: Tensor) -> None:
        self.history.index_add_(0, t.cpu(), losses.detach().double().cpu())
        self.count.index_add_(0, t.cpu(), torch.ones_like(t.cpu()))

    def state_dict(self) -> dict[str, Tensor]:
        return {"history": self.history.clone(), "count": self.count.clone()}

    def load_state_dict(self, d: dict[str, Tensor]) -> None:
        self.history, self.count = d["history"].clone(), d["count"].clone()


def tiny_cfg(**kw: object) -> TrainConfig:
    """Seconds-sized settings; ema_decay 0.9 so the EMA moves visibly in a few steps."""
    base = dict(steps=12, batch_size=8, lr=1e-3, warmup_steps=3, grad_clip=1.0, ema_decay=0.9,
                hflip=True, checkpoint_every=5, keep_checkpoints=2, log_every=5, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def tiny_data(n: int = 20) -> Tensor:
    """n random uint8 images [n, 3, 8, 8]."""
    return torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(123))


def tiny_model(dropout: float = 0.0) -> TinyNet:
    """A freshly initialised TinyNet with fixed weights."""
    torch.manual_seed(0)
    return TinyNet(dropout=dropout)


def cpu_info() -> D.DistInfo:
    """Single-process CPU placement."""
    return D.DistInfo(0, 1, 0, torch.device("cpu"))


# ----------------------------------------------------------------------------- stages

REPO = Path(__file__).resolve().parents[1]


def tiny_params() -> dict:
    """The shipped params.yaml shrunk to seconds of work."""
    p = yaml.safe_load((REPO / "params.yaml").read_text())
    p["diffusion"]["timesteps"] = 10
    p["model"].update(base_channels=8, channel_mult=[1], attn_resolutions=[])
    p["train"].update(steps=4, batch_size=8, log_every=1, checkpoint_every=2, warmup_steps=1)
    p["sample"].update(num_samples=8, batch_size=8, steps=[2], grid_size=4)
    p["bpd"].update(num_images=4, batch_size=4, t_batch=5, steps=[5])
    p["gamma"].update(num_images=4, batch_size=8)
    # the bound keeps σ² npr, sn (dvc.yaml's plots name their columns); sampling draws them only
    # where a test asks (tests/test_nnhead.py), so the other stage tests keep their sample sets
    p["sample"]["variances"] = [v for v in p["sample"]["variances"] if v not in ("npr", "sn")]
    p["nnhead"].update(steps=2, batch_size=8)
    p["nll"].update(num_images=2, batch_size=2, rtol=1e-3, atol=1e-3)
    p["fid"].update(classifier_epochs=1, kid_subset_size=4)
    return p


# DVC foreach stages: `<stage> <variant>`
PER_VARIANT = {"train", "gamma", "nnhead", "sample", "bpd", "nll", "fid"}


def run_stage(stage: str, cwd: Path, params: dict | str, env: dict | None = None,
              variant: str | None = None):
    """`python -m pipeline.<stage> [variant]` in cwd; a per-variant stage defaults to the
    first variant of the params."""
    text = params if isinstance(params, str) else yaml.safe_dump(params, sort_keys=False)
    (cwd / "params.yaml").write_text(text)
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    full_env.pop("DDPM_PARAMS", None)
    args = []
    if stage in PER_VARIANT:
        if variant is None and isinstance(params, dict) and isinstance(params.get("variants"),
                                                                       dict):
            variant = next(iter(params["variants"]), None)
        args = [variant or "simple"]
    return subprocess.run([sys.executable, "-m", f"pipeline.{stage}", *args], cwd=cwd,
                          env=full_env, capture_output=True, text=True, timeout=300)


FID = {"ancestral_beta": 3.5, "ancestral_beta_tilde": 4.25, "respaced_beta_S2": 9.0,
       "ddim_S2": 6.0}


def make_outputs(root: Path, names: tuple[str, ...] = ("simple", "vlb")) -> dict:
    """The files train, sample, bpd, features and fid write (pipeline.records' layout), with
    known numbers; returns the params."""
    from pipeline.records import SamplerSpec, VariantPaths

    p = tiny_params()
    p["variants"] = {k: v for k, v in p["variants"].items() if k in names}
    T = p["diffusion"]["timesteps"]
    (root / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    specs = [SamplerSpec("ancestral", T, "fixed_large"), SamplerSpec("ancestral", T, "fixed_small"),
             SamplerSpec("respaced", 2, "fixed_large", "quadratic"),
             SamplerSpec("ddim", 2, None, "quadratic", 0.0)]
    assert [s.name for s in specs] == list(FID)

    def put(path: Path, obj: object) -> None:
        path = root / path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(obj if isinstance(obj, str) else json.dumps(obj))

    for k, name in enumerate(names):
        vp = VariantPaths(name)
        (root / vp.samples).mkdir(parents=True)
        (root / vp.grids).mkdir(parents=True)
        for spec in specs:
            np.save(root / vp.samples / f"{spec.name}.npy", np.full((8, 8, 8, 1), 40 * k, np.uint8))
            Image.fromarray(np.full((20, 20), 128, np.uint8)).save(
                root / vp.grids / f"{spec.name}.png")
        put(vp.sample_index, {"variant": name, "source": str(vp.model),
                              "samplers": [{**s.to_dict(), "num_samples": 8} for s in specs]})
        put(vp.train_metrics, {name: {"final_loss": 0.05 + k}})
        put(vp.timings("train"), {"seconds": 1.0, "steps": 4})
        bpd = {"bpd_sigma2_beta": 2.5 + k, "bpd_sigma2_beta_tilde": 3.5 + k,
               "bpd_sigma2_analytic": 2.25 + k}
        for K in (2, 5, T):  # bpd_<sigma2>_K<K>: the K = T value is bpd_<sigma2>
            for key, full in list(bpd.items())[:3]:
                bpd[f"{key}_K{K}"] = full + (T - K) * 0.125
        put(vp.bpd_metrics, {name: bpd})
        put(vp.bpd_steps, "K,sigma2_beta,sigma2_beta_tilde,sigma2_analytic\n" + "".join(
            f"{K},{bpd[f'bpd_sigma2_beta_K{K}']},{bpd[f'bpd_sigma2_beta_tilde_K{K}']},"
            f"{bpd[f'bpd_sigma2_analytic_K{K}']}\n" for K in (2, 5, T)))
        put(vp.nll_metrics, {name: {"nll_ode_bpd": 2.125 + k, "nll_ode_bpd_se": 0.0625,
                                    "nll_nfe_mean": 150.0 + k, "nll_ode_vardeq_bpd": 2.0 + k,
                                    "nll_ode_vardeq_bpd_se": 0.125,
                                    "nll_vardeq_nfe_mean": 100.0 + k}})
        put(vp.fid_metrics, {name: {f"fid_{s}": v + k for s, v in FID.items()}})
        put(vp.fid_details, {s: {"fid": v + k, "kid_mean": 0.01, "kid_std": 0.001}
                             for s, v in FID.items()})
        put(vp.fid_steps, f"steps,ddim,respaced\n2,{6.0 + k},{9.0 + k}\n{T},,{3.5 + k}\n")
        put(vp.loss_csv, "step,loss,grad_norm,lr\n1,1.0,1.0,0.001\n2,0.5,0.8,0.001\n")
        rows = ["term,t,sigma2_beta,sigma2_beta_tilde", "L_T,,0.001,0.001"]
        rows += [f"L_{i},{i + 1},{0.1 * (i + 1)},{0.2 * (i + 1)}" for i in range(T - 1, -1, -1)]
        put(vp.bpd_terms, "\n".join(rows) + "\n")
    put(Path("features/info.json"), {
        "features": "digits_classifier", "label": "FID (digits classifier)",
        "reference": "train split", "reference_images": 1437, "floor_images": 360,
        "classifier_test_accuracy": 0.95, "floor": {"fid": 0.75, "kid_mean": 0.0}})
    return p


# ----------------------------------------------------------------------------- pipeline repos
# A real DVC pipeline in a temporary git repo, as after the README's install: the project's
# files copied, <root>/.venv pointing at this interpreter's environment.

BIN = Path(sys.executable).parent
DVC = str(BIN / "dvc")
PIPELINE_FILES = ("ddpm_core", "pipeline", "dvc.yaml", "pyproject.toml", "README.md",
                  ".gitignore", ".dvcignore", "data/raw/README.md")


def pipeline_env(venv_on_path: bool = False) -> dict[str, str]:
    """os.environ without MLflow/DVC/git/venv/PYTHONPATH settings of the caller, with a git
    identity.
    The venv's bin is on PATH only when asked (`.venv/bin/dvc repro` must work without it)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "DVC_", "GIT_DIR", "GIT_WORK_TREE", "VIRTUAL_ENV",
                                "DDPM_", "PYTHONPATH"))}
    path = [d for d in env.get("PATH", "").split(os.pathsep) if Path(d).resolve() != BIN.resolve()]
    env["PATH"] = os.pathsep.join([str(BIN), *path] if venv_on_path else path)
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.com", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@example.com", DVC_NO_ANALYTICS="1")
    return env


def sh(cmd: list[str], cwd: Path, env: dict, ok: bool = True,
       timeout: int = 900) -> subprocess.CompletedProcess:
    """Run a command; with ok, assert it succeeded (its output in the message)."""
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if ok:
        assert r.returncode == 0, f"{cmd} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr}"
    return r


def pipeline_repo(root: Path, params: dict, env: dict) -> Path:
    """root as a committed git + DVC repo holding the pipeline with these params (no repro)."""
    import shutil

    for name in PIPELINE_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, root / name)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / ".venv").symlink_to(BIN.parent, target_is_directory=True)
    for cmd in (["git", "init", "-q"], [DVC, "init", "-q"], ["git", "add", "-A"],
                ["git", "commit", "-qm", "pipeline"]):
        sh(cmd, root, env)
    return root


# ----------------------------------------------------------------------------- mlflow server


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(argv: Callable[[int], list[str]], timeout: float, world: int = 2) -> None:
    """Run `world` processes argv(rank) with the env vars torchrun sets (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR/PORT on 127.0.0.1) from the repository root; each must exit 0."""
    port, procs = free_port(), []
    for rank in range(world):
        env = {**os.environ, "PYTHONPATH": str(REPO), "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(argv(rank), cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, err


def start_mlflow_server(db: str, port: int, artifacts: Path) -> subprocess.Popen:
    """`mlflow server` on 127.0.0.1:port over the store db, once it answers /health."""
    exe = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen(
        [str(exe), "server", "--backend-store-uri", db, "--host", "127.0.0.1", "--port",
         str(port), "--workers", "1", "--default-artifact-root", artifacts.as_uri()],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        assert proc.poll() is None, "mlflow server exited"
        assert time.monotonic() < deadline, "mlflow server did not answer within 120 s"
        time.sleep(0.5)


def stop_mlflow_server(proc: subprocess.Popen) -> None:
    """Stop a server of start_mlflow_server (its whole process group)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=20)
    except ProcessLookupError:
        pass
