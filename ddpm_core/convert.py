"""Our ``UNet`` + ``Diffusion`` <-> a diffusers folder (``UNet2DModel`` + ``DDPMScheduler``).

A diffusers folder holds config.json (UNet2DModel), diffusion_pytorch_model.safetensors (or
.bin) and scheduler_config.json (DDPMScheduler), either side by side (google/ddpm-cifar10-32)
or in unet/ and scheduler/ sub-folders (a saved DDPMPipeline). The network layout is the
official DDPM one: positional embedding with flip_sin_to_cos=False and freq_shift=1, GroupNorm
(32 groups) eps 1e-6, single-head attention, conv down/up-sampling with downsample_padding=0
(TF "SAME"). Any other setting changes the computation, so it is an error.
The scheduler's β, T, variance_type and prediction_type become our ``Diffusion``.
diffusers itself is never imported; huggingface_hub only to download from the hub.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from ddpm_core.diffusion import Diffusion, MeanType, VarType
from ddpm_core.files import atomic_dir, write_json
from ddpm_core.modelfile import MAX_TIMESTEPS, check_weights_fit
from ddpm_core.schedules import BETA_END, BETA_START, MAX_BETA, make_betas, schedule_kind
from ddpm_core.sources import check_model_source
from ddpm_core.unet import PRESETS, UNet, UNetConfig

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
SCHEDULER_FILE = "scheduler_config.json"

# diffusers sub-module name -> ours, inside a residual block / an attention block.
_RES = {"norm1": "norm1", "conv1": "conv1", "time_emb_proj": "temb_proj", "norm2": "norm2",
        "conv2": "conv2", "conv_shortcut": "skip"}
# Older checkpoints (e.g. the hub's google/ddpm-* files) name them query/key/value/proj_attn;
# ours -> diffusers writes the new names, with qkv still fused (split by the caller).
_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj",
         "query": "q", "key": "k", "value": "v", "proj_attn": "proj"}
_ATTN_INV = {"norm": "group_norm", "proj": "to_out.0", "qkv": "qkv"}
# The one layout table, read both ways: (diffusers module, ours). {p}: down | up; {l}, {j}:
# level and block index; {res}, {attn}: a sub-module named by _RES / _ATTN.
_LAYOUT = (
    ("time_embedding.linear_1", "time_mlp.0"),
    ("time_embedding.linear_2", "time_mlp.2"),
    ("conv_in", "conv_in"),
    ("conv_norm_out", "norm_out"),
    ("conv_out", "conv_out"),
    ("{p}_blocks.{l}.resnets.{j}.{res}", "{p}.{l}.blocks.{j}.{res}"),
    ("{p}_blocks.{l}.attentions.{j}.{attn}", "{p}.{l}.attns.{j}.{attn}"),
    ("down_blocks.{l}.downsamplers.0.conv", "down.{l}.resample.conv"),
    ("up_blocks.{l}.upsamplers.0.conv", "up.{l}.resample.conv"),
    ("mid_block.resnets.0.{res}", "mid.block1.{res}"),
    ("mid_block.resnets.1.{res}", "mid.block2.{res}"),
    ("mid_block.attentions.0.{attn}", "mid.attn.{attn}"),
)

# Settings that must hold for our computation to equal diffusers': key -> (required value,
# diffusers' default when config.json omits the key).
_REQUIRED: dict[str, tuple[Any, Any]] = {
    "_class_name": ("UNet2DModel", "UNet2DModel"),
    "act_fn": ("silu", "silu"),
    "add_attention": (True, True),
    "attn_norm_num_groups": (None, None),
    "center_input_sample": (False, False),
    "class_embed_type": (None, None),
    "downsample_padding": (0, 1),
    "downsample_type": ("conv", "conv"),
    "flip_sin_to_cos": (False, True),
    "freq_shift": (1, 0),
    "mid_block_scale_factor": (1, 1),
    "mid_block_type": ("UNetMidBlock2D", "UNetMidBlock2D"),
    "norm_eps": (1e-6, 1e-5),
    "norm_num_groups": (32, 32),
    "num_class_embeds": (None, None),
    "resnet_time_scale_shift": ("default", "default"),
    "time_embedding_dim": (None, None),
    "time_embedding_type": ("positional", "positional"),
    "upsample_type": ("conv", "conv"),
}


class CheckpointMismatch(ValueError):
    """A diffusers state dict whose parameter names do not map onto the U-Net."""


class DiffusersFolderError(ValueError):
    """A diffusers folder's config.json or weight file is unusable; the message names the file."""


