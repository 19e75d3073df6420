"""The heads file: the variance heads (heads.py) of one model, beside it (models/<v>.heads.pt).

A torch zip of plain tensors and builtins (read by modelfile.read_torch_file, CRC-32s checked):
its format tag, the head kinds, their shape (the UNet's feature channels and the image
channels) and each head's weights, plus the caller's meta. Written through files.save_torch
(atomic); every way a file can be wrong is one HeadsFileError line naming the path and the fix.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ddpm_core.files import save_torch
from ddpm_core.heads import VarianceHead
from ddpm_core.modelfile import read_torch_file
from ddpm_core.modes import HEAD_KINDS, HeadKind

FORMAT = "ddpm-variance-heads-v1"
_FIX = "train them again (ddpm_core.train_heads, then save_heads) or give the heads file"


class HeadsFileError(ValueError):
    """A heads file that is missing, unreadable or not one (a bad input: exit 2)."""


def save_heads(heads: Mapping[HeadKind, VarianceHead], path: str | Path,
               meta: dict[str, Any] | None = None) -> None:
    """Write {kind: head} and meta (builtins only) to `path` atomically."""
    if not heads or any(k not in HEAD_KINDS for k in heads):
        raise ValueError(f"heads must map some of {HEAD_KINDS} to heads, got {tuple(heads)}")
    first = next(iter(heads.values()))
    blob = {"format": FORMAT, "kinds": list(heads),
            "feature_channels": int(first.conv.in_channels),
            "out_channels": int(first.conv.out_channels),
            "weights": {k: {n: v.detach().cpu() for n, v in h.state_dict().items()}
                        for k, h in heads.items()},
            "meta": dict(meta or {})}
    save_torch(blob, path)


def load_heads(path: str | Path) -> dict[HeadKind, VarianceHead]:
    """{kind: head} (CPU) from a heads file, or a one-line HeadsFileError."""
    path = Path(path)
    blob = read_torch_file(path, HeadsFileError, "heads file", _FIX,
                           missing="heads file not found")
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        found = blob.get("format") if isinstance(blob, dict) else type(blob).__name__
        raise HeadsFileError(f"{path}: holds {found!r}, not {FORMAT!r}; {_FIX}")
    try:
        kinds, weights = list(blob["kinds"]), blob["weights"]
        if not kinds or any(k not in HEAD_KINDS for k in kinds):
            raise ValueError(f"kinds {kinds}")
        heads = {}
        for k in kinds:
            heads[k] = VarianceHead(int(blob["feature_channels"]), int(blob["out_channels"]))
            heads[k].load_state_dict(weights[k])
            heads[k].eval().requires_grad_(False)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        msg = " ".join(str(e).split())[:200]
        raise HeadsFileError(f"{path}: bad heads file ({type(e).__name__}: {msg}); "
                             f"{_FIX}") from None
    return heads

