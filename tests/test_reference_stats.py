"""Reference statistics computed once (the `features` stage) give the same FID and KID as
torch-fidelity's calculate_metrics, which extracts the reference features on every call."""

from __future__ import annotations

import numpy as np
import torch
import torch_fidelity

from ddpm_core import digits_classifier as C
from ddpm_core import fid as F
from ddpm_core.data import to_model_tensor


class _Images(torch.utils.data.Dataset):
    """uint8 [N, H, W, C] as torch-fidelity's input: items uint8 [C, H, W]."""

    def __init__(self, images: np.ndarray) -> None:
        self.x = to_model_tensor(images)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i]


def calculate_metrics(samples: np.ndarray, reference: np.ndarray, classifier: str,
                      kid_subset_size: int) -> dict[str, float]:
    """The oracle: torch-fidelity's own calculate_metrics on the two image sets, extracting the
    reference features itself, with the digits classifier's features."""
    F._register_digits_extractor()
    out = torch_fidelity.calculate_metrics(
        input1=_Images(samples), input2=_Images(reference), fid=True, kid=True,
        feature_extractor=F.DIGITS_EXTRACTOR_NAME, feature_extractor_weights_path=classifier,
        kid_subset_size=kid_subset_size, kid_subsets=100, batch_size=256, cuda=False,
        rng_seed=2020, cache=False, save_cpu_ram=True, verbose=False)
    return {"fid": float(out["frechet_inception_distance"]),
            "kid_mean": float(out["kernel_inception_distance_mean"]),
            "kid_std": float(out["kernel_inception_distance_std"])}


def test_metrics_against_stored_statistics_equal_a_full_recomputation(tmp_path, one_thread):
    rng = np.random.default_rng(0)
    reference = rng.integers(0, 256, (120, 8, 8, 1), dtype=np.uint8)
    labels = rng.integers(0, 10, 120)
    samples = np.clip(reference[:40].astype(int) + rng.integers(-30, 30, (40, 8, 8, 1)), 0,
                      255).astype(np.uint8)
    clf = C.train_digits_classifier(reference, labels, epochs=1, seed=0)
    C.save_classifier(clf, tmp_path / "clf.pt")
    full = calculate_metrics(samples, reference, str(tmp_path / "clf.pt"), kid_subset_size=20)
    net = F.feature_network("digits_classifier", classifier_path=tmp_path / "clf.pt")
    calls = []
    F.extract_features(net, reference, batch_size=50, on_batch=calls.append)
    assert calls == [50, 50, 20]  # one pass, batch by batch
    # torch-fidelity's batch size (256): float32 features are then bit-identical
    ref = F.reference_statistics(net, F.extract_features(net, reference))
    F.save_reference(ref, tmp_path / "ref.npz")
    stored = F.load_reference(tmp_path / "ref.npz")
    assert len(stored.kid_features) == 120 and stored.sigma.shape == (64, 64)
    got = F.metrics_against(net, F.extract_features(net, samples), stored, kid_subset_size=20)
    assert got["fid"] > 0
    # the same features (bit for bit), the same estimators and seeds: the same numbers
    for k in ("fid", "kid_mean", "kid_std"):
        assert got[k] == full[k], (k, got[k], full[k])
