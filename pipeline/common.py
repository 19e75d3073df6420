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
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any

from ddpm_core.errors import is_out_of_memory, loaded, out_of_memory_line
from ddpm_core.files import atomic_dir, atomic_write_text
from ddpm_core.files import write_json as _write_json
from pipeline.params import ConfigError, Params, load_params, rendezvous

__all__ = ["atomic_dir", "write_text", "write_json"]

if TYPE_CHECKING:  # torch is imported where it is used: a bad params.yaml fails in a blink
    import torch

    from ddpm_core.distributed import DistInfo
    from ddpm_core.modelfile import LoadedModel
    from ddpm_core.unet import UNetConfig
    from ddpm_core.units import Shard, UnitStore

PARAMS_FILE = Path("params.yaml")


class StageError(RuntimeError):
    """A problem the user fixes (missing input, diverged training); printed as one line."""


def _runtime_errors() -> tuple[type[BaseException], ...]:
    """Library exceptions whose messages are written for users: those of the modules already
    loaded (ddpm_core.errors.loaded), so the error path imports nothing heavy.
    FileNotFoundError includes records.read_json's; tracking's errors are StageErrors."""
    return (StageError, FileNotFoundError,
            *loaded("ddpm_core.checkpoint:CheckpointError", "ddpm_core.data:DataError",
                    "ddpm_core.fid:MetricsError", "ddpm_core.modelfile:ModelFileError",
                    "ddpm_core.training:TrainingDiverged"))


# Batch params to lower when a stage runs out of memory (accelerator or CPU).
OOM_HINT = ("lower sample.batch_size (sample), bpd.batch_size or bpd.t_batch (bpd: one "
            "network call holds batch_size x t_batch images), or train.batch_size (train)")


def describe_os_error(e: OSError) -> str:
    """One line for a failed file operation: the path, the reason and the fix."""
    import errno

    if e.filename is None:  # raised with a message of ours, not by the OS
        return str(e) or type(e).__name__
    where = f"{e.filename} -> {e.filename2}" if e.filename2 else str(e.filename)
    reason = e.strerror or type(e).__name__
    fix = {errno.ENOSPC: "free disk space and run again",
           errno.EFBIG: "the file size limit was reached; raise it (ulimit -f) or free space",
           errno.EDQUOT: "the disk quota is exhausted; free space and run again",
           errno.EACCES: "make the folder writable (chmod u+w) or run from a writable checkout",
           errno.EPERM: "make the folder writable (chmod u+w) or run from a writable checkout",
           errno.EROFS: "the file system is read-only; run from a writable checkout",
           errno.ENOENT: "run the stage that writes it first (dvc repro)"}.get(
        e.errno, "check that the disk has free space and the folder is writable")
    return f"{where}: {reason}; {fix}"


def fail(msg: str, code: int) -> None:
    """Print `error: msg` (one line) to stderr and exit with `code`."""
    print(f"error: {' '.join(str(msg).split())}", file=sys.stderr)
    sys.exit(code)


def run_stage(main: Callable[..., None], params_path: str | Path | None = None,
              per_variant: bool = False, shards: bool = False) -> None:
    """Load params.yaml (exit 2 on any problem), then run `main`; errors are one line.

    A per-variant stage (`python -m pipeline.<stage> <variant>`, DVC's foreach) gets the
    variant's VariantConfig as a second argument; a stage working in units (shards) also takes
    `--shard i/N` after it and gets the Shard (or None) as a third."""
    path = Path(params_path or os.environ.get("DDPM_PARAMS", PARAMS_FILE))
    try:
        params = load_params(path)
        args = stage_args(params, shards) if per_variant else ()
        main(params, *args)
    except ConfigError as e:  # also a cross-field problem found once the data are known
        fail(str(e), 2)
    except _runtime_errors() as e:
        fail(str(e), 1)
    except OSError as e:  # disk full, permissions, a missing file: no traceback
        fail(describe_os_error(e), 1)
    except (RuntimeError, MemoryError) as e:
        if not is_out_of_memory(e):
            raise
        fail(out_of_memory_line(e, OOM_HINT), 1)


def stage_args(params: Params, shards: bool = False) -> tuple:
    """(VariantConfig,) of the variant named on the command line (sys.argv[1]), checked
    against params.yaml; with shards, (VariantConfig, Shard | None) of `<variant> [--shard i/N]`."""
    from ddpm_core.units import Shard

    stage = Path(sys.argv[0]).stem if sys.argv[0] not in ("-m", "-c") else "stage"
    args = sys.argv[1:]
    shard = None
    if shards and len(args) == 3 and args[1] == "--shard":
        try:
            shard = Shard.parse(args.pop())
        except ValueError as e:
            raise ConfigError(str(e)) from None
        args.pop()
    if len(args) != 1:
        raise ConfigError(f"usage: python -m pipeline.{stage} <variant>"
                          + (" [--shard i/N]" if shards else "") + f"; one of "
                          f"{sorted(params.variants)}")
    name = args[0]
    if name not in params.variants:
        raise ConfigError(f"variants.{name}: no such variant in params.yaml; one of "
                          f"{sorted(params.variants)}")
    return (params.variants[name], shard) if shards else (params.variants[name],)


