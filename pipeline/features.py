"""Stage `features`: the feature network and the reference statistics, computed ONCE per data
set and feature network; every fid@<variant> stage scores its samples against them.

The feature network follows fid.features: Inception-v3 for natural images; for the digits data
set a small classifier trained here on the digits training split, so its numbers are labelled
"FID (digits classifier)" and are not comparable with Inception FIDs. One pass over the training
split gives the reference statistics (mu, sigma and the features KID draws from); one pass over
the test split gives the floor: the test split's FID against the training split, what a perfect
model with this many images would score. Writes features/ (reference.npz, classifier.pt,
info.json), metrics/features.json and timings/features.json.
"""

from __future__ import annotations

import time

from ddpm_core.data import load_images, load_labels
from ddpm_core.digits_classifier import (
    classifier_accuracy,
    save_classifier,
    train_digits_classifier,
)
from ddpm_core.fid import (
    feature_network,
    features_pass,
    metric_label,
    metrics_against,
    reference_statistics,
    resolve_features,
    save_reference,
)
from pipeline.common import StageError, atomic_dir, finish_units, run_stage, unit_store, write_json
from pipeline.params import Params
from pipeline.records import (
    CLASSIFIER_FILE,
    DATA_DIR,
    FEATURES_DIR,
    FEATURES_INFO,
    FEATURES_METRICS,
    FEATURES_TIMINGS,
    FLOOR_FID,
    REFERENCE_FILE,
    read_json,
)


def main(params: Params) -> None:
    f = params.fid
    info = read_json(DATA_DIR / "info.json")
    features = resolve_features(f.features, info["dataset"])
    train = load_images(DATA_DIR / "train.npy")
    test = load_images(DATA_DIR / "test.npy")
    label = metric_label(features)
    out: dict = {"features": features, "label": label, "reference": "train split",
                 "reference_images": int(len(train)), "floor_images": int(len(test))}
    timings: dict = {}
    units = unit_store(None)
    with atomic_dir(FEATURES_DIR) as tmp:
        if features == "digits_classifier":
            labels_path = DATA_DIR / "train_labels.npy"
            if not labels_path.is_file():
                raise StageError(f"{labels_path}: the digits classifier needs labels; set "
                                 "fid.features: inception for unlabelled data")
            t0 = time.perf_counter()
            clf = train_digits_classifier(train, load_labels(labels_path), f.classifier_epochs,
                                          f.classifier_seed)
            save_classifier(clf, tmp / CLASSIFIER_FILE.name)
            test_labels = DATA_DIR / "test_labels.npy"
            if test_labels.is_file():
                out["classifier_test_accuracy"] = round(
                    classifier_accuracy(clf, test, load_labels(test_labels)), 4)
            timings["classifier_seconds"] = round(time.perf_counter() - t0, 2)
        net = feature_network(features, classifier_path=tmp / CLASSIFIER_FILE.name,
                              inception_weights=f.inception_weights)
        t0 = time.perf_counter()
        ref = reference_statistics(net, features_pass(net, train, "reference", units=units))
        timings["reference_seconds"] = round(time.perf_counter() - t0, 2)
        save_reference(ref, tmp / REFERENCE_FILE.name)
        # FID only: the stage must not depend on fid.kid_subset_size (one reference pass per
        # data set and feature network, whatever the KID settings)
        floor = metrics_against(net, features_pass(net, test, "floor", units=units), ref,
                                kid=False)
        out["floor"] = floor
        write_json(out, tmp / FEATURES_INFO.name)
    metrics = {FLOOR_FID: round(floor["fid"], 5)}
    if "classifier_test_accuracy" in out:
        metrics["classifier_test_accuracy"] = out["classifier_test_accuracy"]
    write_json(metrics, FEATURES_METRICS)
    write_json(timings, FEATURES_TIMINGS)
    finish_units(units, True, "features")
    print(f"features: {label}; floor (test vs train, {len(test)} images) {floor['fid']:.3f}",
          flush=True)


if __name__ == "__main__":
    run_stage(main)
