"""Stage `report`: reports/report.md (+ reports/figures/*.png) and a self-contained
reports/report.html (images inlined as base64, no script or style from the network).

Contents: every model's bits/dim and FID beside the published CIFAR-10 numbers (labelled
published vs measured, and on which data), FID, KID and IS of every sample set, the DDPM, DDIM
and Analytic-DPM tables, the sample grids side by side (one row per sampler, a thumbnail per
model, linked to the full grid), loss curves, the per-timestep terms of the bound (DDPM Fig. 5
style), FID against the number of sampling steps (DDIM vs respaced ancestral), each stage's wall
time and the provenance (commit, params hash, versions, device: pipeline/provenance.py).

Byte for byte, the report is a function of its inputs, the checkout and the machine, with one
exception: the wall times, read from timings/ (measurements, deliberately not dependencies of
this stage in dvc.yaml), differ between two runs of identical work.
"""

from __future__ import annotations

import base64
import html
import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from ddpm_core.config import Params  # noqa: E402
from pipeline import published  # noqa: E402
from pipeline.common import atomic_dir, run_stage, write_text  # noqa: E402
from pipeline.provenance import provenance  # noqa: E402
from pipeline.records import (  # noqa: E402
    REPORTS_DIR,
    SIGMA2_LABEL,
    SIGMA2_NAME,
    Results,
    SamplerSpec,
    bpd_key,
    load_results,
    wall_seconds,
)

FIG_DIR = REPORTS_DIR / "figures"  # the Markdown cites figures/<name>.png
THUMB_WIDTH = (96, 200)  # px: a sample grid's thumbnail, narrower with more models side by side


