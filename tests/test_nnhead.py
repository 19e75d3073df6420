"""The pipeline side of issue 20: the nnhead@<v> stage, σ² npr and sn in sample@<v> and bpd@<v>
(params, sampler specs, metric keys, FID columns), their params errors, the report's NPR/SN rows
beside the published ones and the MLflow metrics."""

from __future__ import annotations

import json

import pytest
from helpers import run_stage, tiny_params
from test_params import assert_one_line_error
from test_report import make_outputs

import ddpm_core
from ddpm_core.config import ConfigError
from pipeline import published, report
from pipeline.fid import STEPS_COLUMNS, steps_column
from pipeline.params import VARIANCES, load_params, params_from_dict
from pipeline.records import SamplerSpec, VariantPaths, bpd_key, ddim_title, sampler_specs

HEADS = ["fixed_large", "analytic", "npr", "sn"]


def heads_params() -> dict:
    p = tiny_params()
    for section in ("sample", "bpd"):
        p[section]["variances"] = list(HEADS)
    p["sample"]["head_steps"] = [2]
    return p


# ----------------------------------------------------------------------------- params, records


def test_npr_and_sn_are_sigma2_choices_of_sample_and_bpd():
    assert VARIANCES[-2:] == ("npr", "sn")
    p = params_from_dict(heads_params())
    assert p.sample.variances == p.bpd.variances == tuple(HEADS) and p.sample.head_steps == (2,)


@pytest.mark.parametrize("section", ["sample", "bpd"])
def test_compile_with_the_heads_is_a_one_line_params_error(section):
    p = heads_params()
    p[section]["compile"] = True
    with pytest.raises(ConfigError) as e:
        params_from_dict(p)
    msg = str(e.value)
    assert msg.startswith(f"{section}.compile: ") and "npr and sn" in msg and "\n" not in msg
    p[section]["variances"] = ["fixed_large"]  # no heads: compile is fine
    params_from_dict(p)


def test_npr_without_trained_heads_and_head_steps_beyond_T_are_params_errors():
    p = heads_params()
    p["nnhead"]["steps"] = 0
    with pytest.raises(ConfigError, match=r"^sample\.variances: npr and sn need the variance "
                                          r"heads of the nnhead stage, but nnhead\.steps is 0"):
        params_from_dict(p)
    p["sample"]["variances"] = ["fixed_large"]
    with pytest.raises(ConfigError, match=r"^bpd\.variances: npr and sn need"):
        params_from_dict(p)
    q = heads_params()
    q["sample"]["head_steps"] = [50]
    with pytest.raises(ConfigError, match=r"^sample\.head_steps: 50 exceeds diffusion"):
        params_from_dict(q)


def test_the_shipped_params_draw_only_four_head_sets_at_ten_steps():
    p = load_params()
    assert {"npr", "sn"} <= set(p.sample.variances) and {"npr", "sn"} <= set(p.bpd.variances)
    assert not p.sample.compile and not p.bpd.compile and p.nnhead.steps > 0
    T = p.diffusion.timesteps
    names = [s.name for s in sampler_specs(p.sample, T, "fixed_large")]
    heads = [n for n in names if "npr" in n or "sn" in n]
    assert heads == ["respaced_npr_S10", "respaced_sn_S10", "ddim_npr_S10", "ddim_sn_S10"]
    # without heads (a model they do not fit) the other sets stay as they were
    assert [n for n in names if n not in heads] == [
        s.name for s in sampler_specs(p.sample, T, "fixed_large", heads=False)]
    assert len(names) == 22
    # a learned variance: its own σ² only, no heads
    assert all("npr" not in s.name for s in sampler_specs(p.sample, T, "learned_range"))


def test_head_steps_null_draws_the_heads_like_every_other_sigma2():
    raw = heads_params()
    raw["sample"]["head_steps"] = None
    s = params_from_dict(raw).sample
    names = [x.name for x in sampler_specs(s, 10, "fixed_large")]
    assert names == ["ancestral_beta", "ancestral_analytic", "ancestral_npr", "ancestral_sn",
                     "respaced_beta_S2", "respaced_analytic_S2", "respaced_npr_S2",
                     "respaced_sn_S2", "ddim_S2", "ddim_analytic_S2", "ddim_npr_S2",
                     "ddim_sn_S2"]


