"""Model files: trained weights that carry their own network and diffusion settings.

A model file is a plain `torch.save` zip of
    {"format": "ddpm-model/1", "spec": ModelSpec.to_dict(), "meta": {...},
     "ema": state_dict, "model": state_dict}
written through the atomic writer, so identical weights give byte-identical files. Training
checkpoints (ddpm_core.checkpoint) store the same spec, so `load_model_file` rebuilds the network
from either kind of file with nothing else: no params.yaml, no guessing from leading bytes.
Every file is read with `torch.load(weights_only=True)` after the zip's CRC-32s are checked
(torch.load itself does not check them); a missing, truncated, corrupt or foreign file is one
`ModelFileError` line naming the file and the fix. The spec is checked against the stored
tensors' shapes before the network is built (check_weights_fit), so a spec that asks for more
than its weights is refused without allocating it.
"""

from __future__ import annotations

import dataclasses
import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import torch
from torch import Tensor, nn

from ddpm_core.checkpoint import MAGIC, CheckpointError, load_checkpoint
from ddpm_core.diffusion import Diffusion
from ddpm_core.files import save_torch
from ddpm_core.modes import LEARNED_VAR_TYPES, MeanType, ScheduleKind, VarType, Which
from ddpm_core.unet import UNet, UNetConfig

FORMAT = "ddpm-model/1"
MAX_TIMESTEPS = 1_000_000  # a sane bound on T from a file (papers use <= 4000): β is [T] float64
WEIGHT_KEYS: tuple[Which, ...] = get_args(Which)  # the two weight sets of a model file
_FIX = ("use a model file written by save_model (models/<name>.pt) or a training checkpoint "
        "ckpt_*.pt")


class ModelFileError(RuntimeError):
    """A model file is missing, truncated, corrupt or not one of ours; the message names it."""


def _check_mode(value: Any, kind: Any, key: str) -> None:
    """ValueError unless `value` is one of the Literal `kind`'s names."""
    if value not in get_args(kind):
        raise ValueError(f"{key}: {value!r} is not one of {list(get_args(kind))}")


def _check_fields(d: Any, cls: type, what: str) -> None:
    """ValueError unless `d` is a mapping with exactly the fields of the dataclass `cls`."""
    if not isinstance(d, dict):
        raise ValueError(f"{what} must be a mapping, got {type(d).__name__}")
    keys = {f.name for f in dataclasses.fields(cls)}
    if set(d) != keys:
        raise ValueError(f"{what} keys {sorted(d)} differ from {sorted(keys)}")


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the network and its diffusion."""

    unet: UNetConfig
    schedule: ScheduleKind
    timesteps: int
    mean_type: MeanType
    var_type: VarType

    def __post_init__(self) -> None:
        _check_mode(self.schedule, ScheduleKind, "schedule")
        _check_mode(self.mean_type, MeanType, "mean_type")
        _check_mode(self.var_type, VarType, "var_type")
        if type(self.timesteps) is not int or not 1 <= self.timesteps <= MAX_TIMESTEPS:
            raise ValueError(f"timesteps: {self.timesteps!r} is not an integer in "
                             f"1..{MAX_TIMESTEPS:,}")
        want = self.unet.in_channels * (2 if self.var_type in LEARNED_VAR_TYPES else 1)
        if self.unet.out_channels != want:
            raise ValueError(f"unet.out_channels={self.unet.out_channels} but var_type "
                             f"{self.var_type!r} needs {want} output channels")

    @property
    def image_shape_chw(self) -> tuple[int, int, int]:
        """[C, H, W] of the images the network takes."""
        return (self.unet.in_channels, self.unet.image_size, self.unet.image_size)

    def diffusion(self) -> Diffusion:
        """The forward process and reverse-process parameterisation."""
        return Diffusion.from_schedule(self.schedule, self.timesteps, self.mean_type, self.var_type)

    def build_net(self) -> UNet:
        """A freshly initialised network of this architecture."""
        return UNet(self.unet)

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (lists for tuples): JSON- and weights_only-loadable."""
        d = dataclasses.asdict(self)
        d["unet"] = {k: list(v) if isinstance(v, tuple) else v for k, v in d["unet"].items()}
        return d

    @classmethod
    def from_dict(cls, d: Any) -> ModelSpec:
        """Inverse of to_dict; ValueError names what is wrong."""
        _check_fields(d, cls, "model spec")
        _check_fields(d["unet"], UNetConfig, "model spec: unet")
        unet = UNetConfig(**{k: tuple(v) if isinstance(v, list) else v
                             for k, v in d["unet"].items()})
        return cls(**{**d, "unet": unet})


def save_model(path: str | Path, spec: ModelSpec, weights: dict[str, dict[str, Tensor]],
               meta: dict[str, Any] | None = None) -> None:
    """Write a model file atomically; identical inputs give byte-identical files."""
    assert set(weights) == set(WEIGHT_KEYS), f"weights {sorted(weights)} != {WEIGHT_KEYS}"
    meta = dict(meta or {})
    try:
        json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"meta must be plain JSON data: {e}") from None
    for k in WEIGHT_KEYS:  # refuse a file that could not be loaded back (checked on meta)
        check_weights_fit(spec.unet, weights[k])
    blob = {"format": FORMAT, "spec": spec.to_dict(), "meta": meta,
            **{k: {n: t.detach().cpu().contiguous() for n, t in weights[k].items()}
               for k in WEIGHT_KEYS}}
    save_torch(blob, path)