def _rename(key: str, to_ours: bool) -> str:
    """One parameter name through _LAYOUT: diffusers -> ours (q/k/v separate, fused by the
    caller) or ours -> diffusers (qkv still fused); CheckpointMismatch for any other name."""
    prefix, _, leaf = key.rpartition(".")  # leaf: weight / bias
    names = {"res": _RES if to_ours else {v: k for k, v in _RES.items()},
             "attn": _ATTN if to_ours else _ATTN_INV}
    groups = {"p": "down|up", "l": r"\d+", "j": r"\d+",
              **{k: "|".join(map(re.escape, v)) for k, v in names.items()}}
    for theirs, ours in _LAYOUT:
        src, dst = (theirs, ours) if to_ours else (ours, theirs)
        pattern = src.replace(".", r"\.").format(**{k: f"(?P<{k}>{g})" for k, g in groups.items()})
        if m := re.fullmatch(pattern, prefix):
            parts = {k: names[k][v] if k in names else v for k, v in m.groupdict().items()}
            return f"{dst.format(**parts)}.{leaf}"
    side = "diffusers key" if to_ours else "key"
    raise CheckpointMismatch(f"unexpected {side} {key!r} (not part of the DDPM U-Net)")


def convert_diffusers_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers UNet2DModel state dict -> ours (renamed; q, k, v fused into qkv)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        new = _rename(key, to_ours=True)
        if new in out:
            raise CheckpointMismatch(f"two diffusers keys map to {new!r} (old and new names?)")
        out[new] = value
    # Fuse q, k, v (each [C, C] / [C]) into qkv ([3C, C] / [3C]) in that order.
    heads = {k.rsplit(".", 2)[0] for k in out if re.search(r"\.attns?\.(\d+\.)?[qkv]\.", k)}
    for head in sorted(heads):
        for leaf in ("weight", "bias"):
            parts = [out.pop(f"{head}.{n}.{leaf}", None) for n in ("q", "k", "v")]
            if any(p is None for p in parts):
                raise CheckpointMismatch(f"attention {head!r}: q/k/v {leaf} incomplete")
            out[f"{head}.qkv.{leaf}"] = torch.cat(parts, dim=0)
    return out


