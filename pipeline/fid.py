"""Stage `fid`: FID and KID (IS for Inception) of every sample set against the training split.

The feature network follows fid.features: Inception-v3 for natural images; for the digits data
set a small classifier trained here on the digits training split (torch-fidelity custom
extractor), so its numbers are labelled "FID (digits classifier)" and are not comparable with
Inception FIDs. The test split against the training split gives the floor: what a perfect model
with this many samples would score. Writes metrics/fid.json, fid/details.json (KID, IS,
classifier accuracy) and fid/classifier.pt (digits only).
"""

from __future__ import annotations

import time

import numpy as np

from ddpm_core.config import Params
from ddpm_core.data import load_images, load_labels
from ddpm_core.digits_classifier import (
    classifier_accuracy,
    save_classifier,
    train_digits_classifier,
)
from ddpm_core.fid import compute_metrics, metric_label, resolve_features
from pipeline.common import (
    DATA_DIR,
    FID_DIR,
    METRICS_DIR,
    SAMPLES_DIR,
    StageError,
    atomic_dir,
    read_json,
    run_stage,
    write_json,
)


def metric_key(features: str) -> str:
    """Top-level key of metrics/fid.json: names the feature network (fid_digits_classifier)."""
    return f"fid_{features}"


def main(params: Params) -> None:
    f = params.fid
    info = read_json(DATA_DIR / "info.json")
    features = resolve_features(f.features, info["dataset"])
    train = load_images(DATA_DIR / "train.npy")
    test = load_images(DATA_DIR / "test.npy")
    index = read_json(SAMPLES_DIR / "index.json")
    label = metric_label(features)
    details: dict = {"features": features, "label": label, "reference": "train split",
                     "reference_images": int(len(train))}
    with atomic_dir(FID_DIR) as tmp:
        kw: dict = {"kid_subset_size": f.kid_subset_size}
        if features == "digits_classifier":
            labels_path = DATA_DIR / "train_labels.npy"
            if not labels_path.is_file():
                raise StageError(f"{labels_path}: the digits classifier needs labels; set "
                                 "fid.features: inception for unlabelled data")
            t0 = time.perf_counter()
            clf = train_digits_classifier(train, load_labels(labels_path), f.classifier_epochs,
                                          f.classifier_seed)
            save_classifier(clf, tmp / "classifier.pt")
            kw["classifier_path"] = tmp / "classifier.pt"
            test_labels = DATA_DIR / "test_labels.npy"
            if test_labels.is_file():
                details["classifier_test_accuracy"] = round(
                    classifier_accuracy(clf, test, load_labels(test_labels)), 4)
            details["classifier_seconds"] = round(time.perf_counter() - t0, 2)
        else:
            kw["inception_weights"] = f.inception_weights
        floor = compute_metrics(test, train, features, **kw)
        details["floor"] = {"what": "test split vs train split", "images": int(len(test)),
                            **floor}
        print(f"fid: floor (test vs train, {len(test)} images): {label} {floor['fid']:.3f}",
              flush=True)
        metrics: dict = {"floor_test_vs_train": round(floor["fid"], 5)}
        details["models"] = {}
        for name, entry in index.items():
            metrics[name], details["models"][name] = {}, {}
            for sampler in entry["samplers"]:
                samples = np.load(SAMPLES_DIR / name / f"{sampler}.npy", allow_pickle=False)
                r = compute_metrics(samples, train, features, **kw)
                metrics[name][sampler] = round(r["fid"], 5)
                details["models"][name][sampler] = {"images": int(len(samples)), **r}
                print(f"fid[{name}] {sampler}: {label} {r['fid']:.3f} "
                      f"(KID {r['kid_mean']:.4f})", flush=True)
        write_json(details, tmp / "details.json")
    write_json({metric_key(features): metrics}, METRICS_DIR / "fid.json")


if __name__ == "__main__":
    run_stage(main)
