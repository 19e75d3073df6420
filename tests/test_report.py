"""The report stage on stage outputs written by hand: a self-contained HTML page and a Markdown
file that label measured vs published numbers and the feature network of every FID, with KID and
IS beside FID, the DDIM table, the sample grids side by side, each stage's wall time and the
provenance (commit, dirty tree, params hash, versions, device)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import re
import subprocess
from pathlib import Path

import numpy as np
from helpers import FID, run_stage, tiny_params  # noqa: F401
from helpers import make_outputs as stage_outputs

from pipeline import provenance, report
from pipeline.params import load_params, to_dict
from pipeline.records import SamplerSpec, load_results

GRID_SPECS = [SamplerSpec("ancestral", 10, "fixed_large"), SamplerSpec("ancestral", 10,
                                                                        "fixed_small"),
              SamplerSpec("respaced", 2, "fixed_large", "quadratic"),
              SamplerSpec("ddim", 2, None, "quadratic", 0.0)]  # make_outputs' samplers, T = 10


def make_outputs(root: Path, names: tuple[str, ...] = ("simple", "vlb")) -> dict:
    """helpers.make_outputs plus prepare's training split, which the report draws beside the
    samples (data/prepared/train.npy: 20 uint8 8x8 images)."""
    p = stage_outputs(root, names)
    (root / "data" / "prepared").mkdir(parents=True, exist_ok=True)
    np.save(root / "data" / "prepared" / "train.npy",
            (np.arange(20 * 64) * 7 % 256).astype(np.uint8).reshape(20, 8, 8, 1))
    return p


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def tables(md: str, first_cell: str) -> list[list[list[str]]]:
    """Every Markdown table whose header starts with first_cell: rows of cells, header first,
    the separator line dropped."""
    out, rows = [], None
    for ln in md.splitlines() + [""]:
        if not ln.startswith("|"):
            if rows and rows[0][0] == first_cell:
                out.append(rows)
            rows = None
        elif rows is None:
            rows = [cells(ln)]
        elif not re.fullmatch(r"\|?[\s:|-]+\|?", ln.strip()):
            rows.append(cells(ln))
    return out


def table_after(md: str, first_cell: str) -> list[list[str]]:
    """The one table whose header starts with first_cell."""
    found = tables(md, first_cell)
    assert len(found) == 1, (first_cell, len(found))
    return found[0]


def add_timings(root: Path) -> None:
    """timings/ of sample, fid and features beside make_outputs' train timings (1.0 s each)."""
    files = {"timings/sample/simple.json": {"samplers": {"a": {"seconds": 2.5}}, "seconds": 2.5},
             "timings/fid/simple.json": {"seconds": {"a": 0.5, "b": 1.5}},
             "timings/features.json": {"classifier_seconds": 3.0, "reference_seconds": 1.5}}
    for path, obj in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(json.dumps(obj))


