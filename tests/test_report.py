"""The report stage on stage outputs written by hand: a self-contained HTML page and a Markdown
file that label measured vs published numbers and the feature network of every FID."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from test_params import run_stage, tiny_params  # noqa: E402

FID = {"ancestral_beta": 3.5, "ancestral_beta_tilde": 4.25, "respaced_beta_S2": 9.0,
       "ddim_S2": 6.0}


def make_outputs(root: Path, names: tuple[str, ...] = ("simple", "vlb")) -> dict:
    """The files train, sample, bpd, features and fid write (pipeline.records' layout), with
    known numbers; returns the params."""
    from pipeline.records import SamplerSpec, VariantPaths

    p = tiny_params()
    p["variants"] = {k: v for k, v in p["variants"].items() if k in names}
    T = p["diffusion"]["timesteps"]
    (root / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    specs = [SamplerSpec("ancestral", T, "fixed_large"), SamplerSpec("ancestral", T, "fixed_small"),
             SamplerSpec("respaced", 2, "fixed_large", "quadratic"),
             SamplerSpec("ddim", 2, None, "quadratic", 0.0)]
    assert [s.name for s in specs] == list(FID)

    def put(path: Path, obj: object) -> None:
        path = root / path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(obj if isinstance(obj, str) else json.dumps(obj))

    for k, name in enumerate(names):
        vp = VariantPaths(name)
        (root / vp.samples).mkdir(parents=True)
        (root / vp.grids).mkdir(parents=True)
        for spec in specs:
            np.save(root / vp.samples / f"{spec.name}.npy", np.full((8, 8, 8, 1), 40 * k, np.uint8))
            Image.fromarray(np.full((20, 20), 128, np.uint8)).save(
                root / vp.grids / f"{spec.name}.png")
        put(vp.sample_index, {"variant": name, "source": str(vp.model),
                              "samplers": [{**s.to_dict(), "num_samples": 8} for s in specs]})
        put(vp.train_metrics, {name: {"final_loss": 0.05 + k}})
        put(vp.timings("train"), {"seconds": 1.0, "steps": 4})
        put(vp.bpd_metrics, {name: {"bpd_sigma2_beta": 2.5 + k, "bpd_sigma2_beta_tilde": 3.5 + k}})
        put(vp.fid_metrics, {name: {f"fid_{s}": v + k for s, v in FID.items()}})
        put(vp.fid_details, {s: {"fid": v + k, "kid_mean": 0.01, "kid_std": 0.001}
                             for s, v in FID.items()})
        put(vp.fid_steps, f"steps,ddim,respaced\n2,{6.0 + k},{9.0 + k}\n{T},,{3.5 + k}\n")
        put(vp.loss_csv, "step,loss,grad_norm,lr\n1,1.0,1.0,0.001\n2,0.5,0.8,0.001\n")
        rows = ["term,t,sigma2_beta,sigma2_beta_tilde", "L_T,,0.001,0.001"]
        rows += [f"L_{i},{i + 1},{0.1 * (i + 1)},{0.2 * (i + 1)}" for i in range(T - 1, -1, -1)]
        put(vp.bpd_terms, "\n".join(rows) + "\n")
    put(Path("features/info.json"), {
        "features": "digits_classifier", "label": "FID (digits classifier)",
        "reference": "train split", "reference_images": 1437, "floor_images": 360,
        "classifier_test_accuracy": 0.95, "floor": {"fid": 0.75, "kid_mean": 0.0}})
    return p


def test_report_is_self_contained_and_labels_every_number(tmp_path):
    p = make_outputs(tmp_path)
    r = run_stage("report", tmp_path, p)
    assert r.returncode == 0, r.stderr
    page = (tmp_path / "reports" / "report.html").read_text()
    md = (tmp_path / "reports" / "report.md").read_text()
    # nothing loaded from the network: no script, no stylesheet link, no remote URL in src/href
    assert "<script" not in page and "<link" not in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    figures = sorted((tmp_path / "reports" / "figures").iterdir())
    md_images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert md_images and all((tmp_path / "reports" / m).is_file() for m in md_images)
    assert page.count('src="data:image/png;base64,') == len(md_images) <= len(figures)
    for text in (md, page):
        assert "FID (digits classifier)" in text
        assert "floor" in text and "Published" in text and "Measured" in text
        assert "CIFAR-10" in text and "3.17" in text and "13.51" in text  # DDPM Table 1
    # measured numbers appear next to their model, the floor in its own row
    simple_row = next(ln for ln in md.splitlines() if ln.startswith("| simple "))
    assert "2.500" in simple_row and "3.500" in simple_row and "0.0500" in simple_row
    floor_row = next(ln for ln in md.splitlines() if ln.startswith("| floor"))
    assert "0.750" in floor_row
    steps_row = next(ln for ln in md.splitlines() if ln.startswith("| vlb") and "DDIM" in ln)
    assert "7.000" in steps_row  # ddim_S2 of the second model: 6.0 + 1


def test_report_stage_reports_a_missing_input_in_one_line(tmp_path):
    p = make_outputs(tmp_path)
    (tmp_path / "metrics" / "bpd" / "vlb.json").unlink()
    r = run_stage("report", tmp_path, p)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("error: metrics/bpd/vlb.json")
