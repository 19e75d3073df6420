"""End to end: the real pipeline (real DVC in a temporary git repo, real MLflow store, real
torch-fidelity) at tiny settings. Covers `dvc repro` with the foreach layout (one stage per
variant), the reference statistics computed in one pass, an idempotent re-run, what a params
change invalidates, `dvc exp run -S schedule=cosine` then back to linear restored from DVC's run
cache (no train, sample or bpd runs; MLflow not duplicated), a third variant running only its own
stages, and evaluating pretrained weights without training.

What a user comparing runs finds in MLflow, checked through MlflowClient (the REST API's calls)
on the store the first `dvc repro` filled: the parent carries every variant's results as
`<variant>.<metric>` with the values of metrics/, each variant run its params in effect, the
data set with DVC's hash as digest, its training time and its model file, which downloads and
loads with ddpm_core.load_model to the same network as the original."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import DVC, pipeline_env, pipeline_repo, sh, tiny_params

import ddpm_core
from pipeline.params import params_from_dict

pytestmark = pytest.mark.slow  # subprocess pipelines (README, Tests)

VARIANTS = ("simple", "vlb")
VARIANT_STAGES = ("train", "gamma", "nnhead", "sample", "bpd", "nll", "fid")
def e2e_params() -> dict:
    p = tiny_params()
    assert list(p["variants"]) == ["simple", "vlb"]  # L_simple and L_vlb (fixed Σ)
    return p


def ran(out: str) -> set[str]:
    """Stages `dvc repro` / `dvc exp run` ran (not skipped, not restored from the run cache)."""
    return {ln.split("'")[1] for ln in out.splitlines() if ln.startswith("Running stage '")}


def changed(status: str) -> set[str]:
    """Stages `dvc status` lists (its unindented `<stage>:` lines)."""
    return {ln[:-1] for ln in status.splitlines()
            if ln.endswith(":") and ln[:1].strip() and not ln.startswith("\t")}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    # the venv is NOT on PATH: `.venv/bin/dvc repro` must work without activating it
    env = pipeline_env()
    root = pipeline_repo(tmp_path_factory.mktemp("e2e"), e2e_params(), env)
    first = sh([DVC, "repro"], root, env)
    return root, env, first


def runs(root: Path) -> list:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{root}/mlflow.db")
    return c.search_runs([c.get_experiment_by_name("ddpm").experiment_id], max_results=1000)


def test_repro_writes_every_output(repo):
    root, _, first = repo
    p = e2e_params()
    T, n = p["diffusion"]["timesteps"], p["sample"]["num_samples"]
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert set(lock) == {"prepare", "features", "report", "track"} | {
        f"{s}@{v}" for s in VARIANT_STAGES for v in ("simple", "vlb")}
    # the reference statistics: ONE pass over the training split for the whole run
    out = first.stdout
    assert out.count("features: extracting reference features") == 1, out
    assert out.count("features: extracting floor features") == 1
    expected = {"ancestral_beta", "ancestral_beta_tilde", "ancestral_analytic",
                "respaced_beta_S2", "respaced_beta_tilde_S2", "respaced_analytic_S2", "ddim_S2",
                "ddim_analytic_S2"}
    for name in ("simple", "vlb"):
        index = json.loads((root / "samples" / name / "index.json").read_text())
        assert {d["name"] for d in index["samplers"]} == expected
        # σ of the step to x_τ1 capped (y = sample.last_sigma_cap_y) on the S = 2 < T chains
        # and DDIM, not on the full chains
        y = p["sample"]["last_sigma_cap_y"]
        assert y == 1
        caps = {d["name"]: (d["last_sigma_cap_y"], d["last_sigma_cap"]) for d in index["samplers"]}
        assert all(caps[s] == ((None, None) if s.startswith("ancestral") else
                               (y, pytest.approx(2 * y / 255 * (np.pi / 2) ** 0.5)))
                   for s in expected), caps
        assert all(d["spacing"] == p["sample"]["spacing"] for d in index["samplers"]
                   if d["kind"] != "ancestral")
        # the prior mismatch KL(q(x_start|x_0) ‖ N(0, I)) of each sampler's start index
        assert p["sample"]["spacing"] == "trailing"  # every chain starts at index T - 1
        kls = {d["prior_kl_bpd"] for d in index["samplers"]}
        assert {d["start_index"] for d in index["samplers"]} == {T - 1} and len(kls) == 1
        assert 0 <= kls.pop() < float("inf")
        for s in expected:
            x = np.load(root / "samples" / name / f"{s}.npy")
            assert x.dtype == np.uint8 and x.shape == (n, 8, 8, 1)
            assert (root / "grids" / name / f"{s}.png").stat().st_size > 0
        # bits/dim: totals are the sum of the saved per-term breakdown (L_T + ... + L_0)
        bpd = json.loads((root / "metrics" / "bpd" / f"{name}.json").read_text())[name]
        lines = (root / "bpd" / f"{name}.csv").read_text().splitlines()
        header, rows = lines[0].split(","), [ln.split(",") for ln in lines[1:]]
        assert header[:2] == ["term", "t"] and len(rows) == T + 1
        assert rows[0][0] == "L_T" and rows[-1][0] == "L_0"
        assert header[2:] == ["sigma2_beta", "sigma2_beta_tilde", "sigma2_analytic",
                              "sigma2_npr", "sigma2_sn"]
        for col, key in ((2, "bpd_sigma2_beta"), (3, "bpd_sigma2_beta_tilde"),
                         (4, "bpd_sigma2_analytic"), (5, "bpd_sigma2_npr"), (6, "bpd_sigma2_sn")):
            total = sum(float(r[col]) for r in rows)
            assert abs(total - bpd[key]) < 1e-3 * max(1.0, total)
        # K-step chains: every σ² at every K of bpd.steps and T; K = T is the full chain
        Ks = sorted(set(p["bpd"]["steps"]) | {T})
        for key in ("bpd_sigma2_beta", "bpd_sigma2_beta_tilde", "bpd_sigma2_analytic",
                    "bpd_sigma2_npr", "bpd_sigma2_sn"):
            assert bpd[f"{key}_K{T}"] == bpd[key]
            assert all(np.isfinite(bpd[f"{key}_K{K}"]) for K in Ks)
        steps_csv = (root / "plots" / "bpd_steps" / f"{name}.csv").read_text().splitlines()
        assert steps_csv[0] == ("K,sigma2_beta,sigma2_beta_tilde,sigma2_analytic,sigma2_npr,"
                                "sigma2_sn")
        assert json.loads((root / "heads" / name / "info.json").read_text())["heads"] == \
            "heads.pt"
        assert [int(ln.split(",")[0]) for ln in steps_csv[1:]] == Ks
        gamma = json.loads((root / "gamma" / f"{name}.json").read_text())
        assert gamma["T"] == T and len(gamma["gamma"]) == T
        assert all(g >= 0 for g in gamma["gamma"])
        fid = json.loads((root / "metrics" / "fid" / f"{name}.json").read_text())[name]
        assert set(fid) == {f"fid_{s}" for s in expected}
        assert all(np.isfinite(v) for v in fid.values())
        # metrics files hold metrics only; timings live apart
        assert set(json.loads((root / "metrics" / "train" / f"{name}.json").read_text())[name]) \
            == {"final_loss"}
        assert json.loads((root / "timings" / "train" / f"{name}.json").read_text())["seconds"] > 0
    floor = json.loads((root / "metrics" / "features.json").read_text())
    assert floor["floor_fid"] >= 0
    loss = (root / "plots" / "loss" / "simple.csv").read_text().splitlines()
    assert loss[0].startswith("step,loss") and len(loss) == 1 + p["train"]["steps"]
    assert (root / "reports" / "report.html").read_text().count("data:image/png;base64,") >= 4
    assert "FID (digits classifier)" in (root / "reports" / "report.md").read_text()
    # MLflow: one parent, one nested run per variant with its metrics and loss history
    rs = runs(root)
    parents = [r for r in rs if r.data.tags["ddpm.level"] == "parent"]
    variants = {r.info.run_name: r for r in rs if r.data.tags["ddpm.level"] == "variant"}
    assert len(parents) == 1 and set(variants) == {"simple", "vlb"}
    assert parents[0].data.tags["git.revision"] != "unknown"
    assert parents[0].data.params["train.hflip"] == "False"  # what training used for digits
    m = variants["simple"].data.metrics
    bpd = json.loads((root / "metrics" / "bpd" / "simple.json").read_text())["simple"]
    fid = json.loads((root / "metrics" / "fid" / "simple.json").read_text())["simple"]
    assert m["bpd_sigma2_beta"] == bpd["bpd_sigma2_beta"]
    for key in ("bpd_sigma2_beta_K5", "bpd_sigma2_beta_tilde_K5", "bpd_sigma2_analytic_K5"):
        assert m[key] == bpd[key]  # every σ² × K is a metric of the variant run
    assert m["fid_ancestral_beta"] == fid["fid_ancestral_beta"]
    # the exact likelihood (nll@<v>): on the variant run and, named <v>.<key>, on the parent
    for name in ("simple", "vlb"):
        nll = json.loads((root / "metrics" / "nll" / f"{name}.json").read_text())[name]
        assert set(nll) == {"nll_ode_bpd", "nll_ode_bpd_se", "nll_nfe_mean",
                            "nll_ode_vardeq_bpd", "nll_ode_vardeq_bpd_se", "nll_vardeq_nfe_mean"}
        assert np.isfinite(nll["nll_ode_bpd"]) and nll["nll_nfe_mean"] > 0
        assert variants[name].data.metrics["nll_ode_bpd"] == nll["nll_ode_bpd"]
        assert parents[0].data.metrics[f"{name}.nll_ode_bpd"] == nll["nll_ode_bpd"]
    assert "The bound beside the exact likelihood" in (root / "reports" / "report.md").read_text()
    assert "final_loss" in m and "loss" in m
    # dvc plots: titled plots from the top-level section, the grids as images
    shown = json.loads(sh([DVC, "plots", "show", "--json"], root, repo[1]).stdout)
    assert not shown.get("errors"), shown.get("errors")
    kinds = {k: v[0]["type"] for k, v in shown["data"].items()}
    assert kinds["grids/simple/ancestral_beta.png"] == "image"
    for f in ("plots/loss/simple.csv", "bpd/vlb.csv", "plots/fid_steps/simple.csv",
              "plots/bpd_steps/simple.csv"):
        assert kinds[f] == "vega" and shown["data"][f][0]["content"]["title"]["text"]


# ---- what a user comparing runs finds in MLflow after the first `dvc repro` (before the
# reruns below change the store): checked through MlflowClient (the REST API's calls)

@pytest.fixture(scope="module")
def done(repo):
    """(root, env, MlflowClient, experiment, runs by level) of the first `dvc repro`."""
    from mlflow.tracking import MlflowClient

    root, env, _ = repo
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


# ---- reruns, params changes, experiments

def test_rerun_and_params_changes_rerun_only_what_changed(repo):
    root, env, _ = repo
    before = {r.info.run_id for r in runs(root)}
    again = sh([DVC, "repro"], root, env)
    assert ran(again.stdout) == {"track"}
    assert "already logged" in again.stdout
    assert {r.info.run_id for r in runs(root)} == before
    p = yaml.safe_load((root / "params.yaml").read_text())
    # a sampling parameter re-runs sampling (and what reads it), never training nor the bound
    p["sample"]["steps"] = [2, 5]
    (root / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    st = sh([DVC, "status"], root, env).stdout
    assert changed(st) == {"sample@simple", "sample@vlb", "track"}, st
    # KID settings re-score the samples; the reference statistics stay (one pass per data set)
    p["sample"]["steps"] = [2]
    p["fid"]["kid_subset_size"] = 3
    (root / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    st = sh([DVC, "status"], root, env).stdout
    assert changed(st) == {"fid@simple", "fid@vlb", "track"}, st
    # one variant's settings invalidate only that variant's stages
    p["fid"]["kid_subset_size"] = 4
    p["variants"]["vlb"]["t_sampling"] = "importance"
    (root / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    st = sh([DVC, "status"], root, env).stdout
    assert changed(st) == {"train@vlb", "report", "track"}, st
    sh(["git", "checkout", "-q", "--", "params.yaml"], root, env)


def test_exp_run_cosine_then_linear_restores_from_the_run_cache(repo):
    root, env, _ = repo
    sh(["git", "add", "-A"], root, env)
    sh(["git", "commit", "-qm", "baseline results"], root, env)
    cos = sh([DVC, "exp", "run", "-S", "schedule=cosine", "-n", "cosine"], root, env)
    assert {"train@simple", "sample@vlb", "bpd@simple"} <= ran(cos.stdout)
    assert "features" not in ran(cos.stdout)  # the reference statistics do not depend on it
    back = sh([DVC, "exp", "run", "-S", "schedule=linear", "-n", "linear"], root, env)
    assert ran(back.stdout) == {"track"}, back.stdout  # all else restored from the run cache
    assert "Stage 'train@simple' is cached - skipping run" in back.stdout
    assert "already logged" in back.stdout
    shown = json.loads(sh([DVC, "exp", "show", "--json"], root, env).stdout)
    found = {}

    def walk(node):
        if isinstance(node, dict):
            data = node.get("data") if isinstance(node.get("data"), dict) else None
            if data and "params" in data and "metrics" in data:
                sched = data["params"]["params.yaml"]["data"]["schedule"]
                bpd = data["metrics"].get("metrics/bpd/simple.json", {}).get("data", {})
                if bpd:
                    found[(node.get("name") or data.get("name") or data.get("rev"), sched)] = bpd
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(shown)
    assert {s for _, s in found} == {"linear", "cosine"}, found.keys()
    # the README's comparison command fits a terminal
    readme = (root / "README.md").read_text()
    cmd = next(ln.strip() for ln in readme.splitlines()
               if ln.strip().startswith(".venv/bin/dvc exp show --only-changed"))
    table = subprocess.run(cmd.replace(".venv/bin/dvc", DVC) + " --no-pager", shell=True,
                           cwd=root, env={**env, "COLUMNS": "400"}, capture_output=True,
                           text=True, timeout=300)
    assert table.returncode == 0, table.stderr
    widths = [len(ln.rstrip()) for ln in table.stdout.splitlines()]
    assert widths and max(widths) < 160, table.stdout
    assert "cosine" in table.stdout and "simple.bpd_sigma2_beta" in table.stdout
    # MLflow: linear and cosine once each (the linear results were logged by the first repro)
    rs = runs(root)
    variants = [r for r in rs if r.data.tags["ddpm.level"] == "variant"]
    assert sorted((r.info.run_name, r.data.params["schedule"]) for r in variants) == [
        ("simple", "cosine"), ("simple", "linear"), ("vlb", "cosine"), ("vlb", "linear")]
    cos_run = next(r for r in rs if r.data.tags["ddpm.level"] == "parent"
                   and r.data.tags["schedule"] == "cosine")
    assert cos_run.data.tags["dvc.exp_name"] == "cosine"


def test_a_third_variant_runs_only_its_own_stages(repo):
    root, env, _ = repo
    sh(["git", "checkout", "-q", "--", "params.yaml"], root, env)
    sh([DVC, "checkout", "-q"], root, env)
    p = yaml.safe_load((root / "params.yaml").read_text())
    p["variants"]["x0"] = {"mean_type": "x0", "var_type": "fixed_large", "loss": "simple"}
    (root / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    out = sh([DVC, "repro"], root, env).stdout
    assert ran(out) == {f"{s}@x0" for s in VARIANT_STAGES} | {"report", "track"}, out
    assert "extracting reference features" not in out
    assert "x0" in (root / "reports" / "report.md").read_text()


def test_pretrained_weights_are_evaluated_without_training(repo):
    import torch

    from ddpm_core.modelfile import load_model_file
    from ddpm_core.schedules import make_betas

    root, env, _ = repo
    p = yaml.safe_load((root / "params.yaml").read_text())
    # a checkpoint of these params' schedule (an experiment of this module may have trained
    # another one beside it: importing that one is refused, tests/test_engine.py)
    want = make_betas(p["schedule"], p["diffusion"]["timesteps"])
    ckpts = [c for c in sorted((root / "checkpoints" / "simple").rglob("ckpt_*.pt"))
             if torch.equal(load_model_file(c).diffusion.betas, want)]
    assert ckpts, "the train stage left no checkpoint"
    made = root / "external" / "ours.pt"  # a checkpoint file the test makes (outside outputs)
    made.parent.mkdir()
    shutil.copy(ckpts[-1], made)
    p["variants"] = {"mine": {"pretrained": str(made), "format": "ours"}}
    (root / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    out = sh([DVC, "repro"], root, env).stdout
    assert "train[mine] step" not in out and "train[mine]: imported ours weights" in out
    bpd = json.loads((root / "metrics" / "bpd" / "mine.json").read_text())["mine"]
    T, Ks = p["diffusion"]["timesteps"], set(p["bpd"]["steps"]) | {p["diffusion"]["timesteps"]}
    assert set(bpd) == {f"bpd_{s}{k}" for s in ("sigma2_beta", "sigma2_beta_tilde",
                                                 "sigma2_analytic", "sigma2_npr", "sigma2_sn")
                        for k in ["", *(f"_K{K}" for K in Ks)]}, T  # heads: nnhead@mine
    fid = json.loads((root / "metrics" / "fid" / "mine.json").read_text())["mine"]
    assert np.isfinite(fid["fid_ancestral_beta"])
    assert "mine" in (root / "reports" / "report.md").read_text()
    assert any(r.info.run_name == "mine" for r in runs(root))