def git(root: Path, *args: str) -> str:
    env_args = ["-c", "user.name=t", "-c", "user.email=t@example.com"]
    return subprocess.run(["git", *env_args, *args], cwd=root, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_report_is_self_contained_and_labels_every_number(tmp_path):
    p = make_outputs(tmp_path)
    add_timings(tmp_path)
    r = run_stage("report", tmp_path, p, env={"GIT_CEILING_DIRECTORIES": str(tmp_path.parent)})
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
    # (two tables, bits/dim against K and FID against S, columns in increasing steps)
    T = p["diffusion"]["timesteps"]
    bpd, fid = tables(md, "source")
    assert bpd[0] == ["source", "σ²", "K = 2", "K = 5", "K = 10", "K = 25", "K = 50", "K = 100",
                      "K = 200", "K = 400", "K = 1000", "spacing"]
    rows = {tuple(r[:2]): dict(zip(bpd[0], r, strict=True)) for r in bpd[1:]}
    analytic = rows["measured: simple", "σ² analytic"]
    assert analytic["K = 2"] == f"{2.25 + (T - 2) * 0.125:.3f}" and analytic["K = 10"] == "2.250"
    assert rows["measured: vlb", "σ² = β"]["K = 10"] == "3.500"  # bpd K = T: 2.5 + 1
    pub = rows["published: Analytic-DPM CIFAR-10 (LS)", "σ² analytic"]
    assert pub["K = 10"] == "5.47" and pub["K = 1000"] == "3.59" and pub["spacing"] == "even"
    assert fid[0][:4] == ["source", "σ²", "metric", "S = 2"] and fid[0][-1] == "spacing"
    rows = {tuple(r[:2]): dict(zip(fid[0], r, strict=True)) for r in fid[1:]}
    beta = rows["measured: vlb", "σ² = β"]
    assert beta["S = 10"] == "4.500" and beta["S = 2"] == "10.000"  # ancestral 3.5, S2 9.0; + 1
    assert beta["metric"] == "FID (digits classifier)" and beta["spacing"] == "trailing"
    pub = rows["published: Analytic-DPM CIFAR-10 (LS)", "σ² analytic"]
    assert pub["S = 10"] == "34.26" and pub["metric"] == "FID (Inception-v3)"
    assert "sigma2_vs_steps.png" in md
    # outside a git repository the commit is 'unknown', and the stage still succeeds
    prov = dict(r[:2] for r in table_after(md, "provenance")[1:])
    assert prov["git commit"].startswith("unknown") and prov["uncommitted changes"] == "unknown"


def test_fid_table_has_kid_and_is_beside_fid_for_every_sample_set(tmp_path):
    p = make_outputs(tmp_path)
    r = run_stage("report", tmp_path, p, env={"GIT_CEILING_DIRECTORIES": str(tmp_path.parent)})
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "reports" / "report.md").read_text()
    table = next(t for t in tables(md, "model") if "images" in t[0])
    head, body = table[0], table[1:]
    assert head == ["model", "sampler", "images", "FID (digits classifier)",
                    "KID x 10³ (digits classifier)", "IS", "σ cap, step to x_τ1"]
    want = [(name, spec.label(), f"{v + k:.3f}") for k, name in enumerate(("simple", "vlb"))
            for spec, v in zip(GRID_SPECS, FID.values(), strict=True)]
    assert [(b[0], b[1], b[3]) for b in body[:-1]] == want
    assert all(b[4] == "10.00 ± 1.00" and b[5] == "n/a" and b[2] == "8" for b in body[:-1])
    assert body[-1][0] == "floor" and body[-1][3] == "0.750" and body[-1][2] == "360"
    assert "IS is n/a" in md


def test_inception_features_give_an_is_column(tmp_path, monkeypatch):
    make_outputs(tmp_path)
    info = json.loads((tmp_path / "features/info.json").read_text())
    info.update(features="inception", label="FID (Inception-v3)")
    (tmp_path / "features/info.json").write_text(json.dumps(info))
    details = json.loads((tmp_path / "fid/simple.json").read_text())
    details["ddim_S2"].update(isc_mean=9.46, isc_std=0.11)
    (tmp_path / "fid/simple.json").write_text(json.dumps(details))
    monkeypatch.chdir(tmp_path)
    df = report.sample_sets_table(load_results(load_params(tmp_path / "params.yaml")))
    assert "KID x 10³ (Inception-v3)" in df.columns
    got = dict(zip(df["model"] + "/" + df["sampler"], df["IS (Inception-v3)"], strict=True))
    assert got["simple/" + GRID_SPECS[3].label()] == "9.46 ± 0.11"
    assert got["simple/" + GRID_SPECS[0].label()] == "–"  # measured without IS: not 'n/a'