def check_weights_fit(cfg: UNetConfig, weights: Any, spec_name: str = "the spec") -> None:
    """ValueError unless `weights` is a state dict of tensors with exactly the parameter names
    and shapes of UNet(cfg), checked before anything is allocated: a spec asking for a deeper
    network than the weights could fill is refused outright, and the shapes are compared on
    the meta device. A network that passes is as large as its stored weights."""
    if not isinstance(weights, dict) or not all(
            isinstance(k, str) and isinstance(v, Tensor) for k, v in weights.items()):
        raise ValueError("the weights are not a state dict of tensors")
    levels, blocks = len(cfg.channel_mult), cfg.num_res_blocks
    if levels * blocks > len(weights):  # every residual block holds tensors of its own
        raise ValueError(f"{spec_name} asks for {levels} levels x {blocks} residual blocks; "
                         f"the weights hold only {len(weights)} tensors")
    with torch.device("meta"):
        own = {k: tuple(v.shape) for k, v in UNet(cfg).state_dict().items()}
    missing, unexpected = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
    if missing or unexpected:
        raise ValueError(f"missing keys {missing[:3]}, unexpected keys {unexpected[:3]} "
                         f"({len(missing)} missing, {len(unexpected)} unexpected)")
    bad = [k for k in own if tuple(weights[k].shape) != own[k]]
    if bad:
        raise ValueError(f"{len(bad)} of {len(own)} tensors differ in shape, e.g. {bad[0]}: "
                         f"{own[bad[0]]} in {spec_name}, {tuple(weights[bad[0]].shape)} stored")


@dataclass
class LoadedModel:
    """A network in eval mode on the CPU, its diffusion, spec, metadata and source file."""

    net: nn.Module
    diffusion: Diffusion
    spec: ModelSpec
    meta: dict[str, Any]
    source: str


def read_torch_file(path: Path, error: type[Exception], what: str, fix: str, *,
                    missing: str = "not found", other: bytes | None = None) -> Any:
    """The object in the torch zip at `path`, read with weights_only after its CRC-32s are
    checked (torch.load does not check them), or one `error` line naming `path` and `fix`.
    A file whose bytes start with `other` is returned as those bytes, for its own loader."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise error(f"{path}: {missing}; {fix}") from None
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror}); {fix}") from None
    if other is not None and raw.startswith(other):
        return raw
    try:
        bad = zipfile.ZipFile(io.BytesIO(raw)).testzip()
        blob = None if bad else torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:  # not a zip (text, a bare pickle), cut off, code in its pickle, ...
        raise error(f"{path}: not a readable {what} ({type(e).__name__}); {fix}") from None
    if bad is not None:
        raise error(f"{path}: corrupt (CRC-32 of {bad} does not match); {fix}")
    return blob


def _read_blob(path: Path) -> tuple[dict, dict[str, Any]]:
    """(state holding "spec" and the weights, meta) from a model file or a training checkpoint."""
    blob = read_torch_file(path, ModelFileError, "model file", _FIX, other=MAGIC)
    if isinstance(blob, bytes):
        try:
            state = load_checkpoint(path)
        except CheckpointError as e:
            raise ModelFileError(f"{e}; use an older checkpoint or a model file") from None
        if state.get("spec") is None:
            raise ModelFileError(f"{path}: training checkpoint without a model spec (written "
                                 "before checkpoints carried one); use models/<name>.pt "
                                 "or train again")
        return state, {"step": int(state["step"])}
    fmt = blob.get("format") if isinstance(blob, dict) else None
    if fmt != FORMAT:
        found = f"format {fmt!r}" if fmt is not None else f"a {type(blob).__name__}"
        raise ModelFileError(f"{path}: holds {found}, not {FORMAT!r}; {_FIX}")
    meta = blob.get("meta")
    return blob, meta if isinstance(meta, dict) else {}


def load_model_file(path: str | Path, which: Which = "ema") -> LoadedModel:
    """Rebuild the network (EMA or raw weights) and diffusion from a model file or checkpoint."""
    path = Path(path)
    blob, meta = _read_blob(path)
    try:
        spec = ModelSpec.from_dict(blob["spec"])
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFileError(f"{path}: bad model spec ({e}); {_FIX}") from None
    weights = blob.get(which)
    if not isinstance(weights, dict):
        raise ModelFileError(f"{path}: no {which!r} weights; {_FIX}")
    try:  # before building: a spec of a few bytes can ask for terabytes
        check_weights_fit(spec.unet, weights)
    except ValueError as e:
        raise ModelFileError(f"{path}: weights do not fit the stored spec ({e}); {_FIX}") from None
    net = spec.build_net()
    net.load_state_dict(weights)  # names and shapes checked above: it cannot fail
    return LoadedModel(net=net.eval(), diffusion=spec.diffusion(), spec=spec, meta=meta,
                       source=str(path))
