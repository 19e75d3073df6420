"""The device check (benchmarks/device_check.py) on the CPU, so that it is known to work before it
first meets a GPU: the `--device cpu --quick` run in a subprocess prints one table and writes one
JSON with every section; sections keep their own budget and failures; the targets name the
profile's top ops when missed."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import device_check as dc

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = [n for n, *_ in dc.SECTIONS]


def run_module(out: Path, *extra: str, timeout: int = 300) -> tuple[subprocess.CompletedProcess,
                                                                     float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("OUT", None)
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "benchmarks.device_check", "--device", "cpu",
                        "--quick", "--out", str(out), *extra], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=timeout)
    return r, time.monotonic() - t0


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("device-check") / "device_check.json"
    r, wall = run_module(out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r, json.loads(out.read_text()), out.with_suffix(".txt").read_text(), wall


@pytest.mark.slow
def test_quick_cpu_run_finishes_in_two_minutes_with_every_section(quick):
    r, rep, _, wall = quick
    assert wall < 120, f"--device cpu --quick took {wall:.0f} s"
    assert rep["finished"] and list(rep["sections"]) == SECTIONS
    s = rep["sections"]
    for name in ("environment", "train_eager", "sample_eager", "bits_per_dim", "torchrun",
                 "profile"):
        assert s[name]["status"] == "ok", (name, s[name])
    env = s["environment"]
    assert env["device"] == "cpu" and env["gpu"] is None and env["peak_bf16_tflops"] is None
    assert env["params"]["ours"] == env["params"]["diffusers"]  # the same configuration


@pytest.mark.slow
def test_quick_cpu_rates_ratios_and_skips_are_in_the_json(quick):
    _, rep, _, _ = quick
    s = rep["sections"]
    for name, labels in (("train_eager", ("fp32", "bf16")), ("sample_eager", ("bf16",))):
        for label in labels:
            rates = s[name]["rates"][label]
            o, d = rates["ours"]["per_s"], rates["diffusers"]["per_s"]
            assert o > 0 and d > 0 and rates["ratio"] == pytest.approx(o / d)
            assert rates["ours"]["first_call_s"] > 0
            assert "peak_share" not in rates["ours"]  # no bf16 peak on the CPU
    assert s["train_compiled"] == {**s["train_compiled"], "status": "skipped",
                                   "reason": "skipped (cpu quick)"}
    assert s["sample_graphs"]["status"] == "skipped"
    b = s["bits_per_dim"]
    assert b["passed"] and abs(b["delta"]) <= b["se"] and b["se"] > 0
    assert b["bpd_fp32"] != b["bpd_bf16"]  # bf16 really ran: not the same numbers
    t = s["torchrun"]
    assert t["passed"] and t["backend"] == "gloo" and t["world_size"] == 1
    assert t["max_weight_change"] > 0
    for what in ("train_step", "sample_call"):
        ops = s["profile"][what]["cpu"]
        assert 1 <= len(ops) <= 5 and all(o["self_ms"] > 0 for o in ops)
        assert [o["self_ms"] for o in ops] == sorted((o["self_ms"] for o in ops), reverse=True)
    d = s["dvc_repro"]  # runs when the quick budget leaves it >= 45 s, else says why not
    if d["status"] == "ok":
        assert d["passed"] and d["device"] == "cpu" and d["cuda_used_by"] == []
    else:
        assert d["status"] == "skipped" and "left of the total budget" in d["reason"], d
    for kind in ("train", "sample"):
        assert rep["targets"][kind]["status"].startswith("n/a on cpu")


@pytest.mark.slow
def test_quick_cpu_table_is_printed_and_written_with_every_row(quick):
    r, rep, txt, _ = quick
    assert txt.strip() in r.stdout
    rows = {ln[:38].strip(): ln for ln in txt.splitlines()[2:]}
    for label in ("install (README command)", "train img/s fp32", "train img/s bf16 eager",
                  "train img/s bf16 compiled", "sample NFE*img/s bf16 eager",
                  "sample NFE*img/s bf16 CUDA graphs", "bits/dim bf16 vs fp32",
                  "compiled vs eager max|diff|", "torchrun: 1 DDP training step",
                  "dvc repro (tiny digits)", "target train >= 4,000 img/s",
                  "target sample >= 20,000 NFE*img/s"):
        assert label in rows, label
    assert "skipped (cpu quick)" in rows["train img/s bf16 compiled"]
    rate = rep["sections"]["train_eager"]["rates"]["fp32"]["ours"]["per_s"]
    assert f"{rate:,.0f}" in rows["train img/s fp32"]
    assert "pass" in rows["bits/dim bf16 vs fp32"]
    assert "gloo" in rows["torchrun: 1 DDP training step"]


@pytest.mark.slow
def test_tiny_digits_dvc_repro_runs_the_network_stages_on_the_cpu_it_finds(tmp_path):
    out = tmp_path / "device_check.json"
    r, _ = run_module(out, "--only", "dvc_repro", "--budget", "400", timeout=500)
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.loads(out.read_text())["sections"]["dvc_repro"]
    assert d["status"] == "ok", d
    assert {"train@simple", "sample@simple", "bpd@simple"} <= set(d["stages_run"])
    assert d["stage_processes"] >= 3 and d["device"] == "cpu" and d["passed"]


# ----------------------------------------------------------------------------- in process


def fake_ctx(tmp_path: Path, budget: float = 60.0) -> dc.Context:
    args = argparse.Namespace(quick=True, cpu_compile=False, install_s=None, install_note="")
    s = dc.Settings(**{**dc.QUICK.__dict__, "budget_s": budget})
    now = time.monotonic()
    import torch

    return dc.Context(args, torch.device("cpu"), s, now + budget, {"t_start": now})


def fake_report() -> dict:
    return {"started_utc": "now", "settings": {"device": "cpu", "quick": True,
                                               **dc.QUICK.__dict__},
            "finished": False, "sections": {}, "targets": {}}


def test_a_failing_or_overlong_section_keeps_the_others_and_the_partial_json(tmp_path):
    ctx, report, path = fake_ctx(tmp_path), fake_report(), tmp_path / "dc.json"

    def slow(ctx, sec):
        sec["partial"] = 1
        time.sleep(5)

    def broken(ctx, sec):
        raise RuntimeError("no such kernel\nsecond line")

    def fine(ctx, sec):
        sec["value"] = 2

    dc.run_section(ctx, report, "slow", slow, 0.5, 0, path)
    dc.run_section(ctx, report, "broken", broken, 10, 0, path)
    dc.run_section(ctx, report, "fine", fine, 10, 0, path)
    on_disk = json.loads(path.read_text())["sections"]
    assert on_disk["slow"]["status"] == "timeout" and on_disk["slow"]["partial"] == 1
    assert on_disk["slow"]["seconds"] < 2
    assert on_disk["broken"]["status"] == "error"
    assert on_disk["broken"]["reason"] == "RuntimeError: no such kernel"
    assert on_disk["fine"] == {**on_disk["fine"], "status": "ok", "value": 2}
    assert "sections" in path.with_suffix(".txt").read_text()


def test_a_section_that_does_not_fit_the_total_budget_is_skipped_with_the_reason(tmp_path):
    ctx, report = fake_ctx(tmp_path, budget=20.0), fake_report()
    dc.run_section(ctx, report, "big", lambda c, s: None, 120, 45, tmp_path / "dc.json")
    sec = report["sections"]["big"]
    assert sec["status"] == "skipped" and "it needs >= 45 s" in sec["reason"]


def test_a_missed_target_names_the_profile_top_ops_and_a_met_one_does_not():
    ops = [{"op": "aten::convolution_backward", "self_ms": 12.5, "calls": 30}]
    report = {"sections": {
        "train_eager": {"rates": {"bf16": {"ours": {"per_s": 1500.0}}}},
        "train_compiled": {"rates": {"bf16_compiled": {"ours": {"per_s": 3900.0}}}},
        "sample_eager": {"rates": {"bf16": {"ours": {"per_s": 25000.0}}}},
        "profile": {"train_step": {"cuda": ops, "cpu": []}}}}
    t = dc.targets(report, cuda=True)
    assert t["train"] == {"target": 4000.0, "best": 3900.0, "config": "bf16_compiled",
                          "status": "missed", "top_ops": ops}
    assert t["sample"]["status"] == "met" and "top_ops" not in t["sample"]
    assert dc.targets(report, cuda=False)["train"]["status"].startswith("n/a on cpu")


def test_the_json_holds_no_nan_or_inf():
    assert dc.clean({"a": float("nan"), "b": (1.0, float("inf"))}) == {"a": None, "b": [1.0, None]}


def test_compile_sections_fill_their_rows_and_feed_the_profile(tmp_path, monkeypatch):
    """The compile sections' own code on the CPU, torch.compile replaced by the identity (a real
    compilation of the U-Net takes minutes on two cores; the GPU run does it for real)."""
    import torch

    monkeypatch.setattr(torch, "compile", lambda model, **kw: model)
    ctx, report, path = fake_ctx(tmp_path), fake_report(), tmp_path / "dc.json"
    ctx.args.cpu_compile = True
    for name in ("environment", "train_compiled", "sample_graphs", "profile"):
        fn, budget = next((f, b) for n, f, b, _ in dc.SECTIONS if n == name)
        dc.run_section(ctx, report, name, fn, budget, 0, path)
    s = json.loads(path.read_text())["sections"]
    for name, label in (("train_compiled", "bf16_compiled"), ("sample_graphs", "bf16_graphs")):
        assert s[name]["status"] == "ok", s[name]
        rates = s[name]["rates"][label]
        assert rates["ours"]["per_s"] > 0 and rates["diffusers"]["first_call_s"] > 0
    c = s["sample_graphs"]["compiled_vs_eager"]
    assert c["max_abs_diff"] == 0.0 and c["passed"]  # the identity "compiles" exactly
    assert c["bf16_vs_fp32_max_abs_diff"] > 0 and c["output_max_abs"] > 0.1  # not ~0 outputs
    assert s["profile"]["train_step"]["of"] == "train_step_compiled_bf16"
    assert s["profile"]["sample_call"]["of"] == "graphs_ours"