def unit_store(shard: Shard | None) -> UnitStore:
    """The scratch area of the stages' units (ddpm_core.units): $DDPM_SCRATCH (a folder every
    machine of a cluster job sees), else .scratch/ in the repository (git and DVC ignore it)."""
    from ddpm_core.units import UnitStore

    return UnitStore(Path(os.environ.get("DDPM_SCRATCH") or ".scratch") / "units", shard)


def finish_units(store: UnitStore, is_main: bool, what: str) -> None:
    """After a stage's outputs are written: a shard's units stay (the stage run without
    --shard assembles them); else rank 0 removes them. One line of what was reused."""
    line = store.summary(always=store.shard is not None)
    if is_main and line:
        kept = (f" (shard {store.shard}: kept in {store.root} for the stage run without --shard "
                "to assemble)" if store.shard else "")
        print(f"{what}: units {line}{kept}", flush=True)
    if is_main and store.shard is None:
        store.remove()


def stable_hash(obj: Any, n: int = 12) -> str:
    """Short SHA-256 of a JSON-able object (sorted keys): a deterministic key."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def start_processes(module: str, n: int, nnodes: int = 1) -> DistInfo:
    """This process's ddpm_core.distributed info, after relaunching `module` on n processes on
    each of nnodes machines."""
    from ddpm_core.distributed import init_distributed

    relaunch_under_torchrun(module, n, nnodes)
    return init_distributed(device())


def relaunch_under_torchrun(module: str, n: int, nnodes: int = 1) -> None:
    """Unless already under torchrun, re-run `python -m module <args>` on n processes and exit.

    On nnodes > 1 machines every machine runs the same stage command and its torchrun agent
    meets the others through torchrun's c10d rendezvous (params.rendezvous: the endpoint from
    the environment); torchrun numbers the processes, and global rank 0 writes the outputs."""
    rdzv = rendezvous(f"{module.removeprefix('pipeline.')}.nnodes", nnodes, os.environ)
    if n * nnodes <= 1 or "LOCAL_RANK" in os.environ:
        return
    exe = Path(sys.executable).with_name("torchrun")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "torch.distributed.run"]
    if rdzv is None:
        cmd += ["--standalone", f"--nproc_per_node={n}"]
    else:
        cmd += [f"--nnodes={rdzv.nnodes}", f"--nproc_per_node={n}", "--rdzv_backend=c10d",
                f"--rdzv_endpoint={rdzv.endpoint}", f"--rdzv_id={rdzv.run_id}"]
    cmd += ["-m", module, *sys.argv[1:]]
    print(f"{module}: " + " ".join(cmd), flush=True)
    sys.exit(subprocess.call(cmd))


@contextmanager
def scratch_dir() -> Iterator[Path]:
    """A throwaway folder: where non-zero ranks put what only rank 0 keeps."""
    with tempfile.TemporaryDirectory(prefix="ddpm-rank-", ignore_cleanup_errors=True) as tmp:
        yield Path(tmp)


def device() -> torch.device:
    """ddpm_core.inference.default_device, imported on use (torch loads only when needed)."""
    from ddpm_core.inference import default_device

    return default_device()


# ----------------------------------------------------------------------------- atomic writes
# One writer for every stage: ddpm_core.files (temp file, fsync, rename, mode 0644);
# atomic_dir and write_text are re-exported for the stage scripts.


def write_text(text: str, path: Path) -> None:
    """Text through the one atomic writer (argument order of the stage scripts)."""
    atomic_write_text(path, text)


def write_json(obj: Any, path: Path) -> None:
    """JSON (keys in the order given) through the one atomic writer."""
    _write_json(obj, path, sort_keys=False)


# ----------------------------------------------------------------------------- models
# Model files carry their own network and diffusion spec, so the evaluation stages never rebuild
# a network from params.yaml (ddpm_core.modelfile).


def unet_config(params: Params, image_shape_hwc: tuple[int, ...],
                out_channels: int) -> UNetConfig:
    """The U-Net of params.model (a preset plus overrides) sized for the data's [H, W, C]."""
    from ddpm_core.unet import PRESETS

    overrides = {k: v for k, v in dataclasses.asdict(params.model).items()
                 if k != "preset" and v is not None}
    h, w, c = image_shape_hwc
    if h != w:
        raise ConfigError(f"data: images are {h}x{w}; the U-Net needs square images "
                          "(set data.image_size for a folder)")
    try:
        return dataclasses.replace(PRESETS[params.model.preset], image_size=h, in_channels=c,
                                   out_channels=out_channels, **overrides)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None


