"""Checkpoint files: round trip, atomic write, truncation/corruption detection, keep-last-k."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from ddpm_core.checkpoint import (
    CheckpointError,
    checkpoint_path,
    find_resume,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    step_of,
)


def fake_state(step: int) -> dict:
    """A state with every required key and distinguishable tensors."""
    w = torch.full((3, 2), float(step))
    return {"step": step, "model": {"w": w}, "ema": {"w": w + 0.5}, "optimizer": {},
            "scheduler": {}, "t_sampler": {}, "data": {"epoch": 0, "offset": step},
            "rng": {"generator": torch.Generator().get_state()}}


def test_save_load_round_trip_is_exact_and_leaves_no_temp_file(tmp_path: Path) -> None:
    p = checkpoint_path(tmp_path / "sub", 7)
    state = fake_state(7)
    state["model"]["big"] = torch.randn(100, 100)
    save_checkpoint(state, p)
    got = load_checkpoint(p)
    assert got["step"] == 7 and got["format_version"] == 1
    assert torch.equal(got["model"]["big"], state["model"]["big"])
    assert sorted(x.name for x in p.parent.iterdir()) == ["ckpt_00000007.pt"]
    assert torch.equal(got["ema"]["w"], state["ema"]["w"])


@pytest.mark.parametrize("keep_bytes", [0, 20, 60, -1])
def test_truncated_checkpoint_raises_checkpoint_error_naming_the_file(
        tmp_path: Path, keep_bytes: int) -> None:
    p = checkpoint_path(tmp_path, 3)
    save_checkpoint(fake_state(3), p)
    raw = p.read_bytes()
    p.write_bytes(raw[:keep_bytes] if keep_bytes >= 0 else raw[:-1])
    with pytest.raises(CheckpointError, match=re.escape(str(p)) + ".*truncated"):
        load_checkpoint(p)


def test_flipped_byte_fails_checksum(tmp_path: Path) -> None:
    p = checkpoint_path(tmp_path, 3)
    save_checkpoint(fake_state(3), p)
    raw = bytearray(p.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    p.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="corrupt: SHA-256"):
        load_checkpoint(p)


def test_foreign_file_missing_file_and_missing_keys_are_checkpoint_errors(tmp_path: Path) -> None:
    foreign = tmp_path / "ckpt_00000001.pt"
    torch.save({"model": {}}, foreign)  # a plain torch.save file has no header
    with pytest.raises(CheckpointError, match="not a DDPM checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(tmp_path / "absent.pt")
    partial = fake_state(2)
    del partial["ema"]
    save_checkpoint(partial, checkpoint_path(tmp_path, 2))
    with pytest.raises(CheckpointError, match=r"lacks keys \['ema'\]"):
        load_checkpoint(checkpoint_path(tmp_path, 2))


def test_checkpoint_from_before_the_loss_sampler_split_loads(tmp_path: Path) -> None:
    old = fake_state(4)
    history = {"history": torch.rand(3, 10), "count": torch.full((3,), 10)}
    del old["t_sampler"]
    old["objective"] = history  # the key of the Objective that drew t before resample.py
    save_checkpoint(old, checkpoint_path(tmp_path, 4))
    got = load_checkpoint(checkpoint_path(tmp_path, 4))
    assert torch.equal(got["t_sampler"]["history"], history["history"])
    assert "objective" not in got


def test_prune_keeps_newest_k_by_step_and_removes_stale_temp_files(tmp_path: Path) -> None:
    for s in (5, 100, 20, 10000):
        save_checkpoint(fake_state(s), checkpoint_path(tmp_path, s))
    (tmp_path / ".tmp-ckpt_00000020.pt-123-abcdef").write_bytes(b"half")  # a crashed writer
    kept = prune_checkpoints(tmp_path, 2)
    assert [p.name for p in kept] == ["ckpt_00000100.pt", "ckpt_00010000.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in kept]


def test_find_resume_falls_back_only_when_asked(tmp_path: Path) -> None:
    assert find_resume(tmp_path / "empty") is None
    for s in (5, 10):
        save_checkpoint(fake_state(s), checkpoint_path(tmp_path, s))
    newest = checkpoint_path(tmp_path, 10)
    newest.write_bytes(newest.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=re.escape(str(newest)) + ".*resume_fallback"):
        find_resume(tmp_path, fallback=False)
    with pytest.warns(UserWarning, match="falling back"):
        state, path = find_resume(tmp_path, fallback=True)
    assert path == checkpoint_path(tmp_path, 5) and state["step"] == 5
    checkpoint_path(tmp_path, 5).write_bytes(b"")
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="no valid checkpoint"):
        find_resume(tmp_path, fallback=True)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt_00000005.pt",
                                                           "ckpt_00000010.pt"]


def test_step_of_reads_back_the_step_of_checkpoint_path_and_orders_the_listing(tmp_path) -> None:
    for step in (0, 7, 12_345_678, 123_456_789):  # past 8 digits the name grows
        assert step_of(checkpoint_path(tmp_path, step)) == step
    for s in (100_000_000, 9, 20):
        save_checkpoint(fake_state(s), checkpoint_path(tmp_path, s))
    (tmp_path / "ckpt_x.pt").write_bytes(b"")
    assert [step_of(p) for p in list_checkpoints(tmp_path)] == [9, 20, 100_000_000]
    with pytest.raises(ValueError, match="ckpt_x.pt: not a checkpoint name"):
        step_of(tmp_path / "ckpt_x.pt")
