"""Data sources, splits and files: digits, CIFAR-10 (a generated tiny archive), folders, npz."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_core import data
from ddpm_core.config import DataConfig
from ddpm_core.data import DataError

# ----------------------------------------------------------------------------- digits


def test_digits_grey_levels_map_0_16_to_0_255():
    images, labels = data.load_digits_images()
    assert images.shape == (1797, 8, 8, 1) and images.dtype == np.uint8
    levels = {round(v * 255 / 16) for v in range(17)}
    assert set(np.unique(images).tolist()) <= levels
    assert images.min() == 0 and images.max() == 255
    assert sorted(np.unique(labels).tolist()) == list(range(10))


def test_digits_split_sizes_stratified_and_a_partition():
    s = data.prepare_splits(DataConfig(test_fraction=0.2, split_seed=0))
    assert s.name == "digits"
    assert s.train.shape == (1438, 8, 8, 1) and s.test.shape == (359, 8, 8, 1)
    assert s.train_labels.shape == (1438,) and s.test_labels.shape == (359,)
    # Stratified: every class is ~20% in test.
    for c in range(10):
        n_c = (s.train_labels == c).sum() + (s.test_labels == c).sum()
        assert abs((s.test_labels == c).sum() - 0.2 * n_c) <= 1
    # Train + test is exactly the data set (image and label pairs), nothing lost or repeated.
    images, labels = data.load_digits_images()
    both = np.concatenate([s.train, s.test]), np.concatenate([s.train_labels, s.test_labels])
    rows = sorted((im.tobytes(), int(y)) for im, y in zip(*both, strict=True))
    assert rows == sorted((im.tobytes(), int(y)) for im, y in zip(images, labels, strict=True))


def test_digits_split_is_deterministic_in_the_seed():
    a = data.prepare_splits(DataConfig(split_seed=3))
    b = data.prepare_splits(DataConfig(split_seed=3))
    c = data.prepare_splits(DataConfig(split_seed=4))
    assert np.array_equal(a.train, b.train) and np.array_equal(a.test_labels, b.test_labels)
    assert not np.array_equal(a.train, c.train)
    # The seed argument overrides cfg.split_seed.
    assert np.array_equal(data.prepare_splits(DataConfig(split_seed=4), seed=3).train, a.train)


# ----------------------------------------------------------------------------- conversions


def test_model_tensor_is_nchw_and_unit_round_trip_is_exact():
    x = np.random.default_rng(0).integers(0, 256, (3, 5, 4, 3), dtype=np.uint8)
    t = data.to_model_tensor(x)
    assert t.dtype == torch.uint8 and t.shape == (3, 3, 5, 4)
    assert t[1, 2, 4, 3] == x[1, 4, 3, 2]
    u = data.to_unit(t)
    assert u.dtype == torch.float32 and u.min() >= -1 and u.max() <= 1
    assert data.to_unit(torch.tensor([0, 255], dtype=torch.uint8)).tolist() == [-1.0, 1.0]
    assert torch.equal(data.from_unit(u), t)
    assert np.array_equal(data.to_numpy_images(t), x)
    assert data.from_unit(torch.tensor([-3.0, 3.0, 0.0])).tolist() == [0, 255, 128]


# ----------------------------------------------------------------------------- files


def test_save_load_round_trip_and_stale_labels_removed(tmp_path):
    s = data.prepare_splits(DataConfig())
    data.save_splits(s, tmp_path)
    assert np.array_equal(data.load_images(tmp_path / "train.npy"), s.train)
    assert np.array_equal(data.load_images(tmp_path / "test.npy"), s.test)
    assert np.array_equal(data.load_labels(tmp_path / "test_labels.npy"), s.test_labels)
    unlabelled = data.Splits(s.train, s.test, None, None, "npz")
    data.save_splits(unlabelled, tmp_path)
    assert not (tmp_path / "train_labels.npy").exists()
    assert sorted(os.listdir(tmp_path)) == ["test.npy", "train.npy"]  # no temp files left


def test_load_images_missing_corrupt_and_wrong_dtype(tmp_path):
    with pytest.raises(DataError, match=r"missing\.npy: not found; run the prepare stage"):
        data.load_images(tmp_path / "missing.npy")
    np.save(tmp_path / "ok.npy", np.zeros((2, 4, 4, 1), np.uint8))
    raw = (tmp_path / "ok.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=r"cut\.npy: corrupt \.npy"):
        data.load_images(tmp_path / "cut.npy")
    np.save(tmp_path / "f.npy", np.zeros((2, 4, 4, 1), np.float32))
    with pytest.raises(DataError, match=r"f\.npy.*uint8"):
        data.load_images(tmp_path / "f.npy")


def test_grid_of_grey_images_is_a_grey_png_with_white_gaps_and_crisp_pixels(tmp_path):
    # 8x8 digits drawn x8 (nearest: each pixel a flat 8x8 block), 1-pixel white gaps, mode L
    x = np.random.default_rng(0).integers(0, 200, (7, 8, 8, 1), dtype=np.uint8)
    data.save_grid(x, tmp_path / "g.png", n=5)
    with Image.open(tmp_path / "g.png") as im:
        assert im.mode == "L"
        grid = np.asarray(im)
    assert grid.shape == ((2 * 9 + 1) * 8, (3 * 9 + 1) * 8)  # 5 images: 2 rows of 3 columns
    for i in range(5):
        r, c = divmod(i, 3)
        cell = grid[8 * (1 + 9 * r):8 * (9 + 9 * r), 8 * (1 + 9 * c):8 * (9 + 9 * c)]
        assert np.array_equal(cell, x[i, :, :, 0].repeat(8, 0).repeat(8, 1)), i
    assert (grid[:8] == 255).all() and (grid[:, 8 * 9:8 * 10] == 255).all()  # the gaps
    assert (grid[8 * 10:, 8 * 19:] == 255).all()  # the sixth cell is empty
    data.save_grid(x[:1], tmp_path / "one.png", scale=1)  # one image keeps its white frame
    one = np.asarray(Image.open(tmp_path / "one.png"))
    assert one.shape == (10, 10) and np.array_equal(one[1:9, 1:9], x[0, :, :, 0])
    assert one[0].min() == one[-1].min() == one[:, 0].min() == 255
    assert sorted(f.name for f in tmp_path.iterdir()) == ["g.png", "one.png"]


# ----------------------------------------------------------------------------- CIFAR-10


def _cifar_batches(n: int = 3) -> dict[str, dict]:
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    return {name: {b"batch_label": name.encode(),
                   b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                   b"labels": [int(v) for v in rng.integers(0, 10, n)]} for name in names}


def _write_cifar(tmp_path: Path, batches: dict[str, dict]) -> tuple[Path, Path]:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name, d in batches.items():
        (folder / name).write_bytes(pickle.dumps(d, protocol=2))
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    return archive, folder


def _md5(p: Path) -> str:
    return hashlib.md5(p.read_bytes()).hexdigest()


def _check_cifar(s: data.Splits, batches: dict[str, dict]) -> None:
    assert s.train.shape == (15, 32, 32, 3) and s.test.shape == (3, 32, 32, 3)
    assert s.train.dtype == np.uint8 and s.train_labels.dtype == np.int64
    train_rows = np.concatenate([batches[f"data_batch_{i}"][b"data"] for i in range(1, 6)])
    train_labels = sum((batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
    assert s.train_labels.tolist() == train_labels
    assert s.test_labels.tolist() == batches["test_batch"][b"labels"]
    # Rows are CHW (1024 red, 1024 green, 1024 blue, each row-major): pixel-exact HWC check.
    for i, r, c, ch in [(0, 0, 0, 0), (4, 31, 0, 1), (14, 5, 30, 2), (7, 17, 3, 1)]:
        assert s.train[i, r, c, ch] == train_rows[i, ch * 1024 + r * 32 + c]
    assert s.test[2, 9, 11, 2] == batches["test_batch"][b"data"][2, 2 * 1024 + 9 * 32 + 11]


def test_cifar10_archive_and_folder_read_pixel_exact(tmp_path):
    batches = _cifar_batches()
    archive, folder = _write_cifar(tmp_path, batches)
    _check_cifar(data.load_cifar10(archive, expected_md5=_md5(archive)), batches)
    file_md5 = {name: _md5(folder / name) for name in batches}
    _check_cifar(data.load_cifar10(folder, expected_file_md5=file_md5), batches)
    # The parent of cifar-10-batches-py works too.
    _check_cifar(data.load_cifar10(tmp_path, expected_file_md5=file_md5), batches)


def test_cifar10_checksum_mismatch_is_an_error(tmp_path):
    archive, folder = _write_cifar(tmp_path, _cifar_batches())
    with pytest.raises(DataError, match=rf"md5 {_md5(archive)} != {data.cifar10_source().md5}"):
        data.load_cifar10(archive)  # the official checksum is the default
    with pytest.raises(DataError, match=r"data_batch_1: md5 mismatch"):
        data.load_cifar10(folder)


def test_cifar10_refuses_pickles_that_run_code(tmp_path):
    batches = _cifar_batches()
    archive, folder = _write_cifar(tmp_path, batches)
    (folder / "test_batch").write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR.")
    with pytest.raises(DataError, match=r"test_batch: not a CIFAR-10 python batch.*os\.system"):
        data.load_cifar10(folder, expected_file_md5=None)


def test_cifar10_missing_offline_names_path_and_url(tmp_path, monkeypatch):
    target = tmp_path / "raw" / "cifar-10-python.tar.gz"
    cfg = DataConfig(dataset="cifar10", path=str(target), download=False)
    with pytest.raises(DataError) as e:
        data.prepare_splits(cfg)
    assert str(target.resolve()) in str(e.value) and data.cifar10_source().url in str(e.value)

    def offline(url: str, dest: Path, timeout: float = 30.0) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(data, "download_file", offline)
    with pytest.raises(DataError) as e:
        data.prepare_splits(DataConfig(dataset="cifar10", path=str(target), download=True))
    msg = str(e.value)
    assert "download failed" in msg and str(target.resolve()) in msg
    assert data.cifar10_source().url in msg and "\n" not in msg
    # No data.path: the default location, named in full.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=str(tmp_path / "data/raw/cifar-10-python.tar.gz")):
        data.prepare_splits(DataConfig(dataset="cifar10", download=False))


# ----------------------------------------------------------------------------- folder / npz


def test_image_folder_recursive_mixed_modes_and_resize(tmp_path):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (6, 5), dtype=np.uint8)
    rgb = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    (tmp_path / "sub").mkdir()
    Image.fromarray(grey).save(tmp_path / "a.png")
    Image.fromarray(rgb).save(tmp_path / "sub" / "b.PNG")
    (tmp_path / "notes.txt").write_text("ignored")
    x = data.load_image_folder(tmp_path)
    assert x.shape == (2, 6, 5, 3) and x.dtype == np.uint8
    assert np.array_equal(x[0], np.repeat(grey[..., None], 3, axis=2))  # grey -> RGB, exact
    assert np.array_equal(x[1], rgb)
    (tmp_path / "sub" / "b.PNG").unlink()
    Image.fromarray(grey).save(tmp_path / "sub" / "c.jpg")
    assert data.load_image_folder(tmp_path).shape == (2, 6, 5, 1)  # all grey -> one channel
    Image.fromarray(rng.integers(0, 256, (9, 7), dtype=np.uint8)).save(tmp_path / "d.png")
    with pytest.raises(DataError, match=r"d\.png: size \(7, 9\) differs.*data\.image_size"):
        data.load_image_folder(tmp_path)
    assert data.load_image_folder(tmp_path, image_size=4).shape == (3, 4, 4, 1)


def test_image_folder_resize_crops_the_centre_square(tmp_path):
    # 12 x 6 (w x h): black | white (the centre 6 columns) | black; image_size 6 keeps the centre
    im = np.zeros((6, 12), np.uint8)
    im[:, 3:9] = 255
    Image.fromarray(im).save(tmp_path / "wide.png")
    assert (data.load_image_folder(tmp_path, image_size=6) == 255).all()
    small = data.load_image_folder(tmp_path, image_size=3)  # then bicubic down: the kernel
    assert small.min() > 200 and (small[..., 1, :] == 255).all()  # reaches the black a little


def test_image_folder_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="image folder not found"):
        data.load_image_folder(tmp_path / "nope")
    with pytest.raises(DataError, match="no .png/.jpg/.jpeg images found"):
        data.load_image_folder(tmp_path)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"bad\.png: unreadable image"):
        data.load_image_folder(tmp_path)


def write_bomb_png(path: Path, side: int = 14000) -> None:
    """A 1-bit all-black side x side PNG written by hand: ~24 KB on disk, side² pixels open."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

    row = b"\x00" + bytes((side + 7) // 8)  # filter byte, then the packed 1-bit pixels
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(row * side, 9)) + chunk(b"IEND", b""))


