"""FID/KID through torch-fidelity: the digits classifier's features, and Inception's wiring."""

from __future__ import annotations

import dataclasses
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch_fidelity.utils
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from ddpm_core import digits_classifier as dc
from ddpm_core import fid
from ddpm_core.config import DataConfig
from ddpm_core.data import DataError, prepare_splits
from ddpm_core.fid import MetricsError


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny networks on a shared CPU: one torch thread is several times faster than two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def score(samples: np.ndarray, reference: np.ndarray, features: fid.Features = "digits_classifier",
          *, classifier_path: Path | None = None, inception_weights: Path | None = None,
          fid_layer: str | None = None, **kw) -> dict[str, float]:
    """FID, KID (and IS) of samples against reference by the pipeline's path: the features
    stage's reference statistics, then the fid stage's metrics_against (fid_layer: read FID/KID
    from another layer of the network)."""
    net = fid.feature_network(features, classifier_path=classifier_path,
                              inception_weights=inception_weights)
    if fid_layer is not None:
        net = dataclasses.replace(net, fid_layer=fid_layer)
    ref = fid.reference_statistics(net, fid.extract_features(net, reference))
    return fid.metrics_against(net, fid.extract_features(net, samples), ref, **kw)


@pytest.fixture(scope="module")
def clf(tmp_path_factory):
    """The digits splits and a classifier trained once (8 epochs, ~3 s), saved to a file."""
    s = prepare_splits(DataConfig())
    model = dc.train_digits_classifier(s.train, s.train_labels, epochs=8, seed=0)
    path = tmp_path_factory.mktemp("fid") / "classifier.pt"
    dc.save_classifier(model, path)
    return s, model, path


def test_classifier_accuracy_on_digits_test_split(clf):
    s, model, _ = clf
    acc = dc.classifier_accuracy(model, s.test, s.test_labels)
    print(f"digits classifier test accuracy: {acc:.4f}")
    assert acc >= 0.90


def test_classifier_save_load_gives_the_same_features(clf, tmp_path):
    s, model, path = clf
    loaded = dc.load_classifier(path)
    x = torch.from_numpy(s.test[:50]).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        assert torch.equal(loaded.features(x), model.features(x))
    # Training features have unit RMS (the scale KID's polynomial kernel expects).
    xt = torch.from_numpy(s.train).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        assert abs(model.features(xt).pow(2).mean().item() - 1.0) < 1e-4
    (tmp_path / "bad.pt").write_bytes(path.read_bytes()[:100])
    with pytest.raises(dc.ClassifierError, match=r"bad\.pt: corrupt digits classifier"):
        dc.load_classifier(tmp_path / "bad.pt")
    # the fid and features stages print a MetricsError as one line (a ClassifierError was a
    # traceback there)
    with pytest.raises(MetricsError, match=r"bad\.pt: corrupt digits classifier \(\w+\);"):
        fid.feature_network("digits_classifier", classifier_path=tmp_path / "bad.pt")
    with pytest.raises(MetricsError, match=r"nope\.pt: digits classifier not found"):
        fid.feature_network("digits_classifier", classifier_path=tmp_path / "nope.pt")


def test_fid_floor_train_vs_test_far_below_noise_and_blank(clf):
    s, _, path = clf
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, s.test.shape, dtype=np.uint8)
    blank = np.zeros_like(s.test)
    m = {name: score(x, s.train, classifier_path=path, kid_subsets=20)
         for name, x in [("test", s.test), ("noise", noise), ("blank", blank)]}
    print({k: round(v["fid"], 4) for k, v in m.items()}, fid.metric_label("digits_classifier"))
    assert set(m["test"]) == {"fid", "kid_mean", "kid_std"}  # no IS without Inception
    assert 0 < m["test"]["fid"] < 1.0
    assert m["noise"]["fid"] > 20 * m["test"]["fid"]
    assert m["blank"]["fid"] > 20 * m["test"]["fid"]
    assert m["noise"]["kid_mean"] > 10 * max(abs(m["test"]["kid_mean"]), m["test"]["kid_std"])


def test_fid_of_a_set_against_itself_is_zero(clf):
    s, _, path = clf
    m = score(s.test, s.test, classifier_path=path, kid_subsets=5)
    assert abs(m["fid"]) < 1e-3


# Dead ReLU units give zero-variance features, so S1 S2 is singular; its square root exists.
@pytest.mark.filterwarnings("ignore:Matrix is singular:scipy.linalg.LinAlgWarning")
def test_fid_matches_frechet_distance_with_scipy_sqrtm(clf):
    # Heusel et al. 2017: ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), features from our net.
    s, model, path = clf
    samples, reference = s.test[:200], s.train
    with torch.no_grad():
        f1, f2 = (model.features(torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255)
                  .double().numpy() for a in (samples, reference))
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    expected = float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))
    got = score(samples, reference, classifier_path=path, kid_subsets=5)["fid"]
    assert got == pytest.approx(expected, rel=1e-3)