def test_ddim_published_numbers_are_a_table(tmp_path):
    p = make_outputs(tmp_path, names=("simple",))
    r = run_stage("report", tmp_path, p, env={"GIT_CEILING_DIRECTORIES": str(tmp_path.parent)})
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "reports" / "report.md").read_text()
    page = (tmp_path / "reports" / "report.html").read_text()
    # Song et al. 2021, Table 1 (CIFAR-10, quadratic spacing), typed from the paper
    assert next(t for t in tables(md, "sampler") if "S = 10" in t[0]) == [
        ["sampler", "S = 10", "S = 20", "S = 50", "S = 100", "S = 1000"],
        ["DDIM η = 0", "13.36", "6.84", "4.67", "4.16", "4.04"],
        ["DDIM η = 1", "41.07", "18.36", "8.01", "5.78", "4.73"],
        ["DDPM ancestral σ² = β (σ̂), respaced", "367.43", "133.37", "32.72", "9.99", "3.17"]]
    assert '<td>DDIM η = 0</td><td class="n">13.36</td><td class="n">6.84</td>' in re.sub(
        r">\s+<", "><", page)  # number cells right-aligned
    assert "S=10: DDIM" not in md  # no longer a run-on sentence


def test_grids_side_by_side_one_row_per_sampler_thumbnails_link_to_full_grids(tmp_path):
    p = make_outputs(tmp_path)
    r = run_stage("report", tmp_path, p, env={"GIT_CEILING_DIRECTORIES": str(tmp_path.parent)})
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "reports" / "report.md").read_text()
    page = (tmp_path / "reports" / "report.html").read_text()
    grid = [t for t in tables(md, "sampler") if "simple" in t[0]]
    assert len(grid) == 2  # the featured samplers, then the others (a collapsed section)
    assert grid[0][0] == grid[1][0] == ["sampler", "simple", "vlb"]
    body = grid[0][1:] + grid[1][1:]
    assert sorted(b[0] for b in body) == sorted(s.label() for s in GRID_SPECS)  # one row each
    spec_of = {s.label(): s for s in GRID_SPECS}
    for row in body:
        spec = spec_of[row[0]]
        for k, (name, c) in enumerate(zip(("simple", "vlb"), row[1:], strict=True)):
            f = f"figures/samples_{name}_{spec.name}.png"
            assert c.startswith(f"[![{name}: {spec.name}]({f})]({f})"), c
            assert c.endswith(f"FID {FID[spec.name] + k:.3f}")
            assert (tmp_path / "reports" / f).is_file()
            # HTML: a thumbnail (inlined, fixed width) inside a link to the full-size grid
            assert re.search(rf'<td class="thumb"><a href="{re.escape(f)}"><img src="data:image/'
                             rf'png;base64,[^"]+" alt="{name}: {spec.name}" width="\d+"></a>',
                             page), f
    assert page.count('<a href="figures/samples_') == 2 * len(GRID_SPECS)


def test_provenance_in_a_git_repo_and_the_report_is_byte_reproducible(tmp_path):
    p = make_outputs(tmp_path)
    add_timings(tmp_path)
    (tmp_path / ".gitignore").write_text("/reports/\n")  # an output, as in the project
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-qm", "results")
    r = run_stage("report", tmp_path, p)
    assert r.returncode == 0, r.stderr
    first = {f.relative_to(tmp_path): f.read_bytes()
             for f in sorted((tmp_path / "reports").rglob("*")) if f.is_file()}
    md = (tmp_path / "reports" / "report.md").read_text()
    prov = dict(r[:2] for r in table_after(md, "provenance")[1:])
    head = git(tmp_path, "rev-parse", "HEAD")
    assert re.fullmatch(r"[0-9a-f]{40}", prov["git commit"]) and prov["git commit"] == head
    assert prov["uncommitted changes"] == "no"
    params = to_dict(load_params(tmp_path / "params.yaml"))
    assert prov["params hash (SHA-256)"] == hashlib.sha256(
        json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()
    for pkg in ("torch", "dvc", "mlflow", "torch-fidelity"):
        assert prov[f"version: {pkg}"] == importlib.metadata.version(pkg)
    dev = prov["device (of the machine that wrote the report)"]
    assert dev.startswith("CPU: ") and "GPU: " in dev
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        model = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines()
                      if ln.startswith("model name")), "")
        assert model in dev
    # wall time of each timed stage from timings/, summed per stage (fid: per sample set)
    wall = {r[0]: r[1] for r in table_after(md, "stage")[1:]}
    assert wall == {"features": "4.5", "train@simple": "1.0", "train@vlb": "1.0",
                    "sample@simple": "2.5", "fid@simple": "2.0",
                    "total of the timed stages": "11.0"}
    # same inputs, same checkout: the same bytes (report.md, report.html, every figure)
    r = run_stage("report", tmp_path, p)
    assert r.returncode == 0, r.stderr
    again = {f.relative_to(tmp_path): f.read_bytes()
             for f in sorted((tmp_path / "reports").rglob("*")) if f.is_file()}
    assert again == first


