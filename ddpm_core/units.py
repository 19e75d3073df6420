"""Long work in units that survive a kill: sampling, the bound, Γ and the ODE likelihood.

A unit is one batch of an engine call (ddpm_core.api): the image indices [a, b) with a a
multiple of the batch size. Every engine draws image i's noise from (seed, i), so a unit's
result depends only on the call's settings and its indices: units computed by different runs,
processes, shards or machines assemble into the bytes of one uninterrupted run.

Notation: n images in units of `size` (the last one shorter); a shard i/N (a job of a SLURM
array, a Kubernetes job) takes the i-th of N contiguous blocks of units; within a process group
every rank takes a contiguous block of its shard's units, so rank order is index order.

A UnitStore keeps finished units in a scratch folder, one subfolder per engine call named by
the SHA-256 of the call's settings (the network's weights, the device, torch's version and
this package's source included): a setting that changes the numbers never reuses a unit. A
unit is one .npz written atomically (files.atomic_write_bytes) whose name carries the SHA-256 of
its bytes, so a kill loses at most the units in flight, and a truncated or corrupt unit is
found, said in one line, and computed again. The caller removes the folders
(UnitStore.remove) once its outputs are written.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddpm_core import distributed as D
from ddpm_core.files import atomic_write_bytes


@dataclass(frozen=True)
class Shard:
    """Job `index` of `count` independent jobs (0-based)."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        """"i/N" with 0 <= i < N, or a ValueError naming the form."""
        try:
            i, n = (int(part) for part in text.split("/"))
        except ValueError:
            i, n = -1, 0
        if not 0 <= i < n:
            raise ValueError(f"--shard {text!r}: expected i/N with 0 <= i < N, e.g. 0/4")
        return cls(i, n)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def units_of(n: int, size: int) -> list[range]:
    """The units of images 0..n-1: [0, size), [size, 2 size), ..."""
    return [range(a, min(a + size, n)) for a in range(0, n, size)]


def owned(n: int, size: int, shard: Shard | None = None) -> list[range]:
    """The units of images 0..n-1 this process computes: its shard's, then its rank's block."""
    units = units_of(n, size)
    if shard is not None:
        units = _block(units, shard.index, shard.count)
        if not units:
            raise ValueError(f"shard {shard} has no unit of {n} images in units of {size}: "
                             "use fewer shards or a smaller batch size")
    if D.is_initialized():
        units = _block(units, D.dist.get_rank(), D.dist.get_world_size())
    return units


def _block(items: list, i: int, count: int) -> list:
    """The i-th of `count` contiguous blocks of items (distributed.shard_range)."""
    r = D.shard_range(len(items), i, count)
    return items[r.start:r.stop]


def digest(obj: Any) -> str:
    """SHA-256 of settings: JSON values, tensors and arrays (their bytes, dtype and shape) and
    networks (their parameters and buffers, and the type and precision of every wrapper)."""
    h = hashlib.sha256()

    def feed(x: Any) -> None:
        if isinstance(x, torch.nn.Module):
            feed([(type(m).__name__, getattr(m, "bf16", None)) for m in x.modules()])
            feed({k.replace("_orig_mod.", ""): v for k, v in x.state_dict().items()})
        elif isinstance(x, torch.Tensor):
            feed(x.detach().cpu().contiguous().numpy())
        elif isinstance(x, np.ndarray):
            h.update(f"{x.dtype}{x.shape}".encode())
            h.update(np.ascontiguousarray(x).tobytes())
        elif isinstance(x, Mapping):
            for k in sorted(x, key=str):
                feed(str(k))
                feed(x[k])
        elif isinstance(x, list | tuple):
            h.update(b"[")
            for v in x:
                feed(v)
            h.update(b"]")
        elif hasattr(x, "__dict__"):  # e.g. a Diffusion: its coefficients
            feed({"type": type(x).__name__, **vars(x)})
        else:
            h.update(json.dumps(x, default=str).encode() + b";")

    feed(obj)
    return h.hexdigest()


@functools.cache
def code_digest() -> str:
    """SHA-256 of the ddpm_core package's source files."""
    return digest([p.read_bytes().hex() for p in sorted(Path(__file__).parent.glob("*.py"))])