def test_image_folder_with_a_decompression_bomb_is_one_line_naming_the_file(tmp_path):
    for name in ("a.png", "b.png"):
        write_bomb_png(tmp_path / name)
    assert (tmp_path / "a.png").stat().st_size < 100_000
    with pytest.raises(DataError) as e:
        data.load_image_folder(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "a.png") in msg, msg
    assert "pixels" in msg and e.value.__cause__ is None


def test_npz_loader_shapes_labels_and_errors(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (10, 4, 4), dtype=np.uint8)
    np.savez(tmp_path / "only.npz", x)
    images, labels = data.load_npz(tmp_path / "only.npz")
    assert images.shape == (10, 4, 4, 1) and labels is None and np.array_equal(images[..., 0], x)
    np.savez(tmp_path / "lab.npz", images=np.stack([x] * 3, -1), labels=np.arange(10) % 2)
    images, labels = data.load_npz(tmp_path / "lab.npz")
    assert images.shape == (10, 4, 4, 3) and labels.dtype == np.int64
    cases = {"float.npz": dict(images=x.astype(np.float32)),
             "shape.npz": dict(images=np.zeros((10, 4, 4, 2), np.uint8)),
             "two.npz": dict(a=x, b=x),
             "labels.npz": dict(images=x, labels=np.zeros(3, np.int64))}
    for name, arrays in cases.items():
        np.savez(tmp_path / name, **arrays)
    for name, pattern in [("float.npz", "dtype float32, expected uint8"),
                          ("shape.npz", r"shape \(10, 4, 4, 2\)"),
                          ("two.npz", r"no `images` array among \['a', 'b'\]"),
                          ("labels.npz", r"labels have shape \(3,\)"),
                          ("missing.npz", r"\.npz not found")]:
        with pytest.raises(DataError, match=rf"{name}.*{pattern}"):
            data.load_npz(tmp_path / name)
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(DataError, match=r"junk\.npz: not a readable \.npz"):
        data.load_npz(tmp_path / "junk.npz")


def test_npz_prepare_splits_uses_test_fraction_and_seed(tmp_path):
    x = np.arange(20 * 4, dtype=np.uint8).reshape(20, 2, 2, 1)
    np.savez(tmp_path / "d.npz", images=x)
    cfg = DataConfig(dataset="npz", path=str(tmp_path / "d.npz"), test_fraction=0.25)
    s = data.prepare_splits(cfg)
    assert s.train.shape == (15, 2, 2, 1) and s.test.shape == (5, 2, 2, 1)
    assert s.train_labels is None and s.name == "npz"
    seen = sorted(int(v) for v in np.concatenate([s.train, s.test])[:, 0, 0, 0])
    assert seen == sorted(int(v) for v in x[:, 0, 0, 0])
    assert np.array_equal(data.prepare_splits(cfg).test, s.test)


def test_pickled_npy_is_refused_not_unpickled(tmp_path):
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (tmp_path / "obj.npy").write_bytes(buf.getvalue())
    with pytest.raises(DataError, match=r"obj\.npy: corrupt \.npy"):
        data.load_images(tmp_path / "obj.npy")