def test_git_state_unknown_outside_git_and_dirty_names_the_changed_files(tmp_path,
                                                                        monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    outside = tmp_path / "plain"
    outside.mkdir()
    s = provenance.git_state(outside)
    assert s.commit.startswith("unknown: ") and "not a git repository" in s.commit
    assert s.dirty is None and s.dirty_text() == "unknown"
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    assert provenance.git_state(repo).commit.startswith("unknown")  # no commit yet
    (repo / "a.txt").write_text("a\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "a")
    s = provenance.git_state(repo)
    assert s.commit == git(repo, "rev-parse", "HEAD") and s.dirty is False
    (repo / "dvc.lock").write_text("stages: {}\n")  # written by dvc repro itself: not counted
    assert provenance.git_state(repo).dirty is False
    (repo / "a.txt").write_text("b\n")
    (repo / "new file.py").write_text("")
    s = provenance.git_state(repo)
    assert s.dirty is True and s.changed == ("a.txt", "new file.py")
    assert s.dirty_text() == "yes: a.txt, new file.py"
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))  # git not installed
    s = provenance.git_state(repo)
    assert s.commit == "unknown: git not available (FileNotFoundError)" and s.dirty is None


def test_provenance_values_show_as_written_in_markdown_and_html(tmp_path):
    # changed files such as ddpm_core/__init__.py are not Markdown: no bold, no lost underscores
    prov = {"uncommitted changes": "yes: ddpm_core/__init__.py, a*b*.py, <x>|y"}
    md = report.provenance_table(prov)
    assert table_after(md, "provenance")[1][0] == "uncommitted changes"
    page = report.markdown_to_html(md, tmp_path)
    assert "<td>yes: ddpm_core/__init__.py, a*b*.py, &lt;x&gt;|y</td>" in page


def test_report_stage_reports_a_missing_input_in_one_line(tmp_path):
    p = make_outputs(tmp_path)
    (tmp_path / "metrics" / "bpd" / "vlb.json").unlink()
    r = run_stage("report", tmp_path, p)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("error: metrics/bpd/vlb.json")


def test_fid_vs_steps_table_labels_each_sigma2_row_with_its_own_numbers(tmp_path, monkeypatch):
    # every σ² of sample.variances gets its own row; a row labelled σ² = β must hold the β
    # sampler's FID (an analytic sampler's FID once overwrote it)
    from pipeline import report
    from pipeline.records import fid_key

    make_outputs(tmp_path, names=("simple",))
    monkeypatch.chdir(tmp_path)
    res = load_results(load_params(tmp_path / "params.yaml"))
    r = res.variants["simple"]
    extra = [SamplerSpec("ancestral", 10, "analytic"), SamplerSpec("respaced", 2, "analytic"),
             SamplerSpec("respaced", 2, "fixed_small")]
    r.samplers += extra
    r.fid.update({fid_key(s): 100.0 + i for i, s in enumerate(extra)})
    df = report.steps_table(res).loc["simple"]
    assert list(df.index) == ["DDIM η = 0", "ancestral σ² = β", "ancestral σ² = β̃",
                              "ancestral σ² analytic"]
    for title, spec_of in (("ancestral σ² = β", "fixed_large"), ("ancestral σ² = β̃", "fixed_small"),
                           ("ancestral σ² analytic", "analytic")):
        for s in r.samplers:
            if s.variance == spec_of:
                assert df.loc[title, f"S = {s.steps}"] == report._fmt(r.fid_of(s)), (title, s)
    assert df.loc["DDIM η = 0", "S = 2"] == report._fmt(6.0)