def _fmt(x: object, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def summary_table(res: Results) -> pd.DataFrame:
    """One row per variant: final loss, bits/dim per σ², FID of the full ancestral chains;
    then the floor (test split vs train split), which applies to every FID column."""
    label = res.features.label
    rows = []
    for name, r in res.variants.items():
        row = {"model": name, "final training loss": _fmt(r.train.get("final_loss"), 4)}
        for var in SIGMA2_LABEL:
            if bpd_key(var) in r.bpd:
                row[f"bits/dim {SIGMA2_LABEL[var]} (test)"] = _fmt(r.bpd[bpd_key(var)])
        for spec in r.samplers:
            if spec.kind == "ancestral":
                row[f"{label}, ancestral {SIGMA2_LABEL[spec.variance]}"] = _fmt(r.fid_of(spec))
        rows.append(row)
    df = pd.DataFrame(rows).set_index("model")
    floor = {c: (_fmt(res.features.floor["fid"]) if c.startswith(label) else "–")
             for c in df.columns}
    df.loc[f"floor: test split vs train split ({res.features.floor_images} images)"] = floor
    return df.fillna("–")


def _pm(mean: float | None, std: float | None, scale: float = 1.0, digits: int = 2) -> str:
    """'mean ± std' (times scale), '–' when not measured."""
    if mean is None:
        return "–"
    return f"{mean * scale:.{digits}f}" + ("" if std is None else f" ± {std * scale:.{digits}f}")


def sample_sets_table(res: Results) -> pd.DataFrame:
    """FID, KID (x 10³) and IS of every sample set (fid/<v>.json), then the floor. IS needs the
    class probabilities of Inception-v3: 'n/a' for any other feature network."""
    label = res.features.label
    kid_col = label.replace("FID", "KID x 10³", 1)
    inception = res.features.features == "inception"
    is_col = "IS (Inception-v3)" if inception else "IS"
    rows = []
    for name, r in res.variants.items():
        for spec in r.samplers:
            d = r.fid_details.get(spec.name, {})
            rows.append({"model": name, "sampler": spec.label(),
                         "images": str(d.get("images", r.num_samples.get(spec.name, "–"))),
                         label: _fmt(d.get("fid", r.fid_of(spec))),
                         kid_col: _pm(d.get("kid_mean"), d.get("kid_std"), 1e3),
                         is_col: _pm(d.get("isc_mean"), d.get("isc_std")) if inception
                         else "n/a", CAP_COL: _cap(spec)})
    floor = res.features.floor
    rows.append({"model": "floor", "sampler": "test split vs train split",
                 "images": str(res.features.floor_images), label: _fmt(floor.get("fid")),
                 kid_col: _pm(floor.get("kid_mean"), floor.get("kid_std"), 1e3),
                 is_col: _pm(floor.get("isc_mean"), floor.get("isc_std")) if inception
                 else "n/a", CAP_COL: "–"})
    return pd.DataFrame(rows)


CAP_COL = "σ cap, step to x_τ1"


def _cap(spec: SamplerSpec) -> str:
    """'≤ 0.0098 (y = 1)': the cap on σ of the sample set's step to x_τ1 ('none': uncapped)."""
    cap = spec.last_sigma_cap
    return "none" if cap is None else f"≤ {cap:.4f} (y = {spec.last_sigma_cap_y:g})"


def last_sigma_cap_note(res: Results) -> str:
    """One sentence: which sample sets cap σ of the step to x_τ1, at what (from their specs)."""
    caps = sorted({(s.last_sigma_cap_y, _cap(s)) for r in res.variants.values()
                   for s in r.samplers if s.last_sigma_cap_y is not None})
    pub = published.ANALYTIC_DPM_LAST_SIGMA_CAP_Y
    theirs = (f"Analytic-DPM's CIFAR-10 runs, the published rows below, use y = {pub} with "
              "`clip_sigma_idx: 1`")
    if not caps:
        return (f"No sample set caps σ of its step to x_τ1 (`sample.last_sigma_cap_y: null`); "
                f"{theirs}.")
    what = ", ".join(c for _, c in caps)
    return (f"The step to x_τ1 (the last step that adds noise) of every respaced (S < T) and "
            f"DDIM sample set adds noise of std σ {what}: a mean |σ ε| of at most y pixel "
            f"levels (y = `sample.last_sigma_cap_y`, the `clip_pixel` of Analytic-DPM's code; "
            f"{theirs}). The full T-step chains are DDPM's Algorithm 2, uncapped.")


def steps_table(res: Results) -> pd.DataFrame:
    """FID against the number of sampling steps: rows (model, sampler), columns S. One row for
    DDIM and one per ancestral σ² (respaced at S < T, the full chain at S = T)."""
    rows = []
    for name, r in res.variants.items():
        variances = list(dict.fromkeys(s.variance for s in r.samplers if s.kind != "ddim"))
        ddims = list(dict.fromkeys((s.variance, s.eta) for s in r.samplers if s.kind == "ddim"))
        kinds = [("ddim", v, _ddim_title(v, eta)) for v, eta in ddims or [(None, 0.0)]] + [
            ("ancestral", v, f"ancestral {SIGMA2_LABEL[v or '']}") for v in variances]
        for kind, variance, title in kinds:
            row = {"model": name, "sampler": title}
            for spec in r.samplers:
                if (spec.kind == "ddim") == (kind == "ddim") and spec.variance == variance:
                    row[f"S = {spec.steps}"] = r.fid_of(spec)
            rows.append(row)
    df = pd.DataFrame(rows).set_index(["model", "sampler"])
    df = df[sorted(df.columns, key=lambda c: int(c.split("=")[1]))]
    return df.map(_fmt)


def _ddim_title(variance: str | None, eta: float | None) -> str:
    """'DDIM η = 0' or 'Analytic-DDIM η = 0' (DDIM with the analytic σ̂² noise)."""
    return f"{'DDIM' if variance is None else 'Analytic-DDIM'} η = {eta or 0.0:g}"


SIGMA2_COMPARED = ("fixed_large", "fixed_small", "analytic")
_VAR_OF = {v: k for k, v in SIGMA2_NAME.items()}  # bpd/<v>.csv column -> σ² var type


def _by_steps(rows: list[dict[str, str]], first: list[str], last: list[str]) -> pd.DataFrame:
    """Rows with `K = k` / `S = s` columns in increasing k between `first` and `last`."""
    df = pd.DataFrame(rows)
    steps = sorted((c for c in df.columns if c not in first + last),
                   key=lambda c: int(c.split("=")[1]))
    return df[first + steps + last].fillna("–")


def sigma2_steps_tables(params: Params, res: Results) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Bits/dim against K, and FID against S, for σ² = β, β̃, analytic: one row per measured
    variant and σ² (FID: and per DDIM sampler, plain and Analytic-DDIM), then Analytic-DPM's
    published CIFAR-10 (LS) rows (FID: their DDIM and Analytic-DDIM rows too); columns are the
    number of steps (K for the bound, S for sampling) and each row says which spacing it used."""
    label = res.features.label
    bpd_rows, fid_rows = [], []
    for name, r in res.variants.items():
        Ks = sorted({int(k.rsplit("_K", 1)[1]) for k in r.bpd if "_K" in k})
        for var in SIGMA2_COMPARED:
            head = {"source": f"measured: {name}", "σ²": SIGMA2_LABEL[var]}
            bpd = {f"K = {K}": _fmt(r.bpd[bpd_key(var, K)]) for K in Ks
                   if bpd_key(var, K) in r.bpd}
            if bpd:
                bpd_rows.append({**head, **bpd, "spacing": "even"})
            fid = {f"S = {spec.steps}": _fmt(r.fid_of(spec)) for spec in r.samplers
                   if spec.variance == var and spec.kind in ("ancestral", "respaced")}
            if fid:
                fid_rows.append({**head, "metric": label, **fid,
                                 "spacing": params.sample.spacing})
        for variance, eta in dict.fromkeys((s.variance, s.eta) for s in r.samplers
                                           if s.kind == "ddim"):
            fid = {f"S = {spec.steps}": _fmt(r.fid_of(spec)) for spec in r.samplers
                   if spec.kind == "ddim" and (spec.variance, spec.eta) == (variance, eta)}
            fid_rows.append({"source": f"measured: {name}", "σ²": _ddim_title(variance, eta),
                             "metric": label, **fid, "spacing": params.sample.spacing})
    for var in SIGMA2_COMPARED:
        head = {"source": "published: Analytic-DPM CIFAR-10 (LS)", "σ²": SIGMA2_LABEL[var]}
        bpd_rows.append({**head, **{f"K = {K}": _fmt(x, 2) for K, x in
                                    published.ANALYTIC_DPM_BPD[var].items()}, "spacing": "even"})
        fid_rows.append({**head, "metric": "FID (Inception-v3)",
                         **{f"S = {S}": _fmt(x, 2) for S, x in
                            published.ANALYTIC_DPM_FID[var].items()}, "spacing": "even"})
    for kind, fids in published.ANALYTIC_DPM_DDIM_FID.items():
        fid_rows.append({"source": "published: Analytic-DPM CIFAR-10 (LS)",
                         "σ²": _ddim_title(None if kind == "ddim" else "analytic", 0.0),
                         "metric": "FID (Inception-v3)",
                         **{f"S = {S}": _fmt(x, 2) for S, x in fids.items()}, "spacing": "even"})
    return (_by_steps(bpd_rows, ["source", "σ²"], ["spacing"]),
            _by_steps(fid_rows, ["source", "σ²", "metric"], ["spacing"]))


def ddim_table() -> pd.DataFrame:
    """DDIM Table 1 (CIFAR-10 FID): one row per sampler, one column per number of steps S."""
    rows = [{"sampler": name, **{f"S = {S}": _fmt(x, 2) for S, x in fids.items()}}
            for name, fids in published.DDIM_TABLE.items()]
    return pd.DataFrame(rows).set_index("sampler")


def timings_table(res: Results) -> pd.DataFrame:
    """Wall time of every timed stage (timings/), features first, then stage by stage."""
    def work(stage: str, t: dict) -> str:
        if t.get("pretrained"):
            return f"pretrained weights imported ({t['pretrained']})"
        if stage == "train":
            return f"{t.get('steps', '?')} steps" + (
                f", {t['images_per_s']:.0f} images/s" if t.get("images_per_s") else "")
        if stage == "sample":
            return f"{len(t.get('samplers', {}))} sample sets"
        if stage == "bpd":
            return f"{t.get('images', '?')} test images"
        if stage == "fid" and isinstance(t.get("seconds"), dict):
            return f"{len(t['seconds'])} sample sets scored"
        return ""

    rows, total = [], 0.0
    timed = [("features", "features", res.features.timings)] if res.features.timings else []
    timed += [(f"{stage}@{name}", stage, r.timings[stage])
              for stage in ("train", "sample", "bpd", "fid")
              for name, r in res.variants.items() if stage in r.timings]
    for name, stage, t in timed:
        seconds = wall_seconds(t)
        total += seconds or 0.0
        what = work(stage, t) if stage != "features" else ", ".join(
            f"{k.removesuffix('_seconds')} {v:.1f} s" for k, v in t.items()
            if k.endswith("_seconds"))
        rows.append({"stage": name, "wall time (s)": _fmt(seconds, 1), "work": what})
    rows.append({"stage": "total of the timed stages", "wall time (s)": _fmt(total, 1),
                 "work": "prepare, gamma and report are not timed"})
    return pd.DataFrame(rows).set_index("stage")


def grid_rows(res: Results) -> list[str]:
    """The sample grids as a Markdown table: one row per sampler, one column per model; each
    cell a linked image (figures/samples_<model>_<sampler>.png) and its FID."""
    label = res.features.label.split(" (")[0]
    specs: dict[str, SamplerSpec] = {}
    for r in res.variants.values():
        for spec in r.samplers:
            specs.setdefault(spec.name, spec)
    lines = ["| sampler | " + " | ".join(res.variants) + " |",
             "|---|" + "---|" * len(res.variants)]
    for sname, spec in specs.items():
        cells = []
        for name, r in res.variants.items():
            have = next((s for s in r.samplers if s.name == sname), None)
            if have is None:
                cells.append("–")
                continue
            src = f"figures/samples_{name}_{sname}.png"
            cells.append(f"[![{name}: {sname}]({src})]({src}) {label} {_fmt(r.fid_of(have))}")
        lines.append(f"| {spec.label()} | " + " | ".join(cells) + " |")
    return lines


def thumb_width(res: Results) -> int:
    """Thumbnail width in px: 200 for up to four models, narrower beyond (never below 96)."""
    lo, hi = THUMB_WIDTH
    return max(lo, min(hi, 880 // max(1, len(res.variants))))


def sigma2_steps_figure(params: Params, res: Results, fig_dir: Path) -> str | None:
    """Bits/dim vs K and FID vs S, one line per variant and σ² (measured; the published
    Analytic-DPM numbers are in the table beside them, on another scale)."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8))
    drawn = False
    for name, r in res.variants.items():
        for var in SIGMA2_COMPARED:
            ks = sorted(int(k.rsplit("_K", 1)[1]) for k in r.bpd
                        if k.startswith(bpd_key(var) + "_K"))
            if ks:
                a1.plot(ks, [r.bpd[bpd_key(var, K)] for K in ks], "-o",
                        label=f"{name}, {SIGMA2_LABEL[var]}")
                drawn = True
            pts = sorted((s.steps, r.fid_of(s)) for s in r.samplers
                         if s.variance == var and s.kind in ("ancestral", "respaced")
                         and r.fid_of(s) is not None)
            if pts:
                a2.plot(*zip(*pts, strict=True), "-o", label=f"{name}, {SIGMA2_LABEL[var]}")
                drawn = True
    if not drawn:
        plt.close(fig)
        return None
    a1.set(xscale="log", yscale="log", xlabel="steps K (even trajectory)",
           ylabel="bits/dim (test split)", title=f"Measured ({params.data.dataset})")
    a2.set(xscale="log", yscale="log", xlabel=f"sampling steps S ({params.sample.spacing})",
           ylabel=res.features.label, title=f"Measured ({params.data.dataset})")
    a1.legend(fontsize=7)
    a2.legend(fontsize=7)
    return fig_to_file(fig, fig_dir, "sigma2_vs_steps.png")


def fig_to_file(fig: plt.Figure, fig_dir: Path, name: str) -> str:
    """Save a figure into fig_dir; returns its path as the Markdown cites it."""
    path = fig_dir / name
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return f"figures/{name}"


def loss_figure(res: Results, fig_dir: Path) -> str | None:
    curves = {n: df for n, r in res.variants.items()
              if r.paths.loss_csv.is_file() and len(df := pd.read_csv(r.paths.loss_csv))}
    if not curves:
        return None
    fig, axes = plt.subplots(1, len(curves), figsize=(4.5 * len(curves), 3.2), squeeze=False)
    for ax, (n, df) in zip(axes[0], curves.items(), strict=True):
        ax.plot(df["step"], df["loss"])
        ax.set_yscale("log")
        ax.set_title(f"training loss: {n}")
        ax.set_xlabel("step")
    return fig_to_file(fig, fig_dir, "loss.png")


def terms_figure(res: Results, fig_dir: Path) -> str | None:
    tables = {n: pd.read_csv(r.paths.bpd_terms) for n, r in res.variants.items()
              if r.paths.bpd_terms.is_file()}
    if not tables:
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for n, df in tables.items():
        steps = df[df["term"] != "L_T"].sort_values("t")
        for col in df.columns[2:]:
            lab = f"{n}, {SIGMA2_LABEL.get(_VAR_OF.get(col, ''), col)}"
            a1.plot(steps["t"], steps[col], label=lab)
            a2.plot(steps["t"], steps[col].cumsum(), label=lab)
    a1.set_yscale("log")
    a1.set_title("term L_{t-1} of the bound (bits/dim) at step t")
    a2.set_title("cumulative bits/dim, L_0 + ... + L_{t-1}")
    for a in (a1, a2):
        a.set_xlabel("t")
        a.legend(fontsize=7)
    return fig_to_file(fig, fig_dir, "vlb_terms.png")


def steps_figure(res: Results, fig_dir: Path) -> str | None:
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    drawn = False
    for name, r in res.variants.items():
        df = pd.read_csv(r.paths.fid_steps) if r.paths.fid_steps.is_file() else None
        if df is None:
            continue
        for col, style, what in (("ddim", "-o", "DDIM η=0"), ("respaced", "--s",
                                                             "ancestral σ²=β")):
            pts = df[["steps", col]].dropna()
            if len(pts):
                ax.plot(pts["steps"], pts[col], style, label=f"{name}: {what}")
                drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.axhline(res.features.floor["fid"], color="grey", lw=0.8, label="floor (test vs train)")
    ax.set_xscale("log")
    ax.set_xlabel("sampling steps S")
    ax.set_ylabel(res.features.label)
    ax.set_title("FID vs number of sampling steps")
    ax.legend(fontsize=7)
    return fig_to_file(fig, fig_dir, "fid_vs_steps.png")


def build_markdown(params: Params, res: Results, figures: dict[str, str | None],
                   prov: dict[str, str] | None = None) -> str:
    label = res.features.label
    feats = res.features
    p = params
    summary = summary_table(res)
    steps = steps_table(res)
    sigma2_bpd, sigma2_fid = sigma2_steps_tables(p, res)
    inception = feats.features == "inception"
    md = [
        "# DDPM reproduction report",
        "",
        f"**Measured** on `{p.data.dataset}` (this run): schedule `{p.schedule}`, "
        f"T = {p.diffusion.timesteps}, U-Net preset `{p.model.preset}`, "
        f"{p.train.steps} training steps at batch {p.train.batch_size}, "
        f"{p.sample.num_samples} samples per sampler, bits/dim on the test split. "
        f"FID is **{label}** against the training split "
        f"({feats.reference_images} images)"
        + (f"; the classifier's test accuracy is {feats.classifier_test_accuracy:.3f}"
           if feats.classifier_test_accuracy is not None else "")
        + ". The floor row is the test split scored against the training split: no model can "
          "be expected to beat it with this many images.",
        "",
        f"## Measured on `{p.data.dataset}`: bits/dim and {label} per model",
        "",
        summary.to_markdown(disable_numparse=True),
        "",
        "## Measured: FID, KID and IS of every sample set",
        "",
        f"KID (x 10³, mean ± std over {p.fid.kid_subset_size}-image subsets) uses the same "
        "features as FID and, unlike FID, is unbiased in the number of images. "
        + ("IS: Inception-v3 class probabilities of the samples." if inception else
           "IS is n/a: it needs Inception-v3's class probabilities, and these features are "
           f"another network's ({label.split('(')[-1].rstrip(')')})."),
        "",
        sample_sets_table(res).to_markdown(index=False, disable_numparse=True),
        "",
        last_sigma_cap_note(res),
        "",
        f"{label} against the number of sampling steps (T = {p.diffusion.timesteps} is the "
        "full chain):",
        "",
        steps.reset_index().to_markdown(index=False, disable_numparse=True),
        "",
        "## σ² = β, β̃, analytic against the number of steps (Analytic-DPM Tables 1-2 layout)",
        "",
        "Measured rows: bits/dim of the K-step chains on the even trajectory (K = T is the full "
        f"chain), {label} of the full and respaced ancestral chains and of DDIM and "
        f"Analytic-DDIM ({p.sample.spacing} spacing). "
        f"Published rows: {published.ANALYTIC_DPM_SOURCE}; context only (another data set, "
        "scale and feature network).",
        "",
        f"Bits/dim against the number of steps K (measured: {p.data.dataset} test split; "
        "published: CIFAR-10 test set):",
        "",
        sigma2_bpd.to_markdown(index=False, disable_numparse=True),
        "",
        "FID against the number of sampling steps S (the metric column says which FID; DDIM "
        "rows: Analytic-DDIM adds σ̂² noise at η = 0, plain DDIM none):",
        "",
        sigma2_fid.to_markdown(index=False, disable_numparse=True),
        "",
        f"## Published: {published.SOURCE}",
        "",
        "Context only: these are CIFAR-10 numbers at full scale, not measured on "
        f"`{p.data.dataset}`; an Inception FID and a {label} are different quantities.",
        "",
        "DDPM Table 1:",
        "",
        pd.DataFrame(published.TABLE1).set_index("model").to_markdown(),
        "",
        "DDPM Table 2 (IS / FID):",
        "",
        pd.DataFrame(published.TABLE2).set_index("parameterisation").to_markdown(),
        "",
        f"{published.DDIM_SOURCE} (FID; S steps of T = 1000). {published.DDIM_NOTE}",
        "",
        ddim_table().to_markdown(disable_numparse=True),
        "",
        "## Sample grids",
        "",
        f"One row per sampler, one column per model; the first {p.sample.grid_size} images "
        "of each sample set (click a thumbnail for the full grid).",
        "",
        *grid_rows(res),
        "",
    ]
    for title, key in (("Loss curves", "loss"), ("Per-timestep terms of the bound (DDPM Fig. 5 "
                                                  "style)", "terms"),
                       ("FID vs number of sampling steps: DDIM vs respaced ancestral", "steps"),
                       ("Bits/dim vs K and FID vs S for σ² = β, β̃, analytic (measured)",
                        "sigma2_steps")):
        if figures.get(key) is not None:
            md += [f"## {title}", "", f"![{key}]({figures[key]})", ""]
    md += [
        "## Wall time per stage",
        "",
        "Measured by the runs that wrote these results (timings/). Timings are measurements, "
        "not inputs of this report: a stage DVC restored from its cache, or re-ran on identical "
        "work, keeps the time of the run that first wrote it here.",
        "",
        timings_table(res).to_markdown(disable_numparse=True),
        "",
    ]
    if prov is not None:
        md += [
            "## Provenance",
            "",
            "The checkout and machine that wrote this report (DVC reruns the report only when "
            "its inputs change, and may restore one written at an earlier commit with the same "
            "inputs). Uncommitted changes leave out dvc.lock, which `dvc repro` rewrites; under "
            "`dvc exp run` the commit is the experiment's baseline and its changed params show "
            "as modified files.",
            "",
            pd.DataFrame({"provenance": list(prov), "value": list(prov.values())}).to_markdown(
                index=False, disable_numparse=True),
            "",
        ]
    return "\n".join(md) + "\n"


_NUM = r"[-+]?\d[\d,]*(\.\d+)?"
_NUMBER = re.compile(rf"{_NUM}( ± {_NUM})?|–|n/a")  # right-aligned table cells (not 3.11.7)


def inline_text(line: str) -> str:
    """Escaped text with **bold** and `code`."""
    text = html.escape(line)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


_LINKED_IMAGE = re.compile(r"\[!\[([^\]]*)\]\(([^)]+)\)\]\(([^)]+)\)")


def _inline(path: str, fig_dir: Path) -> str:
    """A figure of fig_dir as a data: URL (the page loads nothing from elsewhere)."""
    data = base64.b64encode((fig_dir / Path(path).name).read_bytes()).decode()
    return f"data:image/png;base64,{data}"


def markdown_to_html(md: str, fig_dir: Path, thumb: int = THUMB_WIDTH[1]) -> str:
    """A small converter for exactly what build_markdown writes (headings, tables, images);
    images `figures/x.png` are read from fig_dir and inlined as base64. A linked image in a table
    cell, `[![alt](figures/x.png)](figures/x.png) text`, becomes a `thumb`-pixel thumbnail
    linking to the full-size file beside the report."""
    out, table = [], []

    def cell(c: str, tag: str) -> str:
        m = _LINKED_IMAGE.match(c)
        if not m:
            num = ' class="n"' if tag == "td" and _NUMBER.fullmatch(c) else ""
            return f"<{tag}{num}>{html.escape(c)}</{tag}>"
        alt, src, href = m.groups()
        rest = c[m.end():].strip()
        return (f'<{tag} class="thumb"><a href="{html.escape(href)}"><img alt="{html.escape(alt)}" '
                f'width="{thumb}" src="{_inline(src, fig_dir)}"></a>'
                + html.escape(rest) + f"</{tag}>")  # the image is a block: text below

    def flush() -> None:
        if not table:
            return
        rows = [[c.strip() for c in r.strip().strip("|").split("|")] for r in table
                if not re.fullmatch(r"\|?[\s:|-]+\|?", r.strip())]
        head, body = rows[0], rows[1:]
        grids = any(_LINKED_IMAGE.match(c) for r in body for c in r)
        out.append('<div class="scroll"><table' + (' class="grids"' if grids else "")
                   + '><thead><tr>'
                   + "".join(cell(c, "th") for c in head) + "</tr></thead><tbody>"
                   + "".join("<tr>" + "".join(cell(c, "td") for c in r) + "</tr>" for r in body)
                   + "</tbody></table></div>")
        table.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if m := re.fullmatch(r"(#+) (.*)", line):
            n = len(m.group(1))
            out.append(f"<h{n}>{inline_text(m.group(2))}</h{n}>")
        elif m := re.fullmatch(r"!\[(.*)\]\((.*)\)", line):
            out.append(f'<p><img alt="{html.escape(m.group(1))}" '
                       f'src="{_inline(m.group(2), fig_dir)}"></p>')
        elif line.strip():
            out.append(f"<p>{inline_text(line)}</p>")
    flush()
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             ".scroll{overflow-x:auto}"
             "table{border-collapse:collapse;font-size:13px;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}"
             "td.n{text-align:right;white-space:nowrap}"
             "th{background:#f3f3f3}img{max-width:100%;image-rendering:pixelated}"
             ".grids th{text-align:center}"
             "td.thumb{text-align:center;vertical-align:top;font-size:12px}"
             "td.thumb img{display:block;margin:0 auto 2px;border:1px solid #ddd;"
             "image-rendering:auto}")
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>DDPM reproduction "
            f"report</title><style>{style}</style></head><body>\n" + "\n".join(out)
            + "\n</body></html>\n")


def main(params: Params) -> None:
    res = load_results(params)
    with atomic_dir(FIG_DIR) as tmp_fig:
        for name, r in res.variants.items():
            for spec in r.samplers:
                src = r.paths.grids / f"{spec.name}.png"
                (tmp_fig / f"samples_{name}_{spec.name}.png").write_bytes(src.read_bytes())
        figures = {"loss": loss_figure(res, tmp_fig), "terms": terms_figure(res, tmp_fig),
                   "steps": steps_figure(res, tmp_fig),
                   "sigma2_steps": sigma2_steps_figure(params, res, tmp_fig)}
        md = build_markdown(params, res, figures, provenance(params))
        page = markdown_to_html(md, tmp_fig, thumb_width(res))
    write_text(md, REPORTS_DIR / "report.md")
    write_text(page, REPORTS_DIR / "report.html")
    print(f"report: {REPORTS_DIR / 'report.md'}, {REPORTS_DIR / 'report.html'}")


if __name__ == "__main__":
    run_stage(main)
