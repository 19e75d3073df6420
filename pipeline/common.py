"""Shared plumbing of the stage scripts: params loading (and the variant a foreach stage runs
for), one-line errors, atomic writes and model files. File paths, sampler specs and metric keys
are pipeline/records.py's.

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

from ddpm_core.config import ConfigError, Params, VariantConfig, load_params

if TYPE_CHECKING:  # torch is imported where it is used: a bad params.yaml fails in a blink
    import torch

PARAMS_FILE = Path("params.yaml")
MODEL_FILE_FORMAT = "ddpm-pipeline-model/1"


class StageError(RuntimeError):
    """A problem the user fixes (missing input, diverged training); printed as one line."""


def _runtime_errors() -> tuple[type[BaseException], ...]:
    """Library exceptions whose messages are written for users (imported lazily)."""
    from ddpm_core.checkpoint import CheckpointError
    from ddpm_core.data import DataError
    from ddpm_core.fid import MetricsError
    from ddpm_core.training import TrainingDiverged

    return (StageError, CheckpointError, DataError, MetricsError, TrainingDiverged,
            FileNotFoundError)  # includes records.MissingResult


def fail(msg: str, code: int) -> None:
    """Print `error: msg` (one line) to stderr and exit with `code`."""
    print(f"error: {' '.join(str(msg).split())}", file=sys.stderr)
    sys.exit(code)


def run_stage(main: Callable[..., None], check: Callable[..., None] | None = None,
              params_path: str | Path | None = None, per_variant: bool = False) -> None:
    """Load params.yaml (exit 2 on any problem), run `check`, then `main`; errors are one line.

    A per-variant stage (`python -m pipeline.<stage> <variant>`, DVC's foreach) gets the
    variant's VariantConfig as a second argument."""
    path = Path(params_path or os.environ.get("DDPM_PARAMS", PARAMS_FILE))
    args: tuple = ()
    try:
        params = load_params(path)
        if per_variant:
            args = (variant_from_argv(params),)
        if check is not None:
            check(params, *args)
    except ConfigError as e:
        fail(str(e), 2)
    try:
        main(params, *args)
    except ConfigError as e:  # a cross-field problem found once the data are known
        fail(str(e), 2)
    except _runtime_errors() as e:
        fail(str(e), 1)


def variant_from_argv(params: Params) -> VariantConfig:
    """The variant named on the command line (sys.argv[1]), checked against params.yaml."""
    stage = Path(sys.argv[0]).stem if sys.argv[0] not in ("-m", "-c") else "stage"
    if len(sys.argv) != 2:
        raise ConfigError(f"usage: python -m pipeline.{stage} <variant>; one of "
                          f"{sorted(params.variants)}")
    name = sys.argv[1]
    if name not in params.variants:
        raise ConfigError(f"variants.{name}: no such variant in params.yaml; one of "
                          f"{sorted(params.variants)}")
    return params.variants[name]


def stable_hash(obj: Any, n: int = 12) -> str:
    """Short SHA-256 of a JSON-able object (sorted keys): a deterministic key."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def relaunch_under_torchrun(module: str, n: int) -> None:
    """Unless already under torchrun, re-run `python -m module <args>` on n processes and exit."""
    if n <= 1 or "LOCAL_RANK" in os.environ:
        return
    exe = Path(sys.executable).with_name("torchrun")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "torch.distributed.run"]
    cmd += ["--standalone", f"--nproc_per_node={n}", "-m", module, *sys.argv[1:]]
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
# Model files carry their own network and diffusion spec, so the evaluation stages never rebuild
# a network from params.yaml. (To be replaced by ddpm_core.modelfile.)


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

    from pipeline.records import DATA_DIR

    path = DATA_DIR / f"{split}.npy"
    if not path.is_file():
        raise StageError(f"{path}: not found; run the prepare stage first (dvc repro prepare)")
    arr = np.load(path, mmap_mode="r")
    return tuple(arr.shape[1:])  # type: ignore[return-value]


@dataclass
class LoadedModel:
    """A network to evaluate with its diffusion (what a model file holds)."""

    net: torch.nn.Module
    diffusion: Any
    spec: dict
    meta: dict
    source: str

    @property
    def image_shape_chw(self) -> tuple[int, int, int]:
        u = self.spec["unet"]
        return (u["in_channels"], u["image_size"], u["image_size"])


def save_model(path: Path, spec: dict, weights: dict, meta: dict) -> None:
    """A model file: spec {unet, schedule, timesteps, mean_type, var_type}, weights
    {"ema": state_dict, "model": state_dict}, meta (free-form, JSON-able)."""
    save_torch({"format": MODEL_FILE_FORMAT, **spec, "meta": meta, **weights}, path)


def load_model_file(path: Path, which: str = "ema") -> LoadedModel:
    """A model file written by save_model, as (network, diffusion)."""
    import torch

    from ddpm_core.diffusion import Diffusion
    from ddpm_core.unet import UNet, UNetConfig

    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path}: not found; run the train stage first (dvc repro)")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not (isinstance(blob, dict) and blob.get("format") == MODEL_FILE_FORMAT):
        raise StageError(f"{path}: not a model file of this pipeline")
    ucfg = UNetConfig(**{k: tuple(v) if isinstance(v, list) else v
                         for k, v in blob["unet"].items()})
    net = UNet(ucfg)
    net.load_state_dict(blob[which])
    diff = Diffusion.from_schedule(blob["schedule"], blob["timesteps"], blob["mean_type"],
                                   blob["var_type"])
    spec = {k: blob[k] for k in ("unet", "schedule", "timesteps", "mean_type", "var_type")}
    return LoadedModel(net.eval(), diff, spec, blob.get("meta", {}), str(path))