# ----------------------------------------------------------------------------- figures and page
# (issue 16: what the page looked like in a browser)

def _figures(tmp_path, monkeypatch, names=("simple", "vlb")):
    """Every figure the report draws on make_outputs' results, by file name (not yet saved)."""
    import matplotlib.pyplot as plt

    p = make_outputs(tmp_path, names=names)
    monkeypatch.chdir(tmp_path)
    params = load_params(tmp_path / "params.yaml")
    res = load_results(params)
    drawn = {}
    save = report.fig_to_file

    def keep(fig, fig_dir, name):
        fig.canvas.draw()
        drawn[name] = fig
        return save(plt.figure(), fig_dir, name)  # fig stays open for the checks

    monkeypatch.setattr(report, "fig_to_file", keep)
    for _, _, draw in report.FIGURES:
        draw(params, res, tmp_path)
    return p, drawn


def test_no_panel_draws_over_another_and_nothing_sticks_out(tmp_path, monkeypatch):
    # the σ²-vs-steps figure's right y-label was drawn on the left panel's frame: each panel's
    # tight box (frame, tick labels, axis labels, title, legend) keeps clear of every other's
    _, drawn = _figures(tmp_path, monkeypatch)
    assert {"sigma2_vs_steps.png", "loss.png", "vlb_terms.png", "fid_vs_steps.png"} <= set(drawn)
    gap = 4.0  # px at the figure's dpi
    for name, fig in drawn.items():
        renderer = fig.canvas.get_renderer()
        boxes = [(a.get_title(), a.get_tightbbox(renderer)) for a in fig.get_axes()]
        for i, (ta, a) in enumerate(boxes):
            for tb, b in boxes[i + 1:]:
                apart = (a.x1 + gap <= b.x0 or b.x1 + gap <= a.x0 or a.y1 + gap <= b.y0
                         or b.y1 + gap <= a.y0)
                assert apart, (name, ta, a.bounds, tb, b.bounds)


def test_loss_panels_say_which_loss_and_its_units(tmp_path, monkeypatch):
    # L_vlb is in bits/dim, L_simple is a mean squared error: one panel per loss kind, each
    # y-axis naming the loss and its unit
    _, drawn = _figures(tmp_path, monkeypatch)
    axes = drawn["loss.png"].get_axes()
    by_title = {a.get_title(): a for a in axes}
    assert len(axes) == 2, list(by_title)
    simple = next(a for t, a in by_title.items() if "L_simple" in t)
    vlb = next(a for t, a in by_title.items() if "L_vlb" in t)
    assert "MSE" in simple.get_ylabel() and "ε" in simple.get_ylabel()
    assert "bits/dim" in vlb.get_ylabel()
    assert all(a.get_xlabel() == "training step" for a in axes)
    # each panel holds the curves of the models trained with that loss, labelled by model
    assert [ln.get_label() for ln in simple.get_lines()] == ["simple"]
    assert [ln.get_label() for ln in vlb.get_lines()] == ["vlb"]
    assert list(vlb.get_lines()[0].get_ydata()) == [1.0, 0.5]  # make_outputs' loss CSV


