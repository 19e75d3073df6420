"""What a user comparing runs finds in MLflow, checked through MlflowClient (the REST API's
calls) on the store a real tiny `dvc repro` filled: the parent carries every variant's results
as `<variant>.<metric>` with the values of metrics/, each variant run its params in effect, the
data set with DVC's hash as digest, its training time and its model file, which downloads and
loads with ddpm_core.load_model to the same network as the original."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import DVC, pipeline_env, pipeline_repo, sh, tiny_params

import ddpm_core
from pipeline.params import params_from_dict

VARIANTS = ("simple", "vlb")


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """(root, env, MlflowClient, experiment, runs by level) after a tiny `dvc repro`."""
    from mlflow.tracking import MlflowClient

    p = tiny_params()
    assert tuple(p["variants"]) == VARIANTS
    env = pipeline_env()
    root = pipeline_repo(tmp_path_factory.mktemp("mlflow_view"), p, env)
    sh([DVC, "repro"], root, env)
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    exp = client.get_experiment_by_name("ddpm")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    by_level: dict[str, list] = {}
    for r in runs:
        by_level.setdefault(r.data.tags["ddpm.level"], []).append(r)
    return root, env, client, exp, by_level


def _variant(by_level: dict, name: str):
    return next(r for r in by_level["variant"] if r.info.run_name == name)


def _results(root: Path, kind: str, name: str) -> dict:
    return json.loads((root / "metrics" / kind / f"{name}.json").read_text())[name]


@pytest.mark.slow
def test_experiment_and_source_tags(done):
    root, env, _, exp, by_level = done
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    (parent,) = by_level["parent"]
    head = sh(["git", "rev-parse", "HEAD"], root, env).stdout.strip()
    for run in (parent, *by_level["variant"]):
        assert run.data.tags["mlflow.source.git.commit"] == head
        assert run.data.tags["mlflow.source.name"].startswith("dvc repro")


@pytest.mark.slow
def test_parent_carries_every_variants_metrics_as_variant_dot_metric(done):
    root, _, _, _, by_level = done
    (parent,) = by_level["parent"]
    expected = {f"{v}.{k}": x for v in VARIANTS for kind in ("train", "bpd", "nll", "fid")
                for k, x in _results(root, kind, v).items()}
    assert {"simple.bpd_sigma2_beta", "vlb.fid_ancestral_beta", "simple.bpd_sigma2_beta_tilde_K5",
            "vlb.final_loss"} <= set(expected)
    logged = {k: x for k, x in parent.data.metrics.items() if k.split(".")[0] in VARIANTS}
    assert logged == expected  # every metric of metrics/, the same values, nothing else


@pytest.mark.slow
def test_variant_runs_log_the_params_in_effect(done):
    _, _, _, _, by_level = done
    p = tiny_params()
    for name in VARIANTS:
        params = _variant(by_level, name).data.params
        assert params["variant"] == name and params["loss"] == p["variants"][name]["loss"]
        assert float(params["train.lr"]) == p["train"]["lr"]
        assert int(params["train.steps"]) == p["train"]["steps"]
        assert p["train"]["hflip"] == "auto" and params["train.hflip"] == "False"  # digits
        assert params["schedule"] == p["schedule"] and params["diffusion.timesteps"] == "10"
        # the network the model file holds: the preset resolved
        assert params["net.base_channels"] == "8" and params["net.channel_mult"] == "[1]"


def test_params_of_imported_weights_leave_out_training_and_the_config_network():
    from pipeline.track import variant_params

    p = params_from_dict({"variants": {"ours": {"pretrained": "elsewhere.pt"}}})
    got = variant_params(p, "ours")
    assert got["pretrained"] == "elsewhere.pt" and got["variant"] == "ours"
    assert not [k for k in got if k.startswith(("train.", "model.", "variants.", "mlflow."))]
    assert got["sample.use_ema"] == "True" and got["data.dataset"] == "digits"
    trained = variant_params(params_from_dict({}), "simple")
    assert trained["train.lr"] == str(params_from_dict({}).train.lr)
    assert "vlb" not in {k.split(".")[0] for k in trained}  # no other variant's settings


@pytest.mark.slow
def test_variant_runs_take_the_data_set_with_the_dvc_hash_as_digest(done):
    root, _, _, _, by_level = done
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]["prepare"]
    (out,) = [o for o in lock["outs"] if o["path"] == "data/prepared"]
    for run in (_variant(by_level, v) for v in VARIANTS):
        inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
        assert set(inputs) == {"digits-train", "digits-test"}
        for split, context in (("train", "training"), ("test", "evaluation")):
            d = inputs[f"digits-{split}"]
            assert d.dataset.digest == out["md5"]
            assert {t.key: t.value for t in d.tags}["mlflow.data.context"] == context
            shape = np.load(root / "data" / "prepared" / f"{split}.npy").shape
            assert json.loads(d.dataset.profile)["features_shape"] == list(shape)


@pytest.mark.slow
def test_variant_runs_span_their_training_time(done):
    root, _, _, _, by_level = done
    for name in VARIANTS:
        run = _variant(by_level, name)
        seconds = json.loads((root / "timings" / "train" / f"{name}.json").read_text())["seconds"]
        assert seconds > 0 and run.data.metrics["train_seconds"] == seconds
        assert abs((run.info.end_time - run.info.start_time) - seconds * 1000) <= 1


@pytest.mark.slow
def test_model_artifact_downloads_and_loads_to_the_same_network(done, tmp_path):
    import mlflow.artifacts

    root, _, client, _, by_level = done
    for name in VARIANTS:
        run = _variant(by_level, name)
        uri = run.data.tags["ddpm.model_uri"]
        assert uri == f"runs:/{run.info.run_id}/model/{name}.pt"
        assert [a.path for a in client.list_artifacts(run.info.run_id, "model")] == [
            f"model/{name}.pt"]
        got = Path(mlflow.artifacts.download_artifacts(
            artifact_uri=uri, dst_path=str(tmp_path / name),
            tracking_uri=f"sqlite:///{root}/mlflow.db"))
        original = root / "models" / f"{name}.pt"
        assert got.read_bytes() == original.read_bytes()
        net, diff = ddpm_core.load_model(got)
        ref_net, ref_diff = ddpm_core.load_model(original)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(3, 1, 8, 8, generator=g)
        t = torch.tensor([0, 4, 9])
        with torch.no_grad():
            assert torch.equal(net(x, t), ref_net(x, t))
        assert torch.equal(diff.betas, ref_diff.betas) and diff.T == 10


@pytest.mark.slow
def test_tracking_again_logs_nothing_new(done):
    root, env, client, exp, by_level = done
    before = {r.info.run_id for level in by_level.values() for r in level}
    r = sh([sys.executable, "-m", "pipeline.track"], root, {**env, "PYTHONPATH": str(root)})
    assert "already logged" in r.stdout
    after = {x.info.run_id for x in client.search_runs([exp.experiment_id], max_results=1000)}
    assert after == before
