"""Where a model comes from: a local path or a Hugging Face hub id (standard library only, so
`ddpm` answers a mistyped path in a blink, without torch and without the network).

`path` is a hub id only when all of these hold; otherwise it is a local path, and a missing local
path is "<path>: not found":
- it is exactly `owner/name` (one slash; letters, digits, `_`, `-` and `.`),
- it does not start with `.`, `/` or `~`,
- nothing exists at that path here, and `owner` is not a file or folder here (with a models/
  folder, models/simpel is a typo, not a repository),
- `name` does not end in a file extension of ours (.pt, .safetensors, .npz, ... LOCAL_SUFFIXES).
So google/ddpm-cifar10-32 goes to the hub; mdoels/simple.pt, ./typo and models/x do not.
"""

from __future__ import annotations

import re
from pathlib import Path

HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
LOCAL_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors", ".npz", ".npy", ".json",
                  ".yaml", ".yml", ".png", ".jpg", ".jpeg")


def is_hub_id(path: str | Path) -> bool:
    """Whether `path` names a Hugging Face hub repository (the rule in the module docstring)."""
    s = str(path)
    if not HUB_ID.fullmatch(s) or s.startswith((".", "/", "~")):
        return False
    owner, name = s.split("/")
    if Path(s).exists() or Path(owner).exists():
        return False
    return Path(name).suffix.lower() not in LOCAL_SUFFIXES


def check_model_source(path: str | Path) -> None:
    """FileNotFoundError `<path>: not found` unless `path` exists here or is a hub id."""
    if not (Path(path).exists() or is_hub_id(path)):
        raise FileNotFoundError(f"{path}: not found (no such file or folder; a Hugging Face hub "
                                "id is owner/name)")