EXTRA_SPECS = [SamplerSpec("respaced", 2, "analytic", "quadratic"),
               SamplerSpec("respaced", 5, "analytic", "quadratic"),
               SamplerSpec("ddim", 5, None, "quadratic", 0.0)]


def test_grids_show_three_samplers_the_others_in_a_collapsed_section(tmp_path):
    # 15 near-identical grid rows made a 3,000-pixel page: shown are the full chain with σ² = β
    # (DDPM's Algorithm 2) and, at the fewest steps, respaced ancestral with σ² analytic and
    # DDIM; every other grid sits in a <details> section, closed until clicked
    from PIL import Image

    p = make_outputs(tmp_path)
    for name in ("simple", "vlb"):
        index_file = tmp_path / "samples" / name / "index.json"
        index = json.loads(index_file.read_text())
        index["samplers"] += [{**s.to_dict(), "num_samples": 8} for s in EXTRA_SPECS]
        index_file.write_text(json.dumps(index))
        for s in EXTRA_SPECS:
            Image.new("L", (20, 20), 99).save(tmp_path / "grids" / name / f"{s.name}.png")
    r = run_stage("report", tmp_path, p, env={"GIT_CEILING_DIRECTORIES": str(tmp_path.parent)})
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "reports" / "report.md").read_text()
    page = (tmp_path / "reports" / "report.html").read_text()
    grids = [t for t in tables(md, "sampler") if "simple" in t[0]]
    assert len(grids) == 2, len(grids)
    shown, rest = ([row[0] for row in t[1:]] for t in grids)
    every = GRID_SPECS + EXTRA_SPECS
    featured = [GRID_SPECS[0], EXTRA_SPECS[0], GRID_SPECS[3]]  # ancestral β, S = 2 analytic, DDIM
    assert shown == [s.label() for s in every if s in featured]  # in the order sampled
    assert rest == [s.label() for s in every if s not in featured]
    # HTML: the second table inside a closed <details>, after a <summary> that says what is in it
    head, details = page.split("<details>", 1)
    assert page.count("<details>") == 1 and "<details open" not in page
    summary, inside = details.split("</summary>", 1)
    assert summary.startswith("<summary>") and f"{len(rest)} other samplers" in summary
    inside = inside.split("</details>", 1)[0]
    for s in every:
        for name in ("simple", "vlb"):
            link = f'<a href="figures/samples_{name}_{s.name}.png">'
            assert page.count(link) == 1, link
            assert (link in inside) == (s not in featured), link
    assert "<details>" in md and "</details>" in md  # GitHub renders the same section


def test_training_images_beside_the_samples_in_the_same_grid(tmp_path):
    # a reader needs real images to judge samples by: the first grid_size training images
    # (data/prepared/train.npy), drawn as the sample stage draws its grids
    from ddpm_core.data import save_grid

    p = make_outputs(tmp_path)
    train = np.load(tmp_path / "data" / "prepared" / "train.npy")
    r = run_stage("report", tmp_path, p, env={"GIT_CEILING_DIRECTORIES": str(tmp_path.parent)})
    assert r.returncode == 0, r.stderr
    got = tmp_path / "reports" / "figures" / "train_images.png"
    n = p["sample"]["grid_size"]
    save_grid(train, tmp_path / "want.png", n)  # as sample@<v> draws its grids
    assert got.read_bytes() == (tmp_path / "want.png").read_bytes()
    md = (tmp_path / "reports" / "report.md").read_text()
    page = (tmp_path / "reports" / "report.html").read_text()
    f = "figures/train_images.png"
    assert f"[![training images]({f})]({f})" in md
    assert md.index(f) > md.index("## Sample grids") and md.index(f) < md.index("figures/samples_")
    assert f"first {n} images of data/prepared/train.npy" in md
    assert re.search(rf'<a href="{re.escape(f)}"><img src="data:image/png;base64,[^"]+" '
                     r'alt="training images" width="\d+">', page)
    # the report stage depends on the images it draws (and on the grid size)
    import yaml

    stage = yaml.safe_load((report_repo() / "dvc.yaml").read_text())["stages"]["report"]
    assert "data/prepared/train.npy" in stage["deps"] and "sample.grid_size" in stage["params"]
    assert "pipeline/templates" in stage["deps"]  # the report's text and page