def variant_model(name: str, use_ema: bool) -> LoadedModel:
    """The trained model of variant `name` (its EMA weights when use_ema) as
    ddpm_core.modelfile.LoadedModel; one-line error."""
    from ddpm_core.modelfile import load_model_file
    from pipeline.records import VariantPaths

    path = VariantPaths(name).model
    if not path.is_file():
        raise StageError(f"{path}: not found; run the train stage first (dvc repro)")
    return load_model_file(path, "ema" if use_ema else "model")  # ModelFileError: one line


def variant_heads(name: str) -> tuple[dict[str, Any] | None, str | None]:
    """(heads, None) of variant `name` from nnhead@<name>'s folder, or (None, why) when that
    stage trained none (a model without heads: learned variance, not an ε-model, or
    nnhead.steps 0); one-line error when the folder is missing or the file bad."""
    from ddpm_core.api import load_heads
    from ddpm_core.headfile import HeadsFileError
    from pipeline.records import VariantPaths, read_json

    paths = VariantPaths(name)
    if not paths.heads_info.is_file():
        raise StageError(f"{paths.heads_info}: not found; σ² npr and sn need the heads of "
                         f"nnhead@{name}: run it first (dvc repro)")
    info = read_json(paths.heads_info)
    if info.get("heads") is None:
        return None, str(info.get("skipped") or "nnhead trained no heads")
    try:
        return load_heads(paths.heads), None
    except HeadsFileError as e:
        raise StageError(f"{e} (rerun nnhead@{name})") from None


# ----------------------------------------------------------------------------- signals
# Ctrl-C (SIGINT) and SIGTERM end a stage with one line and the shell's usual exit code. The
# handlers are installed when a stage starts (pipeline/__init__.py, before torch loads), so a
# signal during the imports or the set-up is no KeyboardInterrupt traceback and SIGTERM is not
# silent, and they override a SIGINT that the launching shell ignored: a non-interactive shell
# starts a background job (`dvc repro &` in a script) with SIGINT ignored, Python keeps that, and
# sampling then ran to the end through Ctrl-C. The handler raises SystemExit, so the atomic
# writers remove their temporary files on the way out; the training loop takes both signals
# over while it runs (ddpm_core.training: a checkpoint at the next step, then 128 + signal).

_STOP_WORDS = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}
_stopped_by: list[int] = []  # the signal that stopped the stage, once one has


def _stop(signum: int, frame: FrameType | None) -> None:
    for s in _STOP_WORDS:  # a second signal acts at once (the default action)
        signal.signal(s, signal.SIG_DFL)
    _stopped_by.append(signum)
    sig = signal.Signals(signum)
    os.write(2, f"error: {_STOP_WORDS[sig]} ({sig.name})\n".encode())  # safe in a handler
    raise SystemExit(128 + signum)


def _quiet_after_stop(kind: type[BaseException], e: BaseException,
                      tb: TracebackType | None) -> None:
    """An import interrupted inside a C extension turns the SystemExit into an ImportError: once
    a signal has stopped the stage, any uncaught exception just exits with 128 + signal."""
    if not _stopped_by:
        sys.__excepthook__(kind, e, tb)
        return
    sys.stdout.flush()
    os._exit(128 + _stopped_by[0])


def stop_on_signals() -> None:
    """SIGINT / SIGTERM: print `error: interrupted (SIGINT)` and exit 130 (143 for SIGTERM)."""
    if threading.current_thread() is threading.main_thread():
        for s in _STOP_WORDS:
            signal.signal(s, _stop)
        sys.excepthook = _quiet_after_stop


# ----------------------------------------------------------------------------- memory
# sample@<v> holds a sampler's images in RAM until it writes them, per value: the float32
# batches and their concatenation (api.sample), the uint8 array
# (data.to_numpy_images) and the previous sampler's uint8 array, still referenced meanwhile.
SAMPLE_BYTES_PER_VALUE = 4 + 4 + 1 + 1


def physical_memory() -> int:
    """Bytes of RAM this process may use: the machine's, or a smaller cgroup limit."""
    import psutil

    total = psutil.virtual_memory().total
    with suppress(OSError):  # no cgroup v2 limit file: the machine's
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    return total


def check_sample_memory(num_samples: int, image_shape_chw: tuple[int, ...]) -> None:
    """Refuse, before any sampling, a sample set that cannot fit in RAM (ConfigError)."""
    need = num_samples * math.prod(image_shape_chw) * SAMPLE_BYTES_PER_VALUE
    have = physical_memory()
    if need > have:
        shape = "x".join(map(str, image_shape_chw))
        raise ConfigError(f"sample.num_samples: {num_samples:,} images of {shape} need about "
                          f"{need / 1e9:,.1f} GB of RAM while sampling (num_samples x C x H x W "
                          f"x {SAMPLE_BYTES_PER_VALUE} bytes), more than the "
                          f"{have / 1e9:,.1f} GB here; lower sample.num_samples")
