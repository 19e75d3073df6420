"""Training checkpoints: atomic writes, a checksum that catches truncation, keep-last-k.

File layout (`ckpt_{step:08d}.pt`): 8-byte magic, 8-byte little-endian payload length,
32-byte SHA-256 of the payload, then the payload (`torch.save` of a dict). Files are written by
`ddpm_core.files.atomic_open` (temporary name, fsync, rename), so a crash leaves either the old
set of checkpoints or the new one, never a partial file under a checkpoint name. Loading
verifies magic, length, checksum, format version and required keys and raises
`CheckpointError` naming the file otherwise (never a silent partial load).
"""

from __future__ import annotations

import hashlib
import io
import pickle
import re
import struct
import warnings
from pathlib import Path

import torch

from ddpm_core.files import atomic_open, remove_stale_tmp

FORMAT_VERSION = 1
MAGIC = b"DDPMCKPT"
_HEADER = struct.Struct("<8sQ32s")
_NAME = re.compile(r"^ckpt_(\d{8,})\.pt$")
REQUIRED_KEYS = ("format_version", "step", "model", "ema", "optimizer", "scheduler",
                 "t_sampler", "data", "rng")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupt or of an unknown format."""


def checkpoint_path(ckpt_dir: Path, step: int) -> Path:
    """Path of the checkpoint written after `step` optimiser steps."""
    return Path(ckpt_dir) / f"ckpt_{step:08d}.pt"


def step_of(path: Path) -> int:
    """The step of a checkpoint file named by checkpoint_path (ValueError for another name)."""
    if (m := _NAME.match(Path(path).name)) is None:
        raise ValueError(f"{path}: not a checkpoint name (ckpt_<step>.pt)")
    return int(m.group(1))


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Checkpoint files in ckpt_dir, oldest step first."""
    names = Path(ckpt_dir).glob("ckpt_*.pt")  # none when the folder does not exist
    return sorted((p for p in names if _NAME.match(p.name)), key=step_of)


def save_checkpoint(state: dict, path: Path) -> None:
    """Write `state` to path atomically; identical states give byte-identical files."""
    buf = io.BytesIO()
    torch.save({"format_version": FORMAT_VERSION, **state}, buf)
    payload = buf.getbuffer()
    header = _HEADER.pack(MAGIC, len(payload), hashlib.sha256(payload).digest())
    with atomic_open(path) as f:
        f.write(header)
        f.write(payload)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """Read and verify a checkpoint; raises CheckpointError naming the file on any defect."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
    if len(raw) < _HEADER.size:
        raise CheckpointError(f"checkpoint {path} is truncated ({len(raw)} bytes, header is "
                              f"{_HEADER.size})")
    magic, length, digest = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise CheckpointError(f"{path} is not a DDPM checkpoint (bad magic {magic!r})")
    payload = memoryview(raw)[_HEADER.size:]
    if len(payload) != length:
        raise CheckpointError(f"checkpoint {path} is truncated: payload has {len(payload)} of "
                              f"{length} bytes")
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"checkpoint {path} is corrupt: SHA-256 does not match")
    try:
        state = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:  # weights_only refused a class: it could run code
        raise CheckpointError(f"checkpoint {path} holds objects other than tensors and plain "
                              "containers; refused (loading it could run code): it was not "
                              "written by this project") from None
    except Exception as e:  # checksum passed, so this is a format problem, not truncation
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(f"checkpoint {path} could not be read: {first}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds {type(state).__name__}, not a dict")
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format_version "
                              f"{state.get('format_version')!r}; this code reads {FORMAT_VERSION}")
    if "objective" in state and "t_sampler" not in state:  # written before the loss/sampler split
        state["t_sampler"] = state.pop("objective")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks keys {missing}")
    return state


def find_resume(ckpt_dir: Path, fallback: bool = False) -> tuple[dict, Path] | None:
    """Newest valid checkpoint in ckpt_dir; a corrupt newest one raises unless fallback."""
    errors = []
    for path in reversed(list_checkpoints(ckpt_dir)):
        try:
            return load_checkpoint(path), path
        except CheckpointError as e:
            if not fallback:
                raise CheckpointError(f"{e}. Set resume_fallback: true to resume from the "
                                      "previous checkpoint, or delete the file.") from e
            warnings.warn(f"{e}; falling back to the previous checkpoint", stacklevel=2)
            errors.append(str(e))
    if errors:
        raise CheckpointError(f"no valid checkpoint in {ckpt_dir}: " + "; ".join(errors))
    return None


def prune_checkpoints(ckpt_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` checkpoints and stale temp files; returns what was kept."""
    assert keep >= 1, f"keep={keep}"
    remove_stale_tmp(ckpt_dir, "ckpt_*")
    paths = list_checkpoints(ckpt_dir)
    for p in paths[:-keep]:
        p.unlink(missing_ok=True)
    return paths[-keep:]