def report_repo() -> Path:
    from helpers import REPO

    return REPO


def test_analytic_ddim_rows_and_the_last_sigma_cap_in_the_sampler_tables(tmp_path, monkeypatch):
    """Analytic-DDIM has its own row (its FID, not plain DDIM's) in the FID-vs-steps table and
    in the σ² table beside Analytic-DPM's published DDIM / Analytic-DDIM rows; every sample set
    says its cap on σ of the step to x_τ1, and the text says what the cap is."""
    from pipeline.records import fid_key

    make_outputs(tmp_path, names=("simple",))
    monkeypatch.chdir(tmp_path)
    res = load_results(load_params(tmp_path / "params.yaml"))
    r = res.variants["simple"]
    extra = [SamplerSpec("ddim", 2, "analytic", "trailing", 0.0, 1.0),
             SamplerSpec("respaced", 2, "analytic", "trailing", None, 1.0)]
    r.samplers += extra
    r.fid.update({fid_key(extra[0]): 4.5, fid_key(extra[1]): 8.0})
    df = report.steps_table(res).loc["simple"]
    assert df.loc["Analytic-DDIM η = 0", "S = 2"] == "4.500"
    assert df.loc["DDIM η = 0", "S = 2"] == "6.000"  # make_outputs' ddim_S2
    _, fid = report.sigma2_steps_tables(load_params(tmp_path / "params.yaml"), res)
    rows = {(a, b): row for a, b, row in zip(fid["source"], fid["σ²"],
                                             fid.to_dict("records"), strict=True)}
    assert rows["measured: simple", "Analytic-DDIM η = 0"]["S = 2"] == "4.500"
    assert rows["measured: simple", "DDIM η = 0"]["S = 2"] == "6.000"
    pub = rows["published: Analytic-DPM CIFAR-10 (LS)", "Analytic-DDIM η = 0"]
    assert [pub[f"S = {k}"] for k in (10, 25, 50, 100, 200, 400, 1000)] == [
        "14.00", "5.81", "4.04", "3.55", "3.39", "3.50", "3.74"]
    assert rows["published: Analytic-DPM CIFAR-10 (LS)", "DDIM η = 0"]["S = 10"] == "21.31"
    sets = report.sample_sets_table(res)
    cap = dict(zip(sets["sampler"], sets["σ cap, step to x_τ1"], strict=True))
    assert cap[extra[0].label()] == "≤ 0.0098 (y = 1)"
    assert cap[GRID_SPECS[0].label()] == "none"  # the full chain
    md = report.build_markdown(load_params(tmp_path / "params.yaml"), res, {})
    assert "every respaced (S < T) and DDIM sample set adds noise of std σ ≤ 0.0098 (y = 1): " in md
    assert "use y = 2 with `clip_sigma_idx: 1`). The full T-step chains are DDPM's Algorithm 2, " \
           "uncapped.\n\n" in md


