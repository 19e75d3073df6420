"""A small CNN classifier of the 8x8 digits: the feature network of FID/KID on that data set.

Inception features of 8x8 grey digits mean nothing; the penultimate layer of this classifier,
trained on the digits training split, stands in for them (fid.py registers it with
torch-fidelity). Files are written through the atomic writer and read with weights_only=True.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ddpm_core.data import nhwc_problem
from ddpm_core.files import save_torch


class ClassifierError(RuntimeError):
    """A missing or corrupt classifier file, or unusable images; the message names the fix."""


class DigitsClassifier(nn.Module):
    """Small CNN: uint8-scaled [B, C, H, W] in [0, 1] -> logits [B, classes]; 64-d features."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, feature_dim: int = 64):
        super().__init__()
        self.config = {"in_channels": in_channels, "num_classes": num_classes,
                       "feature_dim": feature_dim}
        self.conv1 = nn.Conv2d(in_channels, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(4)  # 8x8 -> 4x4; other sizes too
        self.fc1 = nn.Linear(64 * 16, feature_dim)
        self.fc2 = nn.Linear(feature_dim, num_classes)
        # Set after training so the training features have unit RMS: KID's polynomial kernel
        # (x.y / d + 1)^3 then sees O(1) dot products, as with Inception's pool features.
        self.register_buffer("feature_scale", torch.ones(()))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations [B, feature_dim] of images [B, C, H, W] in [0, 1]."""
        h = F.relu(self.conv1(x))
        h = self.pool(F.relu(self.conv2(h)))
        return F.relu(self.fc1(h.flatten(1))) * self.feature_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, classes] of images [B, C, H, W] in [0, 1]."""
        return self.fc2(self.features(x) / self.feature_scale)


def _unit_nchw(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, C] -> float32 [N, C, H, W] in [0, 1]."""
    if (problem := nhwc_problem(images)) is not None:
        raise ClassifierError(f"images: {problem}")
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0


def _random_shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Translate each image [B, C, H, W] by -1..1 pixels (zero fill): cheap augmentation."""
    # Keep the two gathers: an indexed or unfold-based shift gives the same values, yet the
    # classifier trained on it comes out different in the last bits (oneDNN's convolutions take
    # other kernels for it), and with it the digits FIDs (floor 0.1513 instead of 0.1538).
    b, _, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1))
    dy, dx = torch.randint(0, 3, (2, b), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(-1, x.shape[1], -1, w + 2)
    padded = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(-1, x.shape[1], h, -1)
    return padded.gather(3, cols)


def train_digits_classifier(images: np.ndarray, labels: np.ndarray, epochs: int = 30,
                            seed: int = 0, batch_size: int = 32) -> DigitsClassifier:
    """Fit DigitsClassifier (Adam, cross-entropy) on uint8 [N, H, W, C] with labels [N]."""
    x = _unit_nchw(images)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    assert y.shape == (len(x),), f"labels {tuple(y.shape)} do not match images {tuple(x.shape)}"
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsClassifier(in_channels=x.shape[1], num_classes=int(y.max()) + 1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small runs fastest on one thread (no sync costs)
    try:
        model.train()
        for _ in range(epochs):
            perm = torch.randperm(len(x), generator=gen)
            for i in range(0, len(x), batch_size):
                idx = perm[i:i + batch_size]
                loss = F.cross_entropy(model(_random_shift(x[idx], gen)), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            model.feature_scale.fill_(model.features(x).pow(2).mean().rsqrt().item())
    finally:
        torch.set_num_threads(threads)
    return model


@torch.no_grad()
def classifier_accuracy(model: DigitsClassifier, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy on uint8 [N, H, W, C] with labels [N]."""
    pred = model.eval()(_unit_nchw(images)).argmax(1).numpy()
    return float((pred == np.asarray(labels)).mean())


def save_classifier(model: DigitsClassifier, path: str | Path) -> None:
    """Write {config, state_dict} through the atomic writer."""
    save_torch({"config": model.config, "state_dict": model.state_dict()}, path)


def load_classifier(path: str | Path) -> DigitsClassifier:
    """Read a classifier written by save_classifier (eval mode)."""
    path = Path(path)
    if not path.is_file():
        raise ClassifierError(f"{path}: digits classifier not found; run the fid stage, which "
                              "trains it on the training split")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        model = DigitsClassifier(**ckpt["config"])
        model.load_state_dict(ckpt["state_dict"])
    except Exception as e:  # truncated file, wrong keys, wrong shapes
        raise ClassifierError(f"{path}: corrupt digits classifier ({type(e).__name__}); delete it "
                              "and run the fid stage again") from None
    return model.eval()