@dataclass
class Units:
    """The finished units of one engine call: a folder of `<a>-<b>.<sha256>.npz` files."""

    folder: Path
    computed: int = 0
    reused: int = 0
    corrupt: int = 0

    def _files(self, ids: range) -> list[Path]:
        return sorted(self.folder.glob(f"{ids.start:09d}-{ids.stop:09d}.*.npz"))

    def load(self, ids: range) -> dict[str, np.ndarray] | None:
        """The unit's arrays, or None when it is missing or fails its checksum (removed)."""
        for path in self._files(ids):
            blob = path.read_bytes()
            if hashlib.sha256(blob).hexdigest() == path.name.split(".")[1]:
                with np.load(io.BytesIO(blob), allow_pickle=False) as z:
                    return {k: z[k] for k in z.files}
            self.corrupt += 1
            print(f"units: {path} is truncated or corrupt (checksum); computing it again",
                  file=sys.stderr, flush=True)
            path.unlink(missing_ok=True)
        return None

    def save(self, ids: range, arrays: Mapping[str, np.ndarray]) -> None:
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        blob = buf.getvalue()
        name = f"{ids.start:09d}-{ids.stop:09d}.{hashlib.sha256(blob).hexdigest()}.npz"
        atomic_write_bytes(self.folder / name, blob)


@dataclass
class UnitStore:
    """Scratch area of units under `root`; with `shard`, an engine call computes only the
    shard's units (and returns their results only)."""

    root: Path
    shard: Shard | None = None
    opened: list[Units] = field(default_factory=list)
    _nets: dict[int, tuple[torch.nn.Module, str]] = field(default_factory=dict, repr=False)

    def open(self, settings: Mapping[str, Any]) -> Units:
        """The units of the engine call with these settings (torch's version and this
        package's source added: a fixed sampler never reads back a unit of the old code).
        A network's digest is taken once per store (a stage's calls share its weights)."""
        def net(m: torch.nn.Module) -> str:
            if id(m) not in self._nets:  # the module is held, so its id stays its own
                self._nets[id(m)] = (m, digest(m))
            return self._nets[id(m)][1]

        settings = {k: net(v) if isinstance(v, torch.nn.Module) else v
                    for k, v in settings.items()}
        key = digest({**settings, "torch": torch.__version__, "code": code_digest()})
        units = Units(Path(self.root) / key[:32])
        units.folder.mkdir(parents=True, exist_ok=True)
        self.opened.append(units)
        return units

    def summary(self, always: bool = False) -> str | None:
        """"C computed, R reused[, X corrupt computed again]": the units of every call opened;
        None when every unit was computed (none read back or corrupt) unless `always`."""
        computed, reused, corrupt = (sum(getattr(u, k) for u in self.opened)
                                     for k in ("computed", "reused", "corrupt"))
        if not (reused or corrupt or always):
            return None
        return (f"{computed} computed, {reused} reused"
                + (f", {corrupt} corrupt computed again" if corrupt else ""))

    def remove(self) -> None:
        """Delete the folders of every call opened (after the outputs are written)."""
        for units in self.opened:
            shutil.rmtree(units.folder, ignore_errors=True)
        self.opened.clear()
        with contextlib.suppress(OSError):  # the root too, once no other call's units are in it
            Path(self.root).rmdir()


def run_units(n: int, size: int, compute: Callable[[range], dict[str, torch.Tensor]], *,
              store: UnitStore | None = None, settings: Mapping[str, Any] | None = None,
              note: Callable[[str, range, bool], None] | None = None
              ) -> dict[str, torch.Tensor]:
    """compute(ids) for every unit of images 0..n-1 this process owns, concatenated along dim
    0 over every rank of the process group (gathered in rank order): the whole call's results,
    or the shard's with store.shard. With a store, units found are read instead of computed
    and computed ones are written at once. After each unit, note("unit k/K", ids, reused)."""
    units = owned(n, size, store.shard if store is not None else None)
    done = store.open(dict(settings or {})) if store is not None else None
    parts: list[dict[str, torch.Tensor]] = []
    for k, ids in enumerate(units, 1):
        found = done.load(ids) if done is not None else None
        if found is not None:
            done.reused += 1
            parts.append({key: torch.from_numpy(v) for key, v in found.items()})
        else:
            out = compute(ids)
            parts.append({key: v.cpu() for key, v in out.items()})
            if done is not None:
                done.save(ids, {key: v.numpy() for key, v in parts[-1].items()})
                done.computed += 1
        if note is not None:
            note(f"unit {k}/{len(units)}", ids, found is not None)
    mine = {key: torch.cat([p[key] for p in parts]) for key in parts[0]} if parts else None
    # every rank's, in rank order (a rank with more ranks than units has none)
    every = [m for m in D.all_gather_objects(mine) if m is not None]
    return {key: torch.cat([m[key] for m in every]) for key in every[0]}
