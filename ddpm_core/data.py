"""Data sets for the prepare stage: uint8 images [N, H, W, C] on disk, NCHW tensors in the library.

Sources: scikit-learn's bundled 8x8 digits (the default: no network), CIFAR-10 from the official
python archive, a folder of PNG/JPEG images, or an .npz of uint8 images. Every problem with an
input is a one-line `DataError` naming the file and the fix; every file is written atomically.
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
import pickle
import tarfile
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ddpm_core.config import DataConfig
from ddpm_core.files import atomic_open, save_npy


@dataclass(frozen=True)
class Cifar10Source:
    """The official archive and its extracted batches, as torchvision knows them (its own
    CIFAR10 reader unpickles with plain pickle and extracts archives to disk: ours reads in
    memory and unpickles arrays only)."""

    url: str
    md5: str  # of the archive
    file_md5: dict[str, str]  # of each extracted batch
    train: tuple[str, ...]
    test: str
    folder: str  # cifar-10-batches-py


@functools.cache
def cifar10_source() -> Cifar10Source:
    """torchvision's facts of CIFAR-10, imported on first use (importing torchvision costs
    every stage process about 2 s of start-up)."""
    from torchvision.datasets import CIFAR10

    return Cifar10Source(CIFAR10.url, CIFAR10.tgz_md5, dict(CIFAR10.train_list + CIFAR10.test_list),
                         tuple(name for name, _ in CIFAR10.train_list), CIFAR10.test_list[0][0],
                         CIFAR10.base_folder)


def _md5(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


DEFAULT_CIFAR10_PATH = Path("data/raw/cifar-10-python.tar.gz")  # when data.path is not set
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
_GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")


class DataError(RuntimeError):
    """A missing or malformed input; the message names the file and the fix."""


@dataclass(frozen=True)
class Splits:
    """train/test images uint8 [N, H, W, C] with optional int64 labels [N]."""

    train: np.ndarray
    test: np.ndarray
    train_labels: np.ndarray | None
    test_labels: np.ndarray | None
    name: str


# ----------------------------------------------------------------------------- conversions


def to_model_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 numpy [N, H, W, C] -> uint8 tensor [N, C, H, W]."""
    _check_nhwc(images, "images")
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()


def to_numpy_images(x: torch.Tensor) -> np.ndarray:
    """uint8 tensor [N, C, H, W] -> uint8 numpy [N, H, W, C] (for saving samples)."""
    assert x.dtype == torch.uint8 and x.dim() == 4, f"expected uint8 [N,C,H,W], got {x.shape}"
    return x.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 [N, C, H, W] in 0..255 -> float32 [N, C, H, W] in [-1, 1]."""
    assert x.dtype == torch.uint8, f"expected uint8, got {x.dtype}"
    return x.float() / 127.5 - 1.0


def from_unit(x: torch.Tensor) -> torch.Tensor:
    """float [N, C, H, W] in [-1, 1] -> uint8 [N, C, H, W] (rounded, clamped to 0..255)."""
    return ((x.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def nhwc_problem(images: object) -> str | None:
    """What keeps `images` from being uint8 [N, H, W, C] with C = 1 or 3, or None."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        return (f"expected uint8 numpy images, got "
                f"{getattr(images, 'dtype', type(images).__name__)}")
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        return f"expected shape [N, H, W, C] with C = 1 or 3, got {images.shape}"
    return None


def _check_nhwc(images: np.ndarray, what: str) -> None:
    if (problem := nhwc_problem(images)) is not None:
        raise DataError(f"{what}: {problem}")


# ----------------------------------------------------------------------------- sources


