"""Shared plumbing of the stage scripts: paths, params loading, one-line errors, atomic writes,
and building the (network, diffusion) pairs every stage evaluates.

Every stage runs from the repository root (DVC's default wdir). A stage loads and validates the
whole params.yaml before doing any work; a bad value prints `error: <key>: <why>` to stderr and
exits with status 2, a runtime problem (missing file, NaN loss, ...) with status 1.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ddpm_core.config import ConfigError, Params, load_params

if TYPE_CHECKING:  # torch is imported where it is used: a bad params.yaml fails in a blink
    import torch

PARAMS_FILE = Path("params.yaml")
DATA_DIR = Path("data/prepared")
CKPT_DIR = Path("checkpoints")
MODELS_DIR = Path("models")
SAMPLES_DIR = Path("samples")
BPD_DIR = Path("bpd")
FID_DIR = Path("fid")
METRICS_DIR = Path("metrics")
PLOTS_DIR = Path("plots")
REPORTS_DIR = Path("reports")

MODEL_FILE_FORMAT = "ddpm-pipeline-model/1"

# Names shown for the two fixed reverse variances (metric keys stay ASCII for DVC and MLflow).
SIGMA2_NAME = {"fixed_large": "sigma2_beta", "fixed_small": "sigma2_beta_tilde",
               "learned": "sigma2_learned", "learned_range": "sigma2_learned_range"}
SIGMA2_LABEL = {"fixed_large": "σ² = β", "fixed_small": "σ² = β̃",
                "learned": "σ² learned", "learned_range": "σ² learned (range)"}


class StageError(RuntimeError):
    """A problem the user fixes (missing input, diverged training); printed as one line."""


def _runtime_errors() -> tuple[type[BaseException], ...]:
    """Library exceptions whose messages are written for users (imported lazily)."""
    from ddpm_core.checkpoint import CheckpointError
    from ddpm_core.data import DataError
    from ddpm_core.fid import MetricsError
    from ddpm_core.training import TrainingDiverged
    from pipeline.tracking import TrackingUnavailable

    return (StageError, CheckpointError, DataError, MetricsError, TrainingDiverged,
            TrackingUnavailable)


# Batch params to lower when a stage runs out of accelerator memory.
OOM_HINT = ("lower sample.batch_size (sample), bpd.batch_size or bpd.t_batch (bpd: one "
            "network call holds batch_size x t_batch images), or train.batch_size (train)")


def describe_os_error(e: OSError) -> str:
    """One line for a failed file operation: the path, the reason and the fix."""
    import errno

    if e.filename is None:  # raised with a message of ours, not by the OS
        return str(e) or type(e).__name__
    where = str(e.filename)
    if e.filename2:
        where = f"{where} -> {e.filename2}"
    reason = e.strerror or type(e).__name__
    fix = {errno.ENOSPC: "free disk space and run again",
           errno.EFBIG: "the file size limit was reached; raise it (ulimit -f) or free space",
           errno.EDQUOT: "the disk quota is exhausted; free space and run again",
           errno.EACCES: "make the folder writable (chmod u+w) or run from a writable checkout",
           errno.EPERM: "make the folder writable (chmod u+w) or run from a writable checkout",
           errno.EROFS: "the file system is read-only; run from a writable checkout",
           errno.ENOENT: "run the stage that writes it first (dvc repro)"}.get(e.errno, "")
    return f"{where}: {reason}" + (f"; {fix}" if fix else "")


def fail(msg: str, code: int) -> None:
    """Print `error: msg` (one line) to stderr and exit with `code`."""
    print(f"error: {' '.join(str(msg).split())}", file=sys.stderr)
    sys.exit(code)


def run_stage(main: Callable[[Params], None], check: Callable[[Params], None] | None = None,
              params_path: str | Path | None = None) -> None:
    """Load params.yaml (exit 2 on any problem), run `check`, then `main`; errors are one line."""
    path = Path(params_path or os.environ.get("DDPM_PARAMS", PARAMS_FILE))
    try:
        params = load_params(path)
        if check is not None:
            check(params)
    except ConfigError as e:
        fail(str(e), 2)
    try:
        main(params)
    except ConfigError as e:  # a cross-field problem found once the data are known
        fail(str(e), 2)
    except _runtime_errors() as e:
        fail(str(e), 1)
    except OSError as e:  # disk full, permissions, a missing file: no traceback
        fail(describe_os_error(e), 1)
    except RuntimeError as e:
        if "out of memory" not in str(e).lower():
            raise
        fail(f"out of memory ({str(e).splitlines()[0][:120]}); {OOM_HINT}", 1)


def stable_hash(obj: Any, n: int = 12) -> str:
    """Short SHA-256 of a JSON-able object (sorted keys): a deterministic key."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def relaunch_under_torchrun(module: str, n: int) -> None:
    """Unless already under torchrun, re-run `python -m module` on n processes and exit."""
    if n <= 1 or "LOCAL_RANK" in os.environ:
        return
    exe = Path(sys.executable).with_name("torchrun")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "torch.distributed.run"]
    cmd += ["--standalone", f"--nproc_per_node={n}", "-m", module]
    print(f"{module}: " + " ".join(cmd), flush=True)
    sys.exit(subprocess.call(cmd))


