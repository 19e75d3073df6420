"""Stage `report`: reports/report.md (+ reports/figures/*.png) and a self-contained
reports/report.html (images inlined as base64, no script or style from the network).

Contents: every model's bits/dim and FID beside the published CIFAR-10 numbers (labelled
published vs measured, and on which data), sample grids, loss curves, the per-timestep terms of
the bound (DDPM Fig. 5 style) and FID against the number of sampling steps (DDIM vs respaced
ancestral).
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
from pipeline.records import (  # noqa: E402
    REPORTS_DIR,
    SIGMA2_LABEL,
    Results,
    bpd_key,
    load_results,
)

FIG_DIR = REPORTS_DIR / "figures"  # the Markdown cites figures/<name>.png


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


def steps_table(res: Results) -> pd.DataFrame:
    """FID against the number of sampling steps: rows (model, sampler), columns S."""
    rows = []
    for name, r in res.variants.items():
        for kind, title in (("ddim", "DDIM η = 0"), ("respaced", "ancestral σ² = β (respaced)")):
            row = {"model": name, "sampler": title}
            for spec in r.samplers:
                if spec.kind == "ddim" and kind == "ddim" or (
                        kind == "respaced" and spec.kind in ("respaced", "ancestral")
                        and spec.variance != "fixed_small"):
                    row[f"S = {spec.steps}"] = r.fid_of(spec)
            rows.append(row)
    df = pd.DataFrame(rows).set_index(["model", "sampler"])
    df = df[sorted(df.columns, key=lambda c: int(c.split("=")[1]))]
    return df.map(_fmt)


SIGMA2_COMPARED = ("fixed_large", "fixed_small", "analytic")


def sigma2_steps_table(params: Params, res: Results) -> pd.DataFrame:
    """Bits/dim against K and FID against S for σ² = β, β̃, analytic: one row per measured
    variant and σ², then Analytic-DPM's published CIFAR-10 (LS) rows, each row saying which
    spacing it used (bits/dim: even trajectory; FID: sample.spacing)."""
    label = res.features.label
    rows = []
    for name, r in res.variants.items():
        Ks = sorted({int(k.rsplit("_K", 1)[1]) for k in r.bpd if "_K" in k})
        for var in SIGMA2_COMPARED:
            row: dict[str, str] = {"source": f"measured: {name}", "σ²": SIGMA2_LABEL[var]}
            for K in Ks:
                row[f"bits/dim K={K}"] = _fmt(r.bpd.get(bpd_key(var, K)))
            for spec in r.samplers:
                if spec.variance == var and spec.kind in ("ancestral", "respaced"):
                    row[f"{label} S={spec.steps}"] = _fmt(r.fid_of(spec))
            row["spacing (bits/dim; FID)"] = f"even; {params.sample.spacing}"
            if len(row) > 3:
                rows.append(row)
    for var in SIGMA2_COMPARED:
        row = {"source": "published: Analytic-DPM CIFAR-10 (LS)", "σ²": SIGMA2_LABEL[var]}
        row.update({f"bits/dim K={K}": _fmt(x, 2)
                    for K, x in published.ANALYTIC_DPM_BPD[var].items()})
        row.update({f"Inception FID S={K}": _fmt(x, 2)
                    for K, x in published.ANALYTIC_DPM_FID[var].items()})
        row["spacing (bits/dim; FID)"] = "even; even"
        rows.append(row)
    return pd.DataFrame(rows).fillna("–")


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
            lab = f"{n}, {col.replace('sigma2_beta_tilde', 'σ²=β̃').replace('sigma2_beta', 'σ²=β')}"
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


def build_markdown(params: Params, res: Results, figures: dict[str, str | None]) -> str:
    label = res.features.label
    feats = res.features
    p = params
    summary = summary_table(res)
    steps = steps_table(res)
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
        f"{label} against the number of sampling steps (T = {p.diffusion.timesteps} is the "
        "full chain):",
        "",
        steps.reset_index().to_markdown(index=False, disable_numparse=True),
        "",
        "## σ² = β, β̃, analytic against the number of steps (Analytic-DPM Tables 1-2 layout)",
        "",
        "Measured rows: bits/dim of the K-step chains on the even trajectory (K = T is the full "
        f"chain), {label} of the full and respaced ancestral chains ({p.sample.spacing} spacing). "
        f"Published rows: {published.ANALYTIC_DPM_SOURCE}; context only (another data set, "
        "scale and feature network).",
        "",
        sigma2_steps_table(p, res).to_markdown(index=False, disable_numparse=True),
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
        "DDIM paper, CIFAR-10 FID vs steps (quadratic spacing): "
        + ", ".join(f"S={s}: DDIM η=0 {published.DDIM_ETA0[s]}, ancestral σ²=β "
                    f"{published.DDPM_RESPACED[s]}" for s in published.DDIM_ETA0),
        "",
        "## Sample grids",
        "",
    ]
    for name, r in res.variants.items():
        md += [f"### {name}", ""]
        for spec in r.samplers:
            if spec.kind == "respaced":
                continue
            grid = f"figures/samples_{name}_{spec.name}.png"
            md += [f"**{spec.label()}** ({label} {_fmt(r.fid_of(spec))})", "",
                   f"![{name} {spec.name}]({grid})", ""]
    for title, key in (("Loss curves", "loss"), ("Per-timestep terms of the bound (DDPM Fig. 5 "
                                                  "style)", "terms"),
                       ("FID vs number of sampling steps: DDIM vs respaced ancestral", "steps"),
                       ("Bits/dim vs K and FID vs S for σ² = β, β̃, analytic (measured)",
                        "sigma2_steps")):
        if figures.get(key) is not None:
            md += [f"## {title}", "", f"![{key}]({figures[key]})", ""]
    return "\n".join(md) + "\n"


def markdown_to_html(md: str, fig_dir: Path) -> str:
    """A small converter for exactly what build_markdown writes (headings, tables, images);
    images `figures/x.png` are read from fig_dir and inlined as base64."""
    out, table = [], []

    def flush() -> None:
        if not table:
            return
        rows = [[c.strip() for c in r.strip().strip("|").split("|")] for r in table
                if not re.fullmatch(r"\|?[\s:|-]+\|?", r.strip())]
        head, body = rows[0], rows[1:]
        out.append("<table><thead><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head)
                   + "</tr></thead><tbody>" + "".join(
                       "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
                       for r in body) + "</tbody></table>")
        table.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if m := re.fullmatch(r"(#+) (.*)", line):
            n = len(m.group(1))
            out.append(f"<h{n}>{html.escape(m.group(2))}</h{n}>")
        elif m := re.fullmatch(r"!\[(.*)\]\((.*)\)", line):
            data = base64.b64encode((fig_dir / Path(m.group(2)).name).read_bytes()).decode()
            out.append(f'<p><img alt="{html.escape(m.group(1))}" '
                       f'src="data:image/png;base64,{data}"></p>')
        elif line.strip():
            text = html.escape(line)
            text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
            text = re.sub(r"`(.+?)`", r"<code>\1</code>", text)
            out.append(f"<p>{text}</p>")
    flush()
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;font-size:13px;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}"
             "th{background:#f3f3f3}img{max-width:100%;image-rendering:pixelated}")
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
        md = build_markdown(params, res, figures)
        page = markdown_to_html(md, tmp_fig)
    write_text(md, REPORTS_DIR / "report.md")
    write_text(page, REPORTS_DIR / "report.html")
    print(f"report: {REPORTS_DIR / 'report.md'}, {REPORTS_DIR / 'report.html'}")


if __name__ == "__main__":
    run_stage(main)
