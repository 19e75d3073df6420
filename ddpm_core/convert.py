"""Load diffusers ``UNet2DModel`` checkpoints of the official DDPM models into our ``UNet``.

The layout is google/ddpm-cifar10-32's: positional embedding with flip_sin_to_cos=False and
freq_shift=1, GroupNorm eps 1e-6, single-head attention, conv down/up-sampling with
downsample_padding=0 (TF "SAME"). Any other setting changes the computation, so it is an error.
diffusers itself is not needed; huggingface_hub only to download from the hub.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from ddpm_core.unet import PRESETS, UNet, UNetConfig

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")

# diffusers sub-module name -> ours, inside a residual block / an attention block.
_RES = {"norm1": "norm1", "conv1": "conv1", "time_emb_proj": "temb_proj", "norm2": "norm2",
        "conv2": "conv2", "conv_shortcut": "skip"}
# Older checkpoints (e.g. the hub's google/ddpm-* files) name them query/key/value/proj_attn.
_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj",
         "query": "q", "key": "k", "value": "v", "proj_attn": "proj"}
_TOP = {"time_embedding.linear_1": "time_mlp.0", "time_embedding.linear_2": "time_mlp.2",
        "conv_in": "conv_in", "conv_norm_out": "norm_out", "conv_out": "conv_out"}

# Settings that must hold for our computation to equal diffusers': key -> (required value,
# diffusers' default when config.json omits the key).
_REQUIRED: dict[str, tuple[Any, Any]] = {
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
    """A checkpoint whose keys or shapes do not match the U-Net."""


def _map_key(key: str) -> str:
    """One diffusers parameter name -> ours (q/k/v left separate, fused later)."""
    prefix, _, leaf = key.rpartition(".")  # leaf: weight / bias
    if prefix in _TOP:
        return f"{_TOP[prefix]}.{leaf}"
    m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)"
                     r"\.(\d+)(?:\.(.+))?", prefix)
    if m:
        path, lvl, kind, j, sub = m.groups()
        if kind in ("downsamplers", "upsamplers") and j == "0" and sub == "conv":
            return f"{path}.{lvl}.resample.conv.{leaf}"
        if kind == "resnets" and sub in _RES:
            return f"{path}.{lvl}.blocks.{j}.{_RES[sub]}.{leaf}"
        if kind == "attentions" and sub in _ATTN:
            return f"{path}.{lvl}.attns.{j}.{_ATTN[sub]}.{leaf}"
    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d)\.(.+)", prefix)
    if m:
        kind, j, sub = m.groups()
        if kind == "resnets" and j in "01" and sub in _RES:
            return f"mid.block{int(j) + 1}.{_RES[sub]}.{leaf}"
        if kind == "attentions" and j == "0" and sub in _ATTN:
            return f"mid.attn.{_ATTN[sub]}.{leaf}"
    raise CheckpointMismatch(f"unexpected diffusers key {key!r} (not part of the DDPM U-Net)")


def convert_diffusers_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers UNet2DModel state dict -> ours (renamed; q, k, v fused into qkv)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        new = _map_key(key)
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


def load_converted(model: UNet, sd: dict[str, torch.Tensor]) -> UNet:
    """Load an already converted state dict; any missing/unexpected key or shape is an error."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        raise CheckpointMismatch(f"checkpoint does not match the U-Net: missing keys {missing}, "
                                 f"unexpected keys {unexpected}")
    bad = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
           for k, v in own.items() if sd[k].shape != v.shape]
    if bad:
        raise CheckpointMismatch("shape mismatch: " + "; ".join(bad))
    model.load_state_dict(sd, strict=True)
    return model


def config_from_diffusers(conf: dict[str, Any]) -> UNetConfig:
    """diffusers UNet2DModel config.json -> UNetConfig; an unsupported setting names its key."""
    for key, (want, default) in _REQUIRED.items():
        if conf.get(key, default) != want:
            raise ValueError(
                f"diffusers config {key}={conf.get(key, default)!r} unsupported (need {want!r})"
            )
    if conf.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ValueError(f"_class_name={conf['_class_name']!r}: only UNet2DModel is supported")
    for key in ("block_out_channels", "down_block_types", "up_block_types"):
        if key not in conf:
            raise ValueError(f"diffusers config lacks {key!r}")
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
    """Read a .safetensors or .bin state dict."""
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file))
    if file.suffix in (".bin", ".pt", ".pth"):
        return torch.load(file, map_location="cpu", weights_only=True)
    raise ValueError(f"{file}: expected a .safetensors or .bin file")


def _from_hub(repo_id: str) -> Path:
    """Download config.json and the weights of a hub repository (needs huggingface_hub)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise FileNotFoundError(
            f"{repo_id!r} is not a local path and huggingface_hub is not installed"
        ) from e
    patterns = ["config.json", *WEIGHT_FILES]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repository, ...
        raise FileNotFoundError(f"could not fetch {repo_id!r} from the hub: {e}") from e


def load_diffusers_unet(path: str | Path, cfg: UNetConfig | None = None) -> UNet:
    """UNet with the weights of a diffusers UNet2DModel (directory, weight file or hub id)."""
    path = Path(path)
    if not path.exists():
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)):
            raise FileNotFoundError(f"{path}: no such file or directory (nor a hub id owner/name)")
        path = _from_hub(str(path))
    if path.is_dir():
        files = [path / f for f in WEIGHT_FILES if (path / f).is_file()]
        if not files:
            raise FileNotFoundError(f"{path}: none of {WEIGHT_FILES} found")
        weights, conf_file = files[0], path / "config.json"
    else:
        weights, conf_file = path, path.parent / "config.json"
    if cfg is None:
        # A bare weight file without config.json is taken to be the official CIFAR-10 model.
        if conf_file.is_file():
            cfg = config_from_diffusers(json.loads(conf_file.read_text()))
        else:
            cfg = PRESETS["cifar10"]
    model = UNet(cfg)
    odd = sorted({m.num_channels for m in model.modules()
                  if isinstance(m, torch.nn.GroupNorm) and m.num_groups != 32})
    if odd:
        raise ValueError(f"our GroupNorm uses fewer than diffusers' 32 groups at widths {odd}")
    return load_converted(model, convert_diffusers_state_dict(_read_weights(weights)))
