"""The report stage on stage outputs written by hand: a self-contained HTML page and a Markdown
file that label measured vs published numbers and the feature network of every FID."""

from __future__ import annotations

import re

from helpers import FID, make_outputs, run_stage, tiny_params  # noqa: F401


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
    # bits/dim vs K per σ² (make_outputs: full + (T - K)/8), beside Analytic-DPM's published rows
    T = p["diffusion"]["timesteps"]
    rows = md.splitlines()
    analytic = next(ln for ln in rows if ln.startswith("| measured: simple") and "analytic" in ln)
    assert f"{2.25 + (T - 2) * 0.125:.3f}" in analytic and "| 2.250 " in analytic
    beta = next(ln for ln in rows if ln.startswith("| measured: vlb") and "σ² = β " in ln)
    assert "| 3.500 " in beta and "| 4.500 " in beta  # bpd K = T, FID ancestral_beta 3.5 + 1
    pub = next(ln for ln in rows if ln.startswith("| published: Analytic-DPM") and "analytic" in ln)
    assert "5.47" in pub and "34.26" in pub and "even; even" in pub
    assert "sigma2_vs_steps.png" in md


def test_report_stage_reports_a_missing_input_in_one_line(tmp_path):
    p = make_outputs(tmp_path)
    (tmp_path / "metrics" / "bpd" / "vlb.json").unlink()
    r = run_stage("report", tmp_path, p)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("error: metrics/bpd/vlb.json")