def test_npr_and_sn_ddim_have_their_own_titles_keys_and_fid_columns():
    npr = SamplerSpec("ddim", 10, "npr", "trailing", 0.0, 1.0)
    sn = SamplerSpec("ddim", 10, "sn", "trailing", 0.0, 1.0)
    assert (npr.name, sn.name) == ("ddim_npr_S10", "ddim_sn_S10")
    assert ddim_title("npr", 0.0) == "NPR-DDIM η = 0" and ddim_title("sn", 0.0) == "SN-DDIM η = 0"
    assert ddim_title("analytic", 0.0) == "Analytic-DDIM η = 0" and ddim_title(None, 0) == \
        "DDIM η = 0"
    assert npr.label() == "NPR-DDIM η = 0, 10 steps"
    assert steps_column(npr) == "ddim_npr" and steps_column(sn) == "ddim_sn"
    assert steps_column(SamplerSpec("respaced", 10, "sn", "trailing")) == "respaced_sn"
    assert {"ddim_npr", "ddim_sn", "respaced_npr", "respaced_sn"} <= set(STEPS_COLUMNS)
    assert bpd_key("npr", 10) == "bpd_sigma2_npr_K10" and bpd_key("sn") == "bpd_sigma2_sn"


def test_published_heads_rows_as_issue_20_gives_them_labelled_unchecked():
    assert published.HEADS_BPD["npr"] == {10: 5.40, 25: 4.64, 50: 4.25, 100: 3.98, 200: 3.79,
                                          1000: 3.57}
    assert published.HEADS_DDIM_FID["sn"] == {10: 12.19, 25: 4.28, 50: 3.39, 100: 3.23,
                                              200: 3.22, 1000: 3.65}
    # issue 20's Analytic-DDPM row is Analytic-DPM's, recorded once (ANALYTIC_DPM_BPD)
    issue = {10: 5.47, 25: 4.79, 50: 4.38, 100: 4.07, 200: 3.84, 1000: 3.59}
    assert {K: published.ANALYTIC_DPM_BPD["analytic"][K] for K in issue} == issue
    for text in (published.HEADS_SOURCE, published.HEADS_LABEL):
        assert "as given in issue 20; not yet checked against Bao et al. 2022b" in text


def test_the_heads_api_is_exported():
    from ddpm_core import api

    for name in ("train_heads", "save_heads", "load_heads"):
        assert name in ddpm_core.__all__ and getattr(ddpm_core, name) is getattr(api, name)


# ----------------------------------------------------------------------------- report