def config_from_diffusers(conf: dict[str, Any]) -> UNetConfig:
    """diffusers UNet2DModel config.json -> UNetConfig; an unsupported setting names its key."""
    for key, (want, default) in _REQUIRED.items():
        if conf.get(key, default) != want:
            raise ValueError(
                f"diffusers config {key}={conf.get(key, default)!r} unsupported (need {want!r})"
            )
    for key in ("block_out_channels", "down_block_types", "up_block_types"):
        if key not in conf:
            raise ValueError(f"diffusers config lacks {key!r}")
        if not isinstance(conf[key], list | tuple) or not conf[key]:
            raise ValueError(f"{key}: {conf[key]!r} is not a non-empty list")
    for key in ("block_out_channels", "sample_size", "in_channels", "out_channels",
                "layers_per_block"):
        value = conf.get(key, 1)
        values = value if isinstance(value, list | tuple) else [value]
        if not values or not all(type(v) is int and v >= 1 for v in values):
            raise ValueError(f"{key}: {value!r} is not a positive integer (or a list of them)")
    boc = list(conf["block_out_channels"])
    down, up = list(conf["down_block_types"]), list(conf["up_block_types"])
    known = {"DownBlock2D", "AttnDownBlock2D", "UpBlock2D", "AttnUpBlock2D"}
    if not set(down + up) <= known or len(down) != len(boc) or len(up) != len(boc):
        raise ValueError(f"down_block_types {down} / up_block_types {up} unsupported")
    attn = [d.startswith("Attn") for d in down]
    if attn != [u.startswith("Attn") for u in reversed(up)]:
        raise ValueError("attention must sit at the same levels on the down and up paths")
    # One head: attention_head_dim None (the DDPM layout; also assumed when the key is absent,
    # as in the hub's old config files) or equal to the width of every attention layer.
    head_dim = conf.get("attention_head_dim")
    widths = {c for c, a in zip(boc, attn, strict=True) if a} | {boc[-1]}
    if head_dim is not None and widths != {head_dim}:
        raise ValueError(f"attention_head_dim={head_dim}: only single-head attention is supported")
    base = boc[0]
    if any(c % base for c in boc):
        raise ValueError(f"block_out_channels {boc} are not multiples of {base}")
    size = conf.get("sample_size", 32)
    size = size[0] if isinstance(size, list | tuple) else size
    return UNetConfig(
        image_size=int(size),
        in_channels=int(conf.get("in_channels", 3)),
        out_channels=int(conf.get("out_channels", 3)),
        base_channels=base,
        channel_mult=tuple(c // base for c in boc),
        num_res_blocks=int(conf.get("layers_per_block", 2)),
        attn_resolutions=tuple(int(size) // 2**i for i, a in enumerate(attn) if a),
        dropout=float(conf.get("dropout", 0.0)),
    )


def _read_weights(file: Path) -> dict[str, torch.Tensor]:
    """A .safetensors or .bin state dict; a corrupt file, or a pickle holding anything but
    tensors (refused by torch.load(weights_only=True), never run), is DiffusersFolderError."""
    if file.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            sd = load_file(str(file))
        except (SafetensorError, OSError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise DiffusersFolderError(f"{file}: not a readable safetensors file ({first}); "
                                       "download or convert it again") from None
    elif file.suffix in (".bin", ".pt", ".pth"):
        try:
            sd = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:  # a pickle with code in it, truncated, not a torch file at all
            if "weights only load failed" in str(e).lower():
                raise DiffusersFolderError(
                    f"{file}: refused to load: the pickle holds code or objects other than "
                    "tensors (torch.load weights_only=True); convert it to safetensors from a "
                    "trusted source") from None
            raise DiffusersFolderError(f"{file}: not a readable weight file "
                                       f"({type(e).__name__}); download or convert it "
                                       "again") from None
    else:
        raise ValueError(f"{file}: expected a .safetensors or .bin file")
    if not isinstance(sd, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise DiffusersFolderError(f"{file}: holds a {type(sd).__name__}, not a state dict of "
                                   "tensors")
    return sd


def _read_json(file: Path, settings: str) -> dict[str, Any]:
    """A diffusers JSON file as a mapping; DiffusersFolderError when it is not JSON or not a
    mapping (`settings` names whose settings it should hold: UNet2DModel, DDPMScheduler)."""
    try:
        conf = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DiffusersFolderError(f"{file}: not valid JSON ({e}); copy the model "
                                   f"repository's {file.name} again") from None
    if not isinstance(conf, dict):
        raise DiffusersFolderError(f"{file}: holds a {type(conf).__name__}, not a mapping of "
                                   f"{settings} settings")
    return conf


def resolve_diffusers_path(path: str | Path) -> Path:
    """A local path as it is; a hub id (ddpm_core.sources.is_hub_id) downloaded (config,
    scheduler, weights) to the cache by huggingface_hub; a missing local path is
    FileNotFoundError."""
    check_model_source(path)
    if Path(path).exists():
        return Path(path)
    from huggingface_hub import snapshot_download

    repo_id = str(path)
    files = ["config.json", SCHEDULER_FILE, *WEIGHT_FILES]
    patterns = [*files, *(f"unet/{f}" for f in files), f"scheduler/{SCHEDULER_FILE}"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repository, ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise FileNotFoundError(f"could not fetch {repo_id!r} from the Hugging Face hub "
                                f"({type(e).__name__}: {first}); check the network or pass a "
                                "local folder") from None


def _narrow_norms(net: UNet) -> list[int]:
    """Widths at which our GroupNorm has fewer groups than diffusers' 32 (unet.num_groups)."""
    return sorted({m.num_channels for m in net.modules()
                   if isinstance(m, torch.nn.GroupNorm) and m.num_groups != 32})


def load_diffusers_unet(path: str | Path) -> UNet:
    """UNet with the weights of a diffusers UNet2DModel (directory, weight file or hub id)."""
    path = resolve_diffusers_path(path)
    if path.is_dir() and (path / "unet" / "config.json").is_file():
        path = path / "unet"  # a saved DDPMPipeline
    if path.is_dir():
        files = [path / f for f in WEIGHT_FILES if (path / f).is_file()]
        if not files:
            raise FileNotFoundError(f"{path}: none of {WEIGHT_FILES} found")
        weights, conf_file = files[0], path / "config.json"
    else:
        weights, conf_file = path, path.parent / "config.json"
    # The weights first (their size is the file's), then the network the config asks for is
    # checked against their shapes before it is built: config.json cannot make us allocate.
    try:
        sd = convert_diffusers_state_dict(_read_weights(weights))
    except CheckpointMismatch as e:
        raise DiffusersFolderError(f"{weights}: {e}") from None
    # a bare weight file without config.json: the official CIFAR-10 model
    spec_file, cfg = weights, PRESETS["cifar10"]
    if conf_file.is_file():
        spec_file, conf = conf_file, _read_json(conf_file, "UNet2DModel")
        try:
            cfg = config_from_diffusers(conf)
        except ValueError as e:
            raise DiffusersFolderError(f"{conf_file}: {e}") from None
    try:
        check_weights_fit(cfg, sd, spec_name=spec_file.name)
    except ValueError as e:
        raise DiffusersFolderError(f"{spec_file}: does not fit the weights in {weights.name} "
                                   f"({e})") from None
    model = UNet(cfg)
    if odd := _narrow_norms(model):
        raise ValueError(f"our GroupNorm uses fewer than diffusers' 32 groups at widths {odd}")
    model.load_state_dict(sd)  # names and shapes checked above
    return model


# ----------------------------------------------------------------------------- scheduler

# DDPMScheduler variance_type / prediction_type -> ours (the *_log variants differ from the
# plain ones only in how diffusers computes the same σ²).
_VAR_FROM_DIFFUSERS: dict[str, VarType] = {
    "fixed_large": "fixed_large", "fixed_large_log": "fixed_large",
    "fixed_small": "fixed_small", "fixed_small_log": "fixed_small",
    "learned": "learned", "learned_range": "learned_range"}
_MEAN_FROM_DIFFUSERS: dict[str, MeanType] = {"epsilon": "eps", "sample": "x0"}
_MEAN_TO_DIFFUSERS = {v: k for k, v in _MEAN_FROM_DIFFUSERS.items()}


def _diffusers_betas(schedule: str, start: float, end: float, T: int) -> torch.Tensor:
    """β [T] float64 of DDPMScheduler's named schedules (diffusers' formulas, in float64)."""
    if schedule == "linear":
        return torch.linspace(start, end, T, dtype=torch.float64)
    if schedule == "scaled_linear":
        return torch.linspace(start**0.5, end**0.5, T, dtype=torch.float64) ** 2
    if schedule == "squaredcos_cap_v2":
        return make_betas("cosine", T)  # Nichol & Dhariwal 2021, eq. (17), β capped at 0.999
    raise ValueError(f"scheduler beta_schedule={schedule!r} unsupported (need linear, "
                     "scaled_linear, squaredcos_cap_v2 or trained_betas)")


def diffusion_from_scheduler_config(conf: dict[str, Any]) -> Diffusion:
    """DDPMScheduler scheduler_config.json -> Diffusion (β, mean and variance types)."""
    cls = conf.get("_class_name", "DDPMScheduler")
    if cls not in ("DDPMScheduler", "DDIMScheduler"):
        raise ValueError(f"scheduler _class_name={cls!r} unsupported (need DDPMScheduler)")
    T = conf.get("num_train_timesteps", 1000)
    if type(T) is not int or not 2 <= T <= MAX_TIMESTEPS:
        raise ValueError(f"scheduler num_train_timesteps={T!r} is not an integer in "
                         f"2..{MAX_TIMESTEPS:,}")
    if conf.get("trained_betas") is not None:
        betas = torch.tensor(conf["trained_betas"], dtype=torch.float64)
        if betas.shape != (T,):
            raise ValueError(f"scheduler trained_betas has {betas.numel()} values, "
                             f"num_train_timesteps is {T}")
    else:
        betas = _diffusers_betas(conf.get("beta_schedule", "linear"),
                                 float(conf.get("beta_start", BETA_START)),
                                 float(conf.get("beta_end", BETA_END)), T)
    var = conf.get("variance_type", "fixed_small")  # DDPMScheduler's default
    if var not in _VAR_FROM_DIFFUSERS:
        raise ValueError(f"scheduler variance_type={var!r} unsupported (need one of "
                         f"{sorted(_VAR_FROM_DIFFUSERS)})")
    pred = conf.get("prediction_type", "epsilon")
    if pred not in _MEAN_FROM_DIFFUSERS:
        raise ValueError(f"scheduler prediction_type={pred!r} unsupported (need epsilon or sample)")
    return Diffusion(betas, _MEAN_FROM_DIFFUSERS[pred], _VAR_FROM_DIFFUSERS[var])


_KIND_TO_DIFFUSERS = {"linear": "linear", "quadratic": "scaled_linear",
                      "cosine": "squaredcos_cap_v2"}


def scheduler_config(diff: Diffusion) -> dict[str, Any]:
    """Diffusion -> DDPMScheduler scheduler_config.json (a named schedule when β is one)."""
    if diff.mean_type not in _MEAN_TO_DIFFUSERS:
        raise ValueError(f"mean_type {diff.mean_type!r} has no diffusers prediction_type "
                         "(only eps and x0 do)")
    T = diff.T
    start, end = BETA_START * 1000 / T, BETA_END * 1000 / T  # ours, rescaled for T != 1000
    conf: dict[str, Any] = {"_class_name": "DDPMScheduler", "num_train_timesteps": T}
    kind = schedule_kind(diff.betas)
    if kind == "cosine" or (kind in _KIND_TO_DIFFUSERS and end < MAX_BETA):  # else clipped β
        conf.update(beta_schedule=_KIND_TO_DIFFUSERS[kind], beta_start=start, beta_end=end,
                    trained_betas=None)
    else:
        conf.update(beta_schedule="linear", beta_start=float(diff.betas[0]),
                    beta_end=float(diff.betas[-1]), trained_betas=diff.betas.tolist())
    conf.update(variance_type=diff.var_type, prediction_type=_MEAN_TO_DIFFUSERS[diff.mean_type],
                clip_sample=True, clip_sample_range=1.0)
    return conf


def read_scheduler_config(path: str | Path) -> dict[str, Any]:
    """scheduler_config.json of a diffusers folder (beside config.json or in scheduler/)."""
    path = Path(path)
    root = path if path.is_dir() else path.parent
    for f in (root / SCHEDULER_FILE, root / "scheduler" / SCHEDULER_FILE,
              root.parent / "scheduler" / SCHEDULER_FILE):
        if f.is_file():
            return _read_json(f, "DDPMScheduler")
    raise FileNotFoundError(f"{root}: no {SCHEDULER_FILE} (the diffusion's T and β); copy the "
                            "model repository's scheduler_config.json beside config.json")


def load_diffusers(path: str | Path) -> tuple[UNet, Diffusion]:
    """(UNet, Diffusion) of a diffusers folder or hub id: UNet2DModel + DDPMScheduler."""
    path = resolve_diffusers_path(path)
    conf = read_scheduler_config(path)
    try:
        diff = diffusion_from_scheduler_config(conf)
    except ValueError as e:  # a setting we do not support: name the folder
        raise DiffusersFolderError(f"{path}: {SCHEDULER_FILE}: {e}") from None
    net = load_diffusers_unet(path)
    want = diff.out_channels(net.cfg.in_channels)
    if net.cfg.out_channels != want:
        raise ValueError(f"{path}: the network outputs {net.cfg.out_channels} channels but "
                         f"variance_type={diff.var_type!r} needs {want}")
    return net.eval(), diff


# ----------------------------------------------------------------------------- ours -> diffusers

def config_to_diffusers(cfg: UNetConfig) -> dict[str, Any]:
    """UNetConfig -> diffusers UNet2DModel config.json (the official DDPM layout)."""
    attn = [r in cfg.attn_resolutions for r in cfg.resolutions]
    conf: dict[str, Any] = {
        "_class_name": "UNet2DModel",
        "sample_size": cfg.image_size, "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "block_out_channels": [cfg.base_channels * m for m in cfg.channel_mult],
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "layers_per_block": cfg.num_res_blocks, "dropout": cfg.dropout,
    }
    conf.update({k: want for k, (want, _) in _REQUIRED.items()})
    conf["attention_head_dim"] = None
    return conf


def to_diffusers_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> diffusers UNet2DModel's (renamed; qkv split into to_q, to_k, to_v)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        new = _rename(key, to_ours=False)
        stem, _, leaf = new.rpartition(".")
        if stem.endswith(".qkv"):
            for name, part in zip(("to_q", "to_k", "to_v"), value.chunk(3, dim=0), strict=True):
                out[f"{stem[:-3]}{name}.{leaf}"] = part.contiguous()
        else:
            out[new] = value.contiguous()
    return out


def save_diffusers(net: UNet, diff: Diffusion, path: str | Path) -> None:
    """Write a diffusers folder: config.json, diffusion_pytorch_model.safetensors and
    scheduler_config.json (loadable by UNet2DModel/DDPMScheduler.from_pretrained), atomically."""
    from safetensors.torch import save_file

    cfg: UNetConfig = net.cfg
    if odd := _narrow_norms(net):
        raise ValueError(f"diffusers' UNet2DModel uses 32 GroupNorm groups in every layer; ours "
                         f"uses fewer at widths {odd} (only networks whose layers are all >= 128 "
                         "channels convert)")
    assert cfg.out_channels == diff.out_channels(cfg.in_channels), "checked by the loaders"
    sched = scheduler_config(diff)
    with atomic_dir(path) as tmp:
        sd = {k: v.detach().cpu().float() for k, v in net.state_dict().items()}
        save_file(to_diffusers_state_dict(sd), str(tmp / WEIGHT_FILES[0]),
                  metadata={"format": "pt"})
        write_json(config_to_diffusers(cfg), tmp / "config.json", sort_keys=False)
        write_json(sched, tmp / SCHEDULER_FILE, sort_keys=False)