def test_kid_subset_size_is_capped_at_the_sample_count(clf):
    s, _, path = clf
    m = score(s.test[:12], s.train, classifier_path=path, kid_subset_size=100, kid_subsets=5)
    assert np.isfinite(m["kid_mean"]) and np.isfinite(m["kid_std"]) and m["kid_std"] > 0
    with pytest.raises(DataError, match="images: expected uint8"):
        score(s.test.astype(np.float32), s.train, classifier_path=path)


def test_labels_name_the_feature_network():
    assert fid.metric_label("digits_classifier") == "FID (digits classifier)"
    assert fid.metric_label("inception", "KID") == "KID (Inception-v3)"
    assert fid.resolve_features("auto", "digits") == "digits_classifier"
    assert fid.resolve_features("auto", "cifar10") == "inception"
    assert fid.resolve_features("inception", "digits") == "inception"


def test_missing_inception_weights_offline_is_a_clear_error(tmp_path, monkeypatch):
    def no_fidelity(*args, **kwargs):
        raise AssertionError("torch-fidelity must not be called without weights")

    def offline(url: str, dest: Path, timeout: float = 60.0) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch_fidelity.utils, "create_feature_extractor", no_fidelity)
    missing = tmp_path / "weights" / fid.INCEPTION_FILE
    with pytest.raises(MetricsError) as e:
        fid.feature_network("inception", inception_weights=missing)
    assert str(missing) in str(e.value) and fid.INCEPTION_URL in str(e.value)
    # No path given: torch hub's cache is tried, then a download, which fails offline.
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(fid, "download_file", offline)
    with pytest.raises(MetricsError) as e:
        fid.feature_network("inception")
    msg = str(e.value)
    assert str(tmp_path / "hub" / "checkpoints" / fid.INCEPTION_FILE) in msg
    assert "download failed" in msg and fid.INCEPTION_URL in msg
    assert "fid.inception_weights" in msg and "\n" not in msg


def test_inception_path_runs_torch_fidelity_with_local_weights(tmp_path, monkeypatch):
    # Random Inception weights in the real file format: the wiring (grey -> RGB, the local
    # weights path, IS only here) is tested; the numbers themselves mean nothing. Inception's
    # input size is cut from 299 to 75 (its minimum) and FID/KID read the 64-d block instead of
    # the 2048-d pool (whose 2048x2048 eigvals alone take ~10 s) so that this runs in seconds.
    monkeypatch.setattr(FeatureExtractorInceptionV3, "INPUT_IMAGE_SIZE", 75)
    create = torch_fidelity.utils.create_feature_extractor
    monkeypatch.setattr(torch_fidelity.utils, "create_feature_extractor",
                        lambda name, layers, **kw: create(name, [*layers, "64"], **kw))
    with monkeypatch.context() as m:
        torch.save({}, tmp_path / "empty.pth")
        m.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                          feature_extractor_weights_path=tmp_path / "empty.pth")
    weights = tmp_path / fid.INCEPTION_FILE
    torch.save(net.state_dict(), weights)
    x = np.random.default_rng(0).integers(0, 256, (10, 8, 8, 1), dtype=np.uint8)
    out = score(x, x[::-1].copy(), "inception", inception_weights=weights, fid_layer="64",
                kid_subsets=2)
    assert set(out) == {"fid", "kid_mean", "kid_std", "isc_mean", "isc_std"}
    assert all(np.isfinite(v) for v in out.values())


def test_features_in_units_resume_with_the_same_features(clf, tmp_path):
    """Feature extraction in units (issue 18 §1): a pass stopped after its first unit of
    FEATURE_BATCH images resumes with the rest only, and gives one pass's features."""
    from ddpm_core.units import UnitStore

    s, _, path = clf
    net = fid.feature_network("digits_classifier", classifier_path=path)
    images = s.train[:600]  # units of 256, 256, 88
    whole = fid.extract_features(net, images)
    store = UnitStore(tmp_path)
    calls = [0]

    def stop_at_second(module, args):
        calls[0] += 1
        if calls[0] == 2:
            raise KeyboardInterrupt("killed")

    handle = net.extractor.register_forward_pre_hook(stop_at_second)
    with pytest.raises(KeyboardInterrupt):
        fid.features_pass(net, images, "reference", units=store)
    handle.remove()
    again = UnitStore(tmp_path)
    out = fid.features_pass(net, images, "reference", units=again)
    assert out.keys() == whole.keys()
    assert all(torch.equal(out[k], whole[k]) for k in whole)
    assert (again.opened[0].reused, again.opened[0].computed) == (1, 2)