def load_digits_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits: uint8 [1797, 8, 8, 1] (grey levels 0..16 -> 0..255), labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * 255.0 / 16.0).astype(np.uint8)[..., None]
    return images, d.target.astype(np.int64)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only (CIFAR batches), nothing executable."""

    _ALLOWED = {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray")
                for n in ("_reconstruct", "scalar")}
    _ALLOWED |= {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
                 ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")}

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


def _read_cifar_batch(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 pickle -> uint8 [N, 32, 32, 3] (rows are CHW), int64 labels [N]."""
    try:
        d = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
        data = np.asarray(d[b"data"], dtype=np.uint8)
        labels = np.asarray(d[b"labels"], dtype=np.int64)
    except Exception as e:  # any malformed pickle is one error
        raise DataError(f"{where}: not a CIFAR-10 python batch ({e}); re-download "
                        f"{cifar10_source().url}") from None
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise DataError(f"{where}: expected data [N, 3072] and N labels, got {data.shape} and "
                        f"{labels.shape}; re-download {cifar10_source().url}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels


def download_file(url: str, dest: Path, timeout: float = 30.0) -> None:
    """Fetch `url` to `dest` through the atomic writer (never half-written)."""
    with atomic_open(dest) as f, urllib.request.urlopen(url, timeout=timeout) as r:
        while chunk := r.read(1 << 20):
            f.write(chunk)


def load_cifar10(path: str | Path, *, expected_md5: str | None = "official",
                 expected_file_md5: Mapping[str, str] | None | str = "official") -> Splits:
    """CIFAR-10 from cifar-10-python.tar.gz or its extracted folder: [50000|10000, 32, 32, 3].
    expected_md5 (the archive's) and expected_file_md5 (each batch's): "official" for the
    published ones, None to skip the check."""
    src = cifar10_source()
    expected_md5 = src.md5 if expected_md5 == "official" else expected_md5
    expected_file_md5 = src.file_md5 if expected_file_md5 == "official" else expected_file_md5
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: CIFAR-10 not found; put cifar-10-python.tar.gz (from "
                        f"{src.url}) or its extracted cifar-10-batches-py folder there")
    raws: dict[str, bytes] = {}
    names = (*src.train, src.test)
    if path.is_dir():
        folder = path / src.folder if (path / src.folder).is_dir() else path
        for name in names:
            f = folder / name
            if not f.is_file():
                raise DataError(f"{f}: missing CIFAR-10 batch; extract {src.url} there again")
            if expected_file_md5 is not None and _md5(f) != expected_file_md5[name]:
                raise DataError(f"{f}: md5 mismatch (corrupt or not the official file); extract "
                                f"{src.url} again")
            raws[name] = f.read_bytes()
    else:
        if expected_md5 is not None and (got := _md5(path)) != expected_md5:
            raise DataError(f"{path}: md5 {got} != {expected_md5} (corrupt or partial download); "
                            f"delete it and download {src.url} again")
        try:
            # members are read into memory, never extracted: a path like ../x writes nothing
            with tarfile.open(path, "r:gz") as tar:
                members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
                for name in names:
                    if name not in members:
                        raise DataError(f"{path}: archive has no {name}; download {src.url}")
                    raws[name] = tar.extractfile(members[name]).read()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(f"{path}: unreadable archive ({e}); download {src.url} "
                            "again") from None
    train = [_read_cifar_batch(raws[n], f"{path}:{n}") for n in src.train]
    train_x, train_y = (np.concatenate(parts) for parts in zip(*train, strict=True))
    test_x, test_y = _read_cifar_batch(raws[src.test], f"{path}:{src.test}")
    return Splits(train=train_x, test=test_x, train_labels=train_y, test_labels=test_y,
                  name="cifar10")


def _cifar10_from_config(cfg: DataConfig) -> Splits:
    path = Path(cfg.path) if cfg.path is not None else DEFAULT_CIFAR10_PATH
    url = cifar10_source().url
    if not path.exists():
        if not cfg.download:
            raise DataError(f"{path}: CIFAR-10 not found and data.download is false; download "
                            f"{url} to {path.resolve()}")
        if path.suffix != ".gz":
            raise DataError(f"{path}: CIFAR-10 folder not found; put the extracted "
                            f"cifar-10-batches-py there, or set data.path to a .tar.gz to download")
        try:
            download_file(url, path)
        except OSError as e:  # URLError, timeouts, DNS failures are all OSErrors
            raise DataError(f"{path}: CIFAR-10 download failed ({e}); offline, download "
                            f"{url} elsewhere and put it at {path.resolve()}") from None
    return load_cifar10(path)


def _open_image(f: Path, load: bool) -> Image.Image:
    try:
        im = Image.open(f)
        if load:
            im.load()
        return im
    except Image.DecompressionBombError as e:  # a few KB that would decode to gigabytes
        raise DataError(f"{f}: refused to decode: {str(e).rstrip('.')}; remove or shrink "
                        "it") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"{f}: unreadable image ({e}); remove or replace it") from None


