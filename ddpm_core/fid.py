"""FID, KID and IS through torch-fidelity, with the feature network chosen for the data.

Natural images use torch-fidelity's Inception-v3 ('inception-v3-compat', TF-FID compatible).
Inception features of 8x8 grey digits mean nothing, so the digits data set uses the penultimate
layer of a small CNN classifier trained on the digits training split (digits_classifier.py),
registered here with torch-fidelity as a custom feature extractor. The two numbers are not
comparable: `metric_label` names the feature network next to every value.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch_fidelity
from torch import Tensor
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from ddpm_core.data import download_file, to_model_tensor
from ddpm_core.digits_classifier import ClassifierError, load_classifier
from ddpm_core.files import save_npz
from ddpm_core.inference import default_device
from ddpm_core.modes import Features
from ddpm_core.progress import Progress
from ddpm_core.units import UnitStore, run_units

INCEPTION_NAME = "inception-v3-compat"
# torch-fidelity's own copy of the TF-FID Inception weights (feature_extractor_inceptionv3.py).
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
DIGITS_EXTRACTOR_NAME = "ddpm-digits-classifier"
_LABELS: dict[Features, str] = {"inception": "Inception-v3",  # one per modes.Features
                                "digits_classifier": "digits classifier"}


class MetricsError(RuntimeError):
    """A missing feature network or unusable inputs; the message names the file and the fix."""


def resolve_features(features: str, dataset: str) -> Features:
    """FidConfig.features ('auto' | 'inception' | 'digits_classifier', checked by the config)
    for a data set name."""
    if features == "auto":
        return "digits_classifier" if dataset == "digits" else "inception"
    return features  # type: ignore[return-value]


def metric_label(features: Features, metric: str = "FID") -> str:
    """Display name of a metric with its feature network, e.g. 'FID (digits classifier)'."""
    return f"{metric} ({_LABELS[features]})"


# ----------------------------------------------------------------------------- digits extractor


class DigitsFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity extractor: uint8 [B, C, H, W] -> ('features' [B, 64],) from the classifier."""

    def __init__(self, name: str, features_list: list[str], feature_extractor_weights_path: str,
                 **kwargs: object):
        super().__init__(name, features_list)
        try:  # the stages print a MetricsError as one line
            self.model = load_classifier(feature_extractor_weights_path)
        except ClassifierError as e:
            raise MetricsError(str(e)) from None

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("features",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        if metric not in ("fid", "kid", "prc"):
            raise MetricsError(f"{metric}: not defined for the digits classifier (Inception only)")
        return "features"

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        assert x.dtype == torch.uint8 and x.dim() == 4, f"expected uint8 [B,C,H,W], got {x.shape}"
        return (self.model.features(x.float() / 255.0),)


def _register_digits_extractor() -> None:
    # Registered once per process; the classifier file arrives as feature_extractor_weights_path.
    if DIGITS_EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:
        torch_fidelity.register_feature_extractor(DIGITS_EXTRACTOR_NAME, DigitsFeatureExtractor)


# ----------------------------------------------------------------------------- Inception weights


def resolve_inception_weights(path: str | Path | None = None) -> Path:
    """A local Inception weights file: `path`, else torch hub's cache (downloaded when online)."""
    if path is not None:
        path = Path(path)
        if path.is_file():
            return path
        raise MetricsError(f"{path}: Inception weights not found; download {INCEPTION_URL} "
                           f"({INCEPTION_FILE}) and put it at this path (fid.inception_weights)")
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if cached.is_file():
        return cached
    try:
        download_file(INCEPTION_URL, cached, timeout=60.0)
    except OSError as e:  # URLError, timeouts and DNS failures are OSErrors
        raise MetricsError(f"{cached}: Inception weights download failed ({e}); offline, download "
                           f"{INCEPTION_URL} elsewhere and put {INCEPTION_FILE} at {cached}, or "
                           "set fid.inception_weights to its path") from None
    return cached


# ----------------------------------------------------------------------------- reference statistics
# The pipeline extracts the reference set's features ONCE (the `features` stage) and scores every
# sample set against the stored statistics: the same numbers as torch-fidelity's
# calculate_metrics, which would re-extract the reference for every call (same functions, same
# seeds; tests/test_reference_stats.py compares).


FEATURE_BATCH = 256  # images per call of the feature network (torch-fidelity's default is 64)


@dataclass
class FeatureNet:
    """A torch-fidelity feature extractor with the layers FID/KID and IS read."""

    extractor: FeatureExtractorBase
    features: Features
    rgb: bool
    fid_layer: str
    isc_layer: str | None
    device: str


def feature_network(features: Features, *, classifier_path: str | Path | None = None,
                    inception_weights: str | Path | None = None,
                    device: str | None = None) -> FeatureNet:
    """The feature network of `features`: the digits classifier file `classifier_path` (read
    for digits_classifier only), or Inception-v3."""
    from torch_fidelity.utils import create_feature_extractor

    dev = str(device or default_device())
    cuda = dev.startswith("cuda")
    if features == "digits_classifier":
        if classifier_path is None:
            raise MetricsError("digits classifier features need classifier_path")
        _register_digits_extractor()
        ex = create_feature_extractor(DIGITS_EXTRACTOR_NAME, ["features"], cuda=cuda,
                                      feature_extractor_weights_path=str(classifier_path),
                                      verbose=False)
        return FeatureNet(ex, features, False, "features", None, dev)
    weights = str(resolve_inception_weights(inception_weights))  # features == "inception"
    ex = create_feature_extractor(INCEPTION_NAME, ["2048", "logits_unbiased"], cuda=cuda,
                                  feature_extractor_weights_path=weights, verbose=False)
    return FeatureNet(ex, features, True, "2048", "logits_unbiased", dev)


@torch.no_grad()
def extract_features(net: FeatureNet, images: np.ndarray, batch_size: int = FEATURE_BATCH,
                     on_batch: Callable[[int], None] | None = None) -> dict[str, Tensor]:
    """One pass of the feature network over uint8 [N, H, W, C]: {layer: float32 [N, D] (CPU)}.
    `on_batch(n)` is called after every batch of n images (progress)."""
    x = to_model_tensor(images)  # DataError for anything but uint8 [N, H, W, C]
    if net.rgb and x.shape[1] == 1:  # grey -> three equal channels for Inception
        x = x.expand(-1, 3, -1, -1).contiguous()
    out: dict[str, list[Tensor]] = {}
    for i in range(0, len(x), batch_size):
        # a fresh standard-strided batch as torch-fidelity's DataLoader makes (a grey [N, 1, H, W]
        # view of NHWC data also passes for channels_last, and convolutions then round differently)
        batch = torch.stack(list(x[i:i + batch_size])).to(net.device)
        feats = net.extractor.convert_features_tuple_to_dict(net.extractor(batch))
        for k, v in feats.items():
            out.setdefault(k, []).append(v.cpu())
        if on_batch is not None:
            on_batch(len(batch))
    return {k: torch.cat(v) for k, v in out.items()}


def features_pass(net: FeatureNet, images: np.ndarray, what: str, stage: str = "features",
                  units: UnitStore | None = None) -> dict[str, Tensor]:
    """One pass of the feature network over `images`, with progress (the line is printed so that
    the passes over the reference set can be counted); with `units` (ddpm_core.units), each
    batch of FEATURE_BATCH images is kept in the scratch area and a rerun reads it back."""
    print(f"{stage}: extracting {what} features of {len(images)} images", flush=True)
    settings = {"engine": "features", "net": net.extractor, "rgb": net.rgb,
                "images": images, "device": str(net.device)}
    with Progress(len(images), f"{stage}[{what}]", "images") as bar:
        return run_units(len(images), FEATURE_BATCH, lambda ids: extract_features(
            net, images[ids.start:ids.stop], on_batch=bar.update), store=units,
            settings=settings, note=lambda text, ids, reused: bar.skip(
                len(ids) if reused else 0, text))


@dataclass
class ReferenceStats:
    """FID statistics (mu [D], sigma [D, D]) and the features KID draws its subsets from."""

    features: Features
    mu: np.ndarray
    sigma: np.ndarray
    kid_features: Tensor  # float32 [N, D]


def reference_statistics(net: FeatureNet, feats: dict[str, Tensor]) -> ReferenceStats:
    """The statistics of extracted reference features (torch-fidelity's own estimators)."""
    f = feats[net.fid_layer]
    stats = fid_features_to_statistics(f)
    return ReferenceStats(net.features, stats["mu"], stats["sigma"], f)


def save_reference(ref: ReferenceStats, path: str | Path) -> None:
    """The statistics as one .npz, through the one atomic writer."""
    save_npz(path, features=np.array(ref.features), mu=ref.mu, sigma=ref.sigma,
             kid_features=ref.kid_features.numpy())


def load_reference(path: str | Path) -> ReferenceStats:
    """Statistics written by save_reference."""
    path = Path(path)
    if not path.is_file():
        raise MetricsError(f"{path}: reference statistics not found; run the features stage "
                           "(dvc repro features)")
    with np.load(path, allow_pickle=False) as z:
        return ReferenceStats(str(z["features"]), z["mu"], z["sigma"],  # type: ignore[arg-type]
                              torch.from_numpy(z["kid_features"]))


def metrics_against(net: FeatureNet, sample_feats: dict[str, Tensor], ref: ReferenceStats, *,
                    kid_subset_size: int = 100, kid_subsets: int = 100,
                    seed: int = 2020, kid: bool = True) -> dict[str, float]:
    """FID, KID (and IS for Inception) of extracted sample features against `ref`; equal to
    torch_fidelity.calculate_metrics with the same seed. kid=False: FID (and IS) only."""
    if ref.features != net.features:
        raise MetricsError(f"reference statistics are {ref.features} features, the samples "
                           f"{net.features}; run the features stage again")
    f = sample_feats[net.fid_layer]
    if len(f) < 2:
        raise MetricsError(f"need >= 2 images per set, got {len(f)}")
    fid = fid_statistics_to_metric(fid_features_to_statistics(f),
                                   {"mu": ref.mu, "sigma": ref.sigma}, verbose=False)
    out = {"fid": float(fid["frechet_inception_distance"])}
    if kid:
        size = min(kid_subset_size, len(f), len(ref.kid_features))
        k = kid_features_to_metric(f, ref.kid_features, kid_subsets=kid_subsets,
                                   kid_subset_size=size, rng_seed=seed, verbose=False)
        out["kid_mean"] = float(k["kernel_inception_distance_mean"])
        out["kid_std"] = float(k["kernel_inception_distance_std"])
    if net.isc_layer is not None and len(f) >= 10:
        isc = isc_features_to_metric(sample_feats[net.isc_layer], rng_seed=seed)
        out["isc_mean"] = float(isc["inception_score_mean"])
        out["isc_std"] = float(isc["inception_score_std"])
    return out
