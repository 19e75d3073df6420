"""The atomic writer: byte-reproducible torch files, normal permissions, nothing half-written."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm_core.checkpoint import save_checkpoint
from ddpm_core.files import (
    atomic_dir,
    atomic_open,
    atomic_write_bytes,
    atomic_write_text,
    save_npy,
    save_npz,
    save_torch,
    write_json,
)


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(4, 5, generator=g), "b": torch.randn(5, generator=g), "n": 3}


def test_save_torch_identical_objects_give_identical_bytes_whatever_the_name(
        tmp_path: Path) -> None:
    # torch.save(obj, path) records the file's name in the zip; two writes through differently
    # named temporary files of the same weights would then differ.
    save_torch(_state(0), tmp_path / "a.pt")
    save_torch(_state(0), tmp_path / "sub" / "b.pt")  # equal values, distinct tensor objects
    assert _sha(tmp_path / "a.pt") == _sha(tmp_path / "sub" / "b.pt")
    save_torch(_state(1), tmp_path / "c.pt")
    assert _sha(tmp_path / "a.pt") != _sha(tmp_path / "c.pt")
    got = torch.load(tmp_path / "a.pt", weights_only=True)
    assert torch.equal(got["w"], _state(0)["w"]) and got["n"] == 3


def test_checkpoints_of_identical_states_are_byte_identical(tmp_path: Path) -> None:
    st = {"step": 1, "model": _state(0), "ema": _state(0)}
    save_checkpoint(st, tmp_path / "x" / "ckpt_00000001.pt")
    save_checkpoint({**st, "model": _state(0)}, tmp_path / "y" / "ckpt_00000001.pt")
    assert _sha(tmp_path / "x" / "ckpt_00000001.pt") == _sha(tmp_path / "y" / "ckpt_00000001.pt")


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_have_mode_0666_minus_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "a.bin", b"x")
        atomic_write_text(tmp_path / "b.txt", "y")
        write_json({"k": 1}, tmp_path / "c.json")
        save_torch({"k": 1}, tmp_path / "d.pt")
        save_npy(np.zeros(3), tmp_path / "e.npy")
        save_npz(tmp_path / "g.npz", images=np.zeros(3))
        with atomic_dir(tmp_path / "f") as d:
            (d / "inner.txt").write_text("z")
    finally:
        os.umask(old)
    for name in ("a.bin", "b.txt", "c.json", "d.pt", "e.npy", "g.npz"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o777 & ~umask


def test_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path: Path) -> None:
    p = tmp_path / "out.bin"
    atomic_write_bytes(p, b"old")
    with pytest.raises(RuntimeError, match="boom"), atomic_open(p) as f:
        f.write(b"half of the new")
        raise RuntimeError("boom")
    assert p.read_bytes() == b"old"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out.bin"]


def test_write_json_is_sorted_and_stable(tmp_path: Path) -> None:
    write_json({"b": 1, "a": {"d": 2, "c": [1, 2]}}, tmp_path / "m.json")
    text = (tmp_path / "m.json").read_text()
    assert text == json.dumps({"a": {"c": [1, 2], "d": 2}, "b": 1}, indent=2) + "\n"


def test_save_npy_and_npz_round_trip_and_refuse_objects(tmp_path: Path) -> None:
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    save_npy(arr, tmp_path / "a.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), arr)
    save_npz(tmp_path / "a.npz", images=arr, labels=np.arange(2))
    with np.load(tmp_path / "a.npz") as z:
        assert sorted(z.files) == ["images", "labels"]
        np.testing.assert_array_equal(z["images"], arr)
    with pytest.raises(ValueError):
        save_npy(np.array([{"x": 1}], dtype=object), tmp_path / "b.npy")
    with pytest.raises(ValueError):
        save_npz(tmp_path / "b.npz", images=np.array([{"x": 1}], dtype=object))
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.npy", "a.npz"]


def test_atomic_dir_replaces_the_whole_folder_or_nothing(tmp_path: Path) -> None:
    d = tmp_path / "plots"
    with atomic_dir(d) as tmp:
        (tmp / "one.csv").write_text("1")
        (tmp / "two.csv").write_text("2")
    with atomic_dir(d) as tmp:
        (tmp / "three.csv").write_text("3")
    assert sorted(x.name for x in d.iterdir()) == ["three.csv"]
    with pytest.raises(RuntimeError), atomic_dir(d) as tmp:
        (tmp / "four.csv").write_text("4")
        raise RuntimeError("stage failed")
    assert sorted(x.name for x in d.iterdir()) == ["three.csv"]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["plots"]


def test_a_rerun_removes_the_temporaries_of_a_killed_writer_but_not_of_a_live_one(tmp_path):
    import subprocess
    import sys

    from ddpm_core.files import atomic_dir, atomic_write_bytes

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    stale_file = tmp_path / f".tmp-a.bin-{dead}-abcdef"
    stale_file.write_bytes(b"half")
    stale_dir = tmp_path / f".tmp-out-{dead}-abcdef"
    (stale_dir / "inner").mkdir(parents=True)
    live = tmp_path / f".tmp-a.bin-{os.getppid()}-abcdef"  # a writer still running
    live.write_bytes(b"busy")
    atomic_write_bytes(tmp_path / "a.bin", b"new")
    with atomic_dir(tmp_path / "out") as d:
        (d / "x").write_text("1")
    assert not stale_file.exists() and not stale_dir.exists() and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["a.bin", "out", live.name])


def test_a_killed_writer_left_as_a_zombie_counts_as_dead(tmp_path):
    # a SIGKILLed stage whose parent (dvc) was killed too is reparented to PID 1; where PID 1
    # does not reap (a container's init), it stays a zombie and os.kill(pid, 0) still succeeds:
    # its temporaries must be removed all the same (the kill test's bpd case failed on this)
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        pass  # exited, not yet reaped: a zombie
    try:
        stale = tmp_path / f".tmp-a.bin-{child.pid}-abcdef"
        stale.write_bytes(b"half")
        atomic_write_bytes(tmp_path / "a.bin", b"new")
        assert not stale.exists()
    finally:
        child.wait()
