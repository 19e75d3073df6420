"""Every file read from users loads without executing code: crafted malicious files (a pickle
whose __reduce__ runs a command, an archive member with ../ in its path, an object array) give
one-line errors, and nothing runs or is written outside the target."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm_core import data
from ddpm_core.checkpoint import _HEADER, MAGIC, CheckpointError, load_checkpoint
from ddpm_core.data import DataError


class Payload:
    """Unpickling this runs `touch <marker>`: the proof that code was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _one_line(e: BaseException) -> str:
    msg = str(e)
    assert "\n" not in msg.strip(), msg
    assert "weights_only=False" not in msg, "must not advise the unsafe fix"
    return msg


def test_checkpoint_with_a_reduce_payload_and_a_valid_checksum_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save({"format_version": 1, "model": Payload(marker)}, buf)
    payload = buf.getvalue()
    path = tmp_path / "ckpt_00000010.pt"
    path.write_bytes(_HEADER.pack(MAGIC, len(payload), hashlib.sha256(payload).digest())
                     + payload)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    msg = _one_line(err.value)
    assert str(path) in msg and "refused" in msg
    assert not marker.exists()


def test_cifar_archive_member_leaving_the_folder_writes_nothing(tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    evil = tmp_path / "evil_source"
    evil.write_bytes(b"x" * 10)
    archive = target / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(evil, arcname="../data_batch_1")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(DataError) as err:
        data.load_cifar10(archive, expected_md5=None)
    assert str(archive) in _one_line(err.value)  # not the official archive: no data_batch_2
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert sorted(p.name for p in target.iterdir()) == ["cifar-10-python.tar.gz"]


def test_cifar_batch_pickle_with_a_reduce_payload_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        (folder / name).write_bytes(pickle.dumps({b"data": Payload(marker), b"labels": [0]}))
    with pytest.raises(DataError) as err:
        data.load_cifar10(folder, expected_file_md5=None)
    msg = _one_line(err.value)
    assert "data_batch_1" in msg and "refusing" in msg
    assert not marker.exists()


def test_npz_with_an_object_array_is_refused_without_unpickling(tmp_path):
    marker = tmp_path / "pwned"
    arr = np.empty(2, dtype=object)
    arr[0], arr[1] = Payload(marker), Payload(marker)
    path = tmp_path / "evil.npz"
    np.savez(path, images=arr)
    with pytest.raises(DataError) as err:
        data.load_npz(path)
    msg = _one_line(err.value)
    assert "evil.npz" in msg
    assert not marker.exists()
    npy = tmp_path / "evil.npy"
    np.save(npy, arr, allow_pickle=True)
    with pytest.raises(DataError):
        data.load_images(npy)
    assert not marker.exists()