def test_report_has_npr_and_sn_rows_beside_the_labelled_published_ones(tmp_path, monkeypatch):
    p = make_outputs(tmp_path, ("simple",))
    T = p["diffusion"]["timesteps"]
    vp = VariantPaths("simple")
    bpd = json.loads((tmp_path / vp.bpd_metrics).read_text())
    for K in (2, 5, T):  # NPR below analytic at every K, SN above
        bpd["simple"][f"bpd_sigma2_npr_K{K}"] = bpd["simple"][f"bpd_sigma2_analytic_K{K}"] - 0.5
        bpd["simple"][f"bpd_sigma2_sn_K{K}"] = bpd["simple"][f"bpd_sigma2_analytic_K{K}"] + 0.5
    bpd["simple"]["bpd_sigma2_npr"] = bpd["simple"][f"bpd_sigma2_npr_K{T}"]
    (tmp_path / vp.bpd_metrics).write_text(json.dumps(bpd))
    index = json.loads((tmp_path / vp.sample_index).read_text())
    fid = json.loads((tmp_path / vp.fid_metrics).read_text())
    for spec in (SamplerSpec("ddim", 2, "sn", "quadratic", 0.0),
                 SamplerSpec("respaced", 2, "npr", "quadratic")):
        index["samplers"].append({**spec.to_dict(), "num_samples": 8})
        fid["simple"][f"fid_{spec.name}"] = 7.125 if spec.kind == "ddim" else 8.375
        (tmp_path / vp.grids / f"{spec.name}.png").write_bytes(
            (tmp_path / vp.grids / "ddim_S2.png").read_bytes())
    (tmp_path / vp.sample_index).write_text(json.dumps(index))
    (tmp_path / vp.fid_metrics).write_text(json.dumps(fid))
    monkeypatch.chdir(tmp_path)
    params = load_params()
    res = report.load_results(params)
    bpd_table, fid_table = report.sigma2_steps_tables(params, res)
    rows = {(r["source"], r["σ²"]): r for r in bpd_table.to_dict("records")}
    npr = rows[("measured: simple", "σ² NPR-DPM")]
    assert npr["K = 2"] == f"{bpd['simple']['bpd_sigma2_npr_K2']:.3f}"
    assert rows[("measured: simple", "σ² SN-DPM")]["K = 5"] != "–"
    pub = rows[(f"published: {published.HEADS_LABEL}", "σ² NPR-DPM")]
    assert pub["K = 10"] == "5.40" and pub["K = 1000"] == "3.57" and pub["spacing"] == "even"
    fids = {(r["source"], r["σ²"]): r for r in fid_table.to_dict("records")}
    assert fids[("measured: simple", "SN-DDIM η = 0")]["S = 2"] == "7.125"
    assert fids[("measured: simple", "σ² NPR-DPM")]["S = 2"] == "8.375"
    assert fids[(f"published: {published.HEADS_LABEL}", "SN-DDIM η = 0")]["S = 10"] == "12.19"
    assert report.npr_against_analytic(res) == [
        f"`simple`: NPR beats analytic at every K; NPR − analytic bits/dim: K = 2: -0.500, "
        f"K = 5: -0.500, K = {T}: -0.500."]
    assert run_stage("report", tmp_path, p).returncode == 0
    md = (tmp_path / "reports" / "report.md").read_text()
    assert "NPR-DDIM and SN-DDIM add the head's noise even at η = 0" in md
    assert "NPR beats analytic at every K" in md and published.HEADS_SOURCE in md
    assert "SN-DDIM η = 0" in md and "σ² NPR-DPM" in md