def test_the_bound_beside_the_ode_bits_per_dim_with_the_published_rows(tmp_path):
    # make_outputs: bounds β 2.5 + k, β̃ 3.5 + k, analytic 2.25 + k; ODE 2.125 + k ± 0.0625
    p = make_outputs(tmp_path)
    (tmp_path / "timings" / "nll").mkdir(parents=True)
    (tmp_path / "timings" / "nll" / "simple.json").write_text(json.dumps(
        {"seconds": 4.5, "images": 128, "nfe_mean": {"uniform": 222.0, "variational": 130.0}}))
    vlb = tmp_path / "metrics" / "nll" / "vlb.json"
    vlb.write_text(json.dumps({"vlb": {"nll_ode_bpd": 4.0, "nll_ode_bpd_se": 0.25,
                                       "nll_nfe_mean": 90.0}}))  # above its bound 3.25: "no"
    r = run_stage("report", tmp_path, p, env={"GIT_CEILING_DIRECTORIES": str(tmp_path.parent)})
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "reports" / "report.md").read_text()
    table = table_after(md, "likelihood")
    assert table[0] == ["likelihood", "bound σ² = β", "bound σ² = β̃", "bound σ² analytic",
                        "ODE bits/dim", "ODE bits/dim: NFE (mean)", "ODE, variational deq.",
                        "ODE, variational deq.: NFE (mean)",
                        "ODE < every bound (uniform / variational)"]
    rows = {row[0]: dict(zip(table[0], row, strict=True)) for row in table[1:]}
    simple = rows["measured: simple"]
    assert (simple["bound σ² = β"], simple["bound σ² = β̃"], simple["bound σ² analytic"]) == (
        "2.500", "3.500", "2.250")
    assert simple["ODE bits/dim"] == "2.125 ± 0.062" and simple["ODE bits/dim: NFE (mean)"] == "150"
    assert simple["ODE, variational deq."] == "2.000 ± 0.125"
    assert simple["ODE, variational deq.: NFE (mean)"] == "100"
    assert simple["ODE < every bound (uniform / variational)"] == "yes / yes"
    vlb_row = rows["measured: vlb"]  # the vlb file has no variational numbers: dashes
    assert vlb_row["ODE bits/dim"] == "4.000 ± 0.250" and vlb_row["ODE, variational deq."] == "–"
    assert vlb_row["ODE < every bound (uniform / variational)"] == "no / –"
    pub = {k.removeprefix("published (CIFAR-10): "): v for k, v in rows.items()
           if k.startswith("published")}
    assert pub["Ho et al. 2020: L_simple"]["bound σ² = β"] == "≤ 3.75"
    assert pub["Ho et al. 2020: L, fixed isotropic Σ (L_vlb)"]["bound σ² = β"] == "≤ 3.70"
    assert pub["Song et al. 2021: DDPM (retrained, Ho's architecture)"]["ODE bits/dim"] == "3.28"
    assert pub["Song et al. 2021: DDPM cont. (VP)"]["ODE bits/dim"] == "3.21"
    assert "uniform dequantization" in md and f"rtol {p['nll']['rtol']:g}" in md
    timing = next(ln for ln in md.splitlines() if ln.startswith("| nll@simple"))
    assert "4.5" in timing
    assert "128 test images, mean NFE uniform 222.0, variational 130.0" in timing


def test_a_mu_model_has_no_ode_row_numbers(tmp_path):
    p = make_outputs(tmp_path, names=("simple",))
    (tmp_path / "metrics" / "nll" / "simple.json").write_text(json.dumps({"simple": {}}))
    r = run_stage("report", tmp_path, p, env={"GIT_CEILING_DIRECTORIES": str(tmp_path.parent)})
    assert r.returncode == 0, r.stderr
    table = table_after((tmp_path / "reports" / "report.md").read_text(), "likelihood")
    row = dict(zip(table[0], table[1], strict=True))
    assert row["ODE bits/dim"] == "– (μ model: no ODE)"
    assert row["ODE, variational deq."] == "– (μ model: no ODE)"
    assert row["ODE < every bound (uniform / variational)"] == "– / –"


def test_report_needs_the_nll_metrics(tmp_path):
    p = make_outputs(tmp_path, names=("simple",))
    (tmp_path / "metrics" / "nll" / "simple.json").unlink()
    r = run_stage("report", tmp_path, p, env={"GIT_CEILING_DIRECTORIES": str(tmp_path.parent)})
    assert r.returncode != 0 and "metrics/nll/simple.json: not found" in r.stderr