def load_image_folder(path: str | Path, image_size: int | None = None) -> np.ndarray:
    """PNG/JPEG under `path` (recursive, sorted) -> uint8 [N, H, W, C], all L or all RGB, each
    resized (shorter side) and centre-cropped to image_size x image_size when it is given."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: image folder not found; set data.path to a folder of PNG/JPEG")
    files = sorted(p for p in path.rglob("*")
                   if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DataError(f"{path}: no {'/'.join(IMAGE_EXTENSIONS)} images found (searched "
                        "recursively); add images or fix data.path")
    # One mode for all: grey only when every image is grey, otherwise RGB (headers only here).
    modes = []
    for f in files:
        with _open_image(f, load=False) as im:
            modes.append(im.mode)
    mode = "L" if all(m in _GREY_MODES for m in modes) else "RGB"
    arrays: list[np.ndarray] = []
    for f in files:
        with _open_image(f, load=True) as im:
            im = im.convert(mode)
        if image_size is not None:  # centre crop to a square, then bicubic to image_size
            im = ImageOps.fit(im, (image_size, image_size), Image.Resampling.BICUBIC)
        elif arrays and im.size != arrays[0].shape[1::-1]:
            raise DataError(f"{f}: size {im.size} differs from {files[0]} "
                            f"{arrays[0].shape[1::-1]}; set data.image_size to resize all images")
        a = np.asarray(im, dtype=np.uint8)
        arrays.append(a[..., None] if a.ndim == 2 else a)
    return np.stack(arrays)


def load_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """An .npz with uint8 `images` [N, H, W(, C)] (or its only array), optional `labels` [N]."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: .npz not found; set data.path to a file with a uint8 `images` "
                        "array")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # zip, header and pickle errors alike
        raise DataError(f"{path}: not a readable .npz ({e}); re-save it with np.savez") from None
    if "images" in arrays:
        images = arrays["images"]
    elif len(arrays) == 1:
        images = next(iter(arrays.values()))
    else:
        raise DataError(f"{path}: no `images` array among {sorted(arrays)}; name the image array "
                        "`images`")
    if images.dtype != np.uint8:
        raise DataError(f"{path}: images have dtype {images.dtype}, expected uint8 (0..255); "
                        "convert with np.clip(x, 0, 255).astype(np.uint8)")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or len(images) < 2:
        raise DataError(f"{path}: images have shape {images.shape}, expected [N, H, W] or "
                        "[N, H, W, C] with C = 1 or 3 and N >= 2 (channels last)")
    labels = arrays.get("labels")
    if labels is not None:
        if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"{path}: labels have shape {labels.shape} and dtype {labels.dtype}, "
                            f"expected integers [{len(images)}]")
        labels = labels.astype(np.int64)
    return images, labels


# ----------------------------------------------------------------------------- splits