# ----------------------------------------------------------------------------- stages


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Tiny params with npr and sn, and two models: `simple` (ε, fixed variance: heads) and
    `hybrid` (learned_range: no heads)."""
    root = tmp_path_factory.mktemp("nnhead")
    p = heads_params()
    p["variants"] = {"simple": p["variants"]["simple"],
                     "hybrid": {"mean_type": "eps", "var_type": "learned_range",
                                "loss": "hybrid"}}
    assert run_stage("prepare", root, p).returncode == 0
    for v in p["variants"]:
        for stage in ("train", "gamma"):
            r = run_stage(stage, root, p, variant=v)
            assert r.returncode == 0, r.stderr
    return root, p


@pytest.mark.slow
def test_sample_and_bpd_with_npr_need_the_heads_stage_first(trained):
    root, p = trained
    for stage in ("sample", "bpd"):
        r = run_stage(stage, root, p)
        assert_one_line_error(r, "heads/simple/info.json: not found", code=1)
        assert "nnhead@simple" in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sample", "bpd", "nnhead"])
def test_stages_refuse_compile_with_the_heads_in_one_line(trained, stage):
    root, p = trained
    q = json.loads(json.dumps(p))
    q["sample" if stage == "nnhead" else stage]["compile"] = True
    assert_one_line_error(run_stage(stage, root, q),
                          f"{'sample' if stage == 'nnhead' else stage}.compile")
    q = json.loads(json.dumps(p))
    q["nnhead"]["steps"] = 0
    assert_one_line_error(run_stage(stage, root, q), "sample.variances: npr and sn need")


@pytest.mark.slow
def test_nnhead_bpd_sample_fid_report_track_with_npr_and_sn(trained, tmp_path_factory):
    root, p = trained
    from helpers import run_stage as run

    db = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"
    r = run("nnhead", root, p)
    assert r.returncode == 0, r.stderr
    info = json.loads((root / "heads" / "simple" / "info.json").read_text())
    assert info["heads"] == "heads.pt" and info["skipped"] is None and info["steps"] == 2
    heads = ddpm_core.load_heads(root / "heads" / "simple" / "heads.pt")
    assert set(heads) == {"npr", "sn"}
    t = json.loads((root / "timings" / "nnhead" / "simple.json").read_text())
    assert t["steps"] == 2 and t["seconds"] > 0
    r = run("nnhead", root, p, variant="hybrid")  # learned variance: one line, no heads file
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("nnhead[hybrid]: skipped, no heads: ") == 1
    assert sorted(f.name for f in (root / "heads" / "hybrid").iterdir()) == ["info.json"]
    assert json.loads((root / "heads" / "hybrid" / "info.json").read_text())["heads"] is None

    T = p["diffusion"]["timesteps"]
    Ks = sorted(set(p["bpd"]["steps"]) | {T})
    for v in p["variants"]:
        for stage in ("bpd", "sample"):
            r = run(stage, root, p, variant=v)
            assert r.returncode == 0, r.stderr
    bpd = json.loads((root / "metrics" / "bpd" / "simple.json").read_text())["simple"]
    for var in ("npr", "sn"):
        assert bpd[bpd_key(var)] == bpd[bpd_key(var, T)] and all(
            bpd[bpd_key(var, K)] > 0 for K in Ks)
    assert (root / "plots" / "bpd_steps" / "simple.csv").read_text().splitlines()[0] == \
        "K,sigma2_beta,sigma2_analytic,sigma2_npr,sigma2_sn"
    assert "bpd_sigma2_npr" not in json.loads(
        (root / "metrics" / "bpd" / "hybrid.json").read_text())["hybrid"]
    index = json.loads((root / "samples" / "simple" / "index.json").read_text())
    names = [d["name"] for d in index["samplers"]]
    assert names[-4:] == ["respaced_npr_S2", "respaced_sn_S2", "ddim_npr_S2", "ddim_sn_S2"]
    assert not any(n.startswith("ancestral_npr") for n in names)
    for n in names[-4:]:
        assert (root / "samples" / "simple" / f"{n}.npy").is_file()
    hybrid = [d["name"] for d in json.loads(
        (root / "samples" / "hybrid" / "index.json").read_text())["samplers"]]
    assert not any("npr" in n or "sn" in n for n in hybrid)

    for stage, v in [("features", None), ("fid", "simple"), ("fid", "hybrid"),
                     ("nll", "simple"), ("nll", "hybrid")]:
        q = json.loads(json.dumps(p))
        q["nll"]["num_images"] = 1
        r = run(stage, root, q, variant=v)
        assert r.returncode == 0, r.stderr
    fid = json.loads((root / "metrics" / "fid" / "simple.json").read_text())["simple"]
    assert {f"fid_{n}" for n in names[-4:]} <= set(fid)
    steps = (root / "plots" / "fid_steps" / "simple.csv").read_text().splitlines()
    assert steps[0] == "steps," + ",".join(STEPS_COLUMNS)
    row = dict(zip(steps[0].split(","), next(ln for ln in steps[1:]
                                             if ln.startswith("2,")).split(","), strict=True))
    assert all(row[c] for c in ("ddim_npr", "ddim_sn", "respaced_npr", "respaced_sn"))

    r = run("report", root, p)
    assert r.returncode == 0, r.stderr
    md = (root / "reports" / "report.md").read_text()
    assert any(ln.startswith("| measured: simple") and "| σ² NPR-DPM" in ln
               for ln in md.splitlines()) and "SN-DDIM η = 0" in md
    assert f"published: {published.HEADS_LABEL}" in md
    assert "nnhead@simple" in md and "no heads: " in md  # the wall-time table

    r = run("track", root, p, env={"MLFLOW_TRACKING_URI": db})
    assert r.returncode == 0, r.stderr
    from mlflow.tracking import MlflowClient

    c = MlflowClient(db)
    rs = c.search_runs([c.get_experiment_by_name(p["mlflow"]["experiment"]).experiment_id])
    vrun = next(x for x in rs if x.data.tags.get("ddpm.level") == "variant"
                and x.info.run_name == "simple")
    m = vrun.data.metrics
    assert {"bpd_sigma2_npr", f"bpd_sigma2_sn_K{Ks[0]}", "fid_ddim_sn_S2", "fid_respaced_npr_S2",
            "nnhead_seconds"} <= set(m)
    srun = next(x for x in rs if x.data.tags.get("sampler") == "ddim_npr_S2"
                and x.data.tags.get("variant") == "simple")
    assert srun.data.params["sigma2"] == "sigma2_npr"
