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
from pipeline.common import (  # noqa: E402
    BPD_DIR,
    FID_DIR,
    METRICS_DIR,
    PLOTS_DIR,
    REPORTS_DIR,
    SAMPLES_DIR,
    SIGMA2_LABEL,
    SIGMA2_NAME,
    atomic_dir,
    read_json,
    run_stage,
    write_text,
)

FIG_DIR = REPORTS_DIR / "figures"  # the Markdown cites figures/<name>.png


def _fmt(x: object, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def sampler_label(spec: dict) -> str:
    """Human name of a sampler entry of samples/index.json."""
    if spec["kind"] == "ancestral":
        return f"ancestral {SIGMA2_LABEL[spec['variance']]}, {spec['steps']} steps"
    if spec["kind"] == "respaced":
        return f"respaced ancestral {SIGMA2_LABEL[spec['variance']]}, {spec['steps']} steps"
    return f"DDIM η = {spec.get('eta', 0.0):g}, {spec['steps']} steps"


def summary_table(index: dict, train: dict, bpd: dict, fid: dict, details: dict,
                  label: str) -> pd.DataFrame:
    """One row per model: final loss, bits/dim per σ², FID of the full ancestral chains;
    then the floor (test split vs train split), which applies to every FID column."""
    rows = []
    for name, entry in index.items():
        row = {"model": name, "final training loss": _fmt(train.get(name, {}).get("final_loss"),
                                                          4)}
        for var, key in SIGMA2_NAME.items():
            if f"bpd_{key}" in bpd.get(name, {}):
                row[f"bits/dim {SIGMA2_LABEL[var]} (test)"] = _fmt(bpd[name][f"bpd_{key}"])
        for sampler, spec in entry["samplers"].items():
            if spec["kind"] == "ancestral":
                row[f"{label}, ancestral {SIGMA2_LABEL[spec['variance']]}"] = _fmt(
                    fid.get(name, {}).get(sampler))
        rows.append(row)
    df = pd.DataFrame(rows).set_index("model")
    floor = {c: (_fmt(fid.get("floor_test_vs_train")) if c.startswith(label) else "–")
             for c in df.columns}
    df.loc[f"floor: test split vs train split ({details['floor']['images']} images)"] = floor
    return df.fillna("–")


def steps_table(index: dict, fid: dict) -> pd.DataFrame:
    """FID against the number of sampling steps: rows (model, sampler), columns S."""
    rows = []
    for name, entry in index.items():
        for kind, title in (("ddim", "DDIM η = 0"), ("respaced", "ancestral σ² = β (respaced)")):
            row = {"model": name, "sampler": title}
            for sampler, spec in entry["samplers"].items():
                if spec["kind"] == kind or (kind == "respaced" and spec["kind"] == "ancestral"
                                            and spec["variance"] == "fixed_large"):
                    row[f"S = {spec['steps']}"] = fid.get(name, {}).get(sampler)
            rows.append(row)
    df = pd.DataFrame(rows).set_index(["model", "sampler"])
    df = df[sorted(df.columns, key=lambda c: int(c.split("=")[1]))]
    return df.map(_fmt)


def fig_to_file(fig: plt.Figure, fig_dir: Path, name: str) -> str:
    """Save a figure into fig_dir; returns its path as the Markdown cites it."""
    path = fig_dir / name
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return f"figures/{name}"


def loss_figure(names: list[str], fig_dir: Path) -> str | None:
    curves = {n: pd.read_csv(PLOTS_DIR / "loss" / f"{n}.csv") for n in names
              if (PLOTS_DIR / "loss" / f"{n}.csv").is_file()}
    if not curves:
        return None
    fig, axes = plt.subplots(1, len(curves), figsize=(4.5 * len(curves), 3.2), squeeze=False)
    for ax, (n, df) in zip(axes[0], curves.items(), strict=True):
        ax.plot(df["step"], df["loss"])
        ax.set_yscale("log")
        ax.set_title(f"training loss: {n}")
        ax.set_xlabel("step")
    return fig_to_file(fig, fig_dir, "loss.png")


def terms_figure(names: list[str], fig_dir: Path) -> str | None:
    tables = {n: pd.read_csv(BPD_DIR / f"{n}.csv") for n in names
              if (BPD_DIR / f"{n}.csv").is_file()}
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


def steps_figure(index: dict, fid: dict, label: str, fig_dir: Path) -> str | None:
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    drawn = False
    for name, entry in index.items():
        for kind, style in (("ddim", "-o"), ("respaced", "--s")):
            pts = sorted((s["steps"], fid.get(name, {}).get(k))
                         for k, s in entry["samplers"].items() if s["kind"] == kind)
            pts = [p for p in pts if p[1] is not None]
            full = [(s["steps"], fid.get(name, {}).get(k)) for k, s in entry["samplers"].items()
                    if s["kind"] == "ancestral" and s["variance"] == "fixed_large"]
            if kind == "respaced":
                pts = sorted(pts + [p for p in full if p[1] is not None])
            if pts:
                ax.plot(*zip(*pts, strict=True), style,
                        label=f"{name}: {'DDIM η=0' if kind == 'ddim' else 'ancestral σ²=β'}")
                drawn = True
    if not drawn:
        plt.close(fig)
        return None
    if "floor_test_vs_train" in fid:
        ax.axhline(fid["floor_test_vs_train"], color="grey", lw=0.8, label="floor (test vs train)")
    ax.set_xscale("log")
    ax.set_xlabel("sampling steps S")
    ax.set_ylabel(label)
    ax.set_title("FID vs number of sampling steps")
    ax.legend(fontsize=7)
    return fig_to_file(fig, fig_dir, "fid_vs_steps.png")


def build_markdown(params: Params, index: dict, train: dict, bpd: dict, fid: dict,
                   details: dict, figures: dict[str, str | None]) -> str:
    label = details["label"]
    p = params
    summary = summary_table(index, train, bpd, fid, details, label)
    steps = steps_table(index, fid)
    md = [
        "# DDPM reproduction report",
        "",
        f"**Measured** on `{p.data.dataset}` (this run): schedule `{p.schedule}`, "
        f"T = {p.diffusion.timesteps}, U-Net preset `{p.model.preset}`, "
        f"{p.train.steps} training steps at batch {p.train.batch_size}, "
        f"{p.sample.num_samples} samples per sampler, bits/dim on the test split. "
        f"FID is **{label}** against the training split "
        f"({details.get('reference_images')} images)"
        + (f"; the classifier's test accuracy is {details['classifier_test_accuracy']:.3f}"
           if "classifier_test_accuracy" in details else "")
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
    for name, entry in index.items():
        md += [f"### {name}", ""]
        for sampler, spec in entry["samplers"].items():
            if spec["kind"] == "respaced":
                continue
            grid = f"figures/samples_{name}_{sampler}.png"
            md += [f"**{sampler_label(spec)}** ({label} "
                   f"{_fmt(fid.get(name, {}).get(sampler))})", "",
                   f"![{name} {sampler}]({grid})", ""]
    for title, key in (("Loss curves", "loss"), ("Per-timestep terms of the bound (DDPM Fig. 5 "
                                                  "style)", "terms"),
                       ("FID vs number of sampling steps: DDIM vs respaced ancestral", "steps")):
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
    train = read_json(METRICS_DIR / "train.json")
    bpd = read_json(METRICS_DIR / "bpd.json")
    fid_all = read_json(METRICS_DIR / "fid.json")
    fid = next(iter(fid_all.values()))
    details = read_json(FID_DIR / "details.json")
    index = read_json(SAMPLES_DIR / "index.json")
    names = list(index)
    with atomic_dir(FIG_DIR) as tmp_fig:
        for name, entry in index.items():
            for sampler in entry["samplers"]:
                src = SAMPLES_DIR / name / f"{sampler}.png"
                (tmp_fig / f"samples_{name}_{sampler}.png").write_bytes(src.read_bytes())
        figures = {"loss": loss_figure(names, tmp_fig), "terms": terms_figure(names, tmp_fig),
                   "steps": steps_figure(index, fid, details["label"], tmp_fig)}
        md = build_markdown(params, index, train, bpd, fid, details, figures)
        page = markdown_to_html(md, tmp_fig)
    write_text(md, REPORTS_DIR / "report.md")
    write_text(page, REPORTS_DIR / "report.html")
    print(f"report: {REPORTS_DIR / 'report.md'}, {REPORTS_DIR / 'report.html'}")


if __name__ == "__main__":
    run_stage(main)