def split_images(images: np.ndarray, labels: np.ndarray | None, test_fraction: float, seed: int,
                 name: str) -> Splits:
    """Shuffle and split [N, H, W, C] into train/test (stratified by label when labels exist)."""
    _check_nhwc(images, name)
    n_test = int(round(len(images) * test_fraction))
    if n_test < 1 or n_test >= len(images):
        raise DataError(f"{name}: {len(images)} images cannot be split with test_fraction="
                        f"{test_fraction}; add images or change data.test_fraction")
    stratify = None
    if labels is not None:
        counts = np.unique(labels, return_counts=True)[1]
        if counts.min() >= 2 and len(counts) <= min(n_test, len(images) - n_test):
            stratify = labels
    from sklearn.model_selection import train_test_split  # here: importing it takes a second

    idx = np.arange(len(images))
    train_idx, test_idx = train_test_split(idx, test_size=n_test, random_state=seed, shuffle=True,
                                           stratify=stratify)
    return Splits(train=images[train_idx], test=images[test_idx],
                  train_labels=None if labels is None else labels[train_idx],
                  test_labels=None if labels is None else labels[test_idx], name=name)


def prepare_splits(cfg: DataConfig, seed: int | None = None) -> Splits:
    """The data set named by `cfg` as train/test splits (seed overrides cfg.split_seed)."""
    seed = cfg.split_seed if seed is None else seed
    if cfg.dataset == "cifar10":
        return _cifar10_from_config(cfg)  # the official train/test split
    if cfg.dataset == "digits":
        images, labels = load_digits_images()
    elif cfg.dataset == "folder":
        images, labels = load_image_folder(cfg.path, cfg.image_size), None
    else:  # npz; the config checks the name and that folder and npz have a path
        images, labels = load_npz(cfg.path)
    return split_images(images, labels, cfg.test_fraction, seed, cfg.dataset)


# ----------------------------------------------------------------------------- files


def save_grid(images: np.ndarray, path: str | Path, n: int = 64, scale: int | None = None) -> None:
    """The first n uint8 [N, H, W, C] images as a square PNG grid (1-pixel white gaps), each
    pixel drawn as scale x scale (default max(1, 64 // H): 8x8 digits stay crisp); C = 1: grey."""
    from torchvision.utils import make_grid

    x = to_model_tensor(images[:n])
    grid = make_grid(x, nrow=math.ceil(math.sqrt(len(x))), padding=1, pad_value=255)
    if len(x) == 1:  # make_grid returns a single image unpadded
        grid = torch.nn.functional.pad(grid, (1, 1, 1, 1), value=255)
    scale = max(1, 64 // x.shape[2]) if scale is None else scale
    grid = grid.repeat_interleave(scale, 1).repeat_interleave(scale, 2).permute(1, 2, 0).numpy()
    with atomic_open(path) as f:  # make_grid draws grey images as RGB: keep one channel
        Image.fromarray(grid[..., 0] if x.shape[1] == 1 else grid).save(f, format="PNG")


def save_splits(splits: Splits, out_dir: str | Path) -> None:
    """Write train.npy, test.npy (+ *_labels.npy when known; stale label files removed)."""
    out_dir = Path(out_dir)
    save_npy(splits.train, out_dir / "train.npy")
    save_npy(splits.test, out_dir / "test.npy")
    for part, labels in (("train", splits.train_labels), ("test", splits.test_labels)):
        f = out_dir / f"{part}_labels.npy"
        if labels is not None:
            save_npy(np.asarray(labels, dtype=np.int64), f)
        elif f.exists():
            f.unlink()


def _load_npy(path: str | Path) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: not found; run the prepare stage first (dvc repro prepare)")
    try:
        return np.load(path, allow_pickle=False)
    except Exception as e:  # truncated, wrong header, pickled object
        raise DataError(f"{path}: corrupt .npy ({e}); delete it and run the prepare stage "
                        "again") from None


def load_images(path: str | Path) -> np.ndarray:
    """A prepared split: uint8 [N, H, W, C], with a DataError on a missing/corrupt file."""
    arr = _load_npy(path)
    if (problem := nhwc_problem(arr)) is not None:
        raise DataError(f"{path}: {problem}; run the prepare stage again")
    return arr


def load_labels(path: str | Path) -> np.ndarray:
    """Prepared labels: int64 [N], with a DataError on a missing/corrupt file."""
    arr = _load_npy(path)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"{path}: expected integer labels [N], got {arr.dtype} {arr.shape}; run "
                        "the prepare stage again")
    return arr.astype(np.int64)