@contextmanager
def scratch_dir() -> Iterator[Path]:
    """A throwaway folder: where non-zero ranks put what only rank 0 keeps."""
    tmp = Path(tempfile.mkdtemp(prefix="ddpm-rank-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def device() -> torch.device:
    """The GPU when there is one, the CPU otherwise."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ----------------------------------------------------------------------------- atomic writes


def write_json(obj: Any, path: Path) -> None:
    """JSON to a temp file beside `path`, then os.replace."""
    write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", path)


def write_text(text: str, path: Path) -> None:
    """Text to a temp file beside `path`, then os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_torch(obj: Any, path: Path) -> None:
    """torch.save to a temp file beside `path`, then os.replace."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield an empty temp folder beside `path`; on success it replaces `path` as a whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    tmp.chmod(0o755)
    try:
        yield tmp
        old = path.with_name(f".{path.name}.old")
        if old.exists():
            shutil.rmtree(old)
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


# ----------------------------------------------------------------------------- models


def unet_config(params: Params, image_shape_hwc: tuple[int, ...], out_channels: int) -> Any:
    """The U-Net of params.model (a preset plus overrides) sized for the data's [H, W, C]."""
    from ddpm_core.unet import PRESETS

    m = params.model
    overrides = {k: getattr(m, k) for k in ("base_channels", "channel_mult", "num_res_blocks",
                                            "attn_resolutions", "dropout")
                 if getattr(m, k) is not None}
    h, w, c = image_shape_hwc
    if h != w:
        raise ConfigError(f"data: images are {h}x{w}; the U-Net needs square images "
                          "(set data.image_size for a folder)")
    try:
        return dataclasses.replace(PRESETS[m.preset], image_size=h, in_channels=c,
                                   out_channels=out_channels, **overrides)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None


def data_shape(split: str = "train") -> tuple[int, int, int]:
    """[H, W, C] of a prepared split, read from the .npy header only."""
    import numpy as np

    path = DATA_DIR / f"{split}.npy"
    if not path.is_file():
        raise StageError(f"{path}: not found; run the prepare stage first (dvc repro prepare)")
    arr = np.load(path, mmap_mode="r")
    return tuple(arr.shape[1:])  # type: ignore[return-value]


@dataclass
class LoadedModel:
    """A network to evaluate, with its diffusion; `name` keys every output file."""

    name: str
    net: torch.nn.Module
    diff: Any
    source: str
    image_shape_chw: tuple[int, int, int]


def model_names(params: Params) -> list[str]:
    """Every model the evaluation stages cover: the trained variants, then the pretrained one."""
    names = [v.name for v in params.variants]
    if params.pretrained.path is not None:
        names.append(params.pretrained.name)
    return names


def check_model_names(params: Params) -> None:
    """pretrained.name must not collide with a variant name."""
    if params.pretrained.path is not None and params.pretrained.name in \
            [v.name for v in params.variants]:
        raise ConfigError(f"pretrained.name: {params.pretrained.name!r} is also a variant name; "
                          "choose another")


def _from_model_file(name: str, blob: dict, use_ema: bool, source: str) -> LoadedModel:
    from ddpm_core.diffusion import Diffusion
    from ddpm_core.unet import UNet, UNetConfig

    ucfg = UNetConfig(**{k: tuple(v) if isinstance(v, list) else v
                         for k, v in blob["unet"].items()})
    net = UNet(ucfg)
    net.load_state_dict(blob["ema" if use_ema else "model"])
    diff = Diffusion.from_schedule(blob["schedule"], blob["timesteps"], blob["mean_type"],
                                   blob["var_type"])
    return LoadedModel(name, net.eval(), diff, source,
                       (ucfg.in_channels, ucfg.image_size, ucfg.image_size))


def load_models(params: Params, use_ema: bool) -> list[LoadedModel]:
    """The trained variants (models/<name>.pt) and, when set, the pretrained checkpoint."""
    import torch

    from ddpm_core.checkpoint import CheckpointError, load_checkpoint
    from ddpm_core.diffusion import Diffusion

    out = []
    for v in params.variants:
        path = MODELS_DIR / f"{v.name}.pt"
        if not path.is_file():
            raise StageError(f"{path}: not found; run the train stage first (dvc repro train)")
        blob = torch.load(path, map_location="cpu", weights_only=True)
        out.append(_from_model_file(v.name, blob, use_ema, str(path)))
    p = params.pretrained
    if p.path is None:
        return out
    path = Path(p.path)
    if not path.exists():
        raise StageError(f"pretrained.path: {path} not found; point it at one of our checkpoints "
                         "(models/<variant>.pt or checkpoints/.../ckpt_*.pt) or a diffusers "
                         "DDPM folder (format: diffusers)")
    diff = Diffusion.from_schedule(params.schedule, params.diffusion.timesteps, p.mean_type,
                                   p.var_type)
    if p.format == "diffusers":
        from ddpm_core.convert import load_diffusers_unet

        net = load_diffusers_unet(path)
        cfg = net.cfg if hasattr(net, "cfg") else None
        shape = ((cfg.in_channels, cfg.image_size, cfg.image_size) if cfg is not None
                 else _chw(data_shape("test")))
        out.append(LoadedModel(p.name, net.eval(), diff, f"diffusers:{path}", shape))
        return out
    from ddpm_core.checkpoint import MAGIC

    if not path.is_file():
        raise StageError(f"pretrained.path: {path} is a folder; format 'ours' wants a file "
                         "(models/<variant>.pt or ckpt_*.pt), format 'diffusers' a folder")
    with path.open("rb") as f:
        is_training_checkpoint = f.read(len(MAGIC)) == MAGIC
    if not is_training_checkpoint:
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # not a torch file at all
            raise StageError(f"pretrained.path: {path} is not a model file of this pipeline "
                             f"({type(e).__name__}); use models/<name>.pt or ckpt_*.pt") from None
        if not (isinstance(blob, dict) and blob.get("format") == MODEL_FILE_FORMAT):
            raise StageError(f"pretrained.path: {path} is not a model file of this pipeline; "
                             "use models/<variant>.pt, ckpt_*.pt or format: diffusers")
        out.append(_from_model_file(p.name, blob, use_ema, str(path)))
        return out
    try:  # a training checkpoint of ddpm_core.checkpoint: the network comes from params.model
        state = load_checkpoint(path)
    except CheckpointError as e:
        raise StageError(f"pretrained.path: {e}") from None
    from ddpm_core.unet import UNet

    hwc = data_shape("test")
    net = UNet(unet_config(params, hwc, diff.out_channels(hwc[2])))
    net.load_state_dict(state["ema" if use_ema else "model"])
    out.append(LoadedModel(p.name, net.eval(), diff, str(path), _chw(hwc)))
    return out


def _chw(hwc: tuple[int, ...]) -> tuple[int, int, int]:
    return (hwc[2], hwc[0], hwc[1])


def read_json(path: Path) -> Any:
    """A JSON file the pipeline wrote, with a one-line error when it is missing."""
    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path}: not found; run the stage that writes it (dvc repro)")
    return json.loads(path.read_text())
