"""The one atomic writer: every file the library or a stage writes goes through here.

A file is written to `.tmp-<name>-<pid>-<random>` in its own folder, flushed and fsynced, moved
into place with `os.replace` and the folder fsynced, so a crash leaves the old file or the new
one, never a partial file under the real name. Files get the ordinary mode 0666 & ~umask
(0644 under the usual umask), not mkstemp's 0600. `save_torch` serialises into memory first:
`torch.save` to a path records that path's name inside the zip, so the same weights written
through differently named temporary files would hash differently; through a buffer identical
objects give identical bytes.

Argument order follows `Path.write_bytes` for raw data (`atomic_write_bytes(path, data)`) and
`torch.save` for objects (`save_torch(obj, path)`).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

TMP_PREFIX = ".tmp-"


def pid_alive(pid: int) -> bool:
    """pid runs: it exists and is not a zombie (a killed writer whose parent died too may stay
    a zombie where PID 1 does not reap, e.g. a container's init)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _remove(p: Path) -> None:
    """Delete a file or a folder tree, whichever `p` is (gone already: nothing to do)."""
    if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def _tmp_name(path: Path) -> Path:
    """A fresh temporary sibling of `path`: `.tmp-<name>-<pid>-<random>` (stale ones of dead
    writers, whose pid is gone, are removed first, so a rerun after a kill leaves none behind)."""
    for p in path.parent.glob(f"{TMP_PREFIX}{path.name}-*"):
        pid = p.name[len(TMP_PREFIX) + len(path.name) + 1:].split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            _remove(p)
    return path.with_name(f"{TMP_PREFIX}{path.name}-{os.getpid()}-{secrets.token_hex(3)}")


@contextmanager
def _named(path: Path) -> Iterator[None]:
    """An OSError while writing `path` names `path` (not a temporary name) in its message."""
    try:
        yield
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None


def _fsync_dir(d: str | Path) -> None:
    """Persist a rename: fsync the directory entry (POSIX; skipped where unsupported)."""
    with contextlib.suppress(OSError):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextmanager
def atomic_open(path: str | Path) -> Iterator[IO[bytes]]:
    """A binary file that appears at `path` only when the block ends without an exception."""
    path = Path(path)
    with _named(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tmp_name(path)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
        try:
            with os.fdopen(fd, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes | bytearray | memoryview) -> None:
    """Write `data` to `path` atomically."""
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    """Write `text` to `path` atomically."""
    atomic_write_bytes(path, text.encode(encoding))


def write_json(obj: Any, path: str | Path, sort_keys: bool = True) -> None:
    """JSON (indent 2, sorted keys, trailing newline) written atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n")


def save_torch(obj: Any, path: str | Path) -> None:
    """`torch.save(obj)` written atomically; identical objects give byte-identical files."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getbuffer())


def save_npy(arr: Any, path: str | Path) -> None:
    """`np.save(arr)` (no pickles) written atomically."""
    import numpy as np

    with atomic_open(path) as f:
        np.save(f, np.asarray(arr), allow_pickle=False)


def save_npz(path: str | Path, **arrays: Any) -> None:
    """`np.savez(**arrays)` (no pickles) written atomically."""
    import numpy as np

    with atomic_open(path) as f:
        np.savez(f, allow_pickle=False, **arrays)


def _fsync_tree(root: Path) -> None:
    """fsync every file and folder under `root` (before the folder is renamed into place)."""
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            fd = os.open(Path(dirpath) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(dirpath)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """An empty temporary folder beside `path` that replaces `path` as a whole on success."""
    path = Path(path)
    with _named(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tmp_name(path)
        tmp.mkdir()  # mode 0777 & ~umask
        old = tmp.with_name(tmp.name + "-old")
        try:
            yield tmp
            _fsync_tree(tmp)
            if path.exists():
                path.rename(old)
            try:
                tmp.rename(path)
            except BaseException:
                if old.exists():
                    old.rename(path)
                raise
            _fsync_dir(path.parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)


def remove_stale_tmp(folder: str | Path, name_glob: str = "*") -> None:
    """Delete temporary files a crashed writer left in `folder` (names matching `name_glob`)."""
    for p in Path(folder).glob(f"{TMP_PREFIX}{name_glob}"):
        _remove(p)
