"""Stage `report`: reports/report.md (+ reports/figures/*.png) and a self-contained
reports/report.html (images inlined as base64, no script or style from the network). This
module builds the tables and figures; templates/report.md.jinja holds the text and the order.

Byte for byte, the report is a function of its inputs, the checkout and the machine, with one
exception: the wall times, read from timings/ (measurements, deliberately not dependencies of
this stage in dvc.yaml), differ between two runs of identical work.
"""

from __future__ import annotations

import base64
import math
import re
from pathlib import Path

import jinja2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from markdown_it import MarkdownIt  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogFormatter, NullLocator  # noqa: E402

from ddpm_core.data import load_images, save_grid  # noqa: E402
from ddpm_core.modes import HEAD_KINDS, SIGMA2_MODES  # noqa: E402
from pipeline import published  # noqa: E402
from pipeline.common import atomic_dir, run_stage, write_text  # noqa: E402
from pipeline.params import Params  # noqa: E402
from pipeline.provenance import provenance  # noqa: E402
from pipeline.records import (  # noqa: E402
    DATA_DIR,
    FINAL_LOSS,
    NLL_KEYS,
    REPORTS_DIR,
    TIMED_STAGES,
    Results,
    SamplerSpec,
    VariantResults,
    bpd_key,
    ddim_title,
    load_results,
    wall_seconds,
)

FIG_DIR = REPORTS_DIR / "figures"  # the Markdown cites figures/<name>.png
THUMB_WIDTH = (96, 200)  # px: a sample grid's thumbnail, narrower with more models side by side
TRAIN_GRID = "train_images.png"  # figures/: the first sample.grid_size training images


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
        row = {"model": name, "final training loss": _fmt(r.train.get(FINAL_LOSS), 4)}
        for var, mode in SIGMA2_MODES.items():
            if bpd_key(var) in r.bpd:
                row[f"bits/dim {mode.label} (test)"] = _fmt(r.bpd[bpd_key(var)])
        for spec in r.samplers:
            if spec.kind == "ancestral":
                row[f"{label}, ancestral {_label(spec.variance)}"] = _fmt(r.fid_of(spec))
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

    def scores(d: dict, fid: float | None) -> dict[str, str]:
        return {label: _fmt(fid), kid_col: _pm(d.get("kid_mean"), d.get("kid_std"), 1e3),
                is_col: _pm(d.get("isc_mean"), d.get("isc_std")) if inception else "n/a"}

    rows = []
    for name, r in res.variants.items():
        for spec in r.samplers:
            d = r.fid_details.get(spec.name, {})
            rows.append({"model": name, "sampler": spec.label(),
                         "images": str(d.get("images", r.num_samples.get(spec.name, "–"))),
                         **scores(d, d.get("fid", r.fid_of(spec))), CAP_COL: _cap(spec)})
    floor = res.features.floor
    rows.append({"model": "floor", "sampler": "test split vs train split",
                 "images": str(res.features.floor_images), **scores(floor, floor.get("fid")),
                 CAP_COL: "–"})
    return pd.DataFrame(rows)


CAP_COL = "σ cap, step to x_τ1"


def _cap(spec: SamplerSpec) -> str:
    """'≤ 0.0098 (y = 1)': the cap on σ of the sample set's step to x_τ1 ('none': uncapped)."""
    cap = spec.last_sigma_cap
    return "none" if cap is None else f"≤ {cap:.4f} (y = {spec.last_sigma_cap_y:g})"


def steps_table(res: Results) -> pd.DataFrame:
    """FID against the number of sampling steps: rows (model, sampler), columns S. One row for
    DDIM and one per ancestral σ² (respaced at S < T, the full chain at S = T)."""
    rows = []
    for name, r in res.variants.items():
        ddim, ancestral = _fid_against_steps(r)
        lines = {**(ddim or {ddim_title(None, 0.0): {}}),
                 **{f"ancestral {_label(v)}": fids for v, fids in ancestral.items()}}
        rows += [{"model": name, "sampler": title, **_at_steps("S", fids)}
                 for title, fids in lines.items()]
    return _by_steps(rows, ["model", "sampler"], []).set_index(["model", "sampler"])


def _fid_against_steps(r: VariantResults) -> tuple[dict, dict]:
    """One variant's FID by number of steps S: {DDIM title: {S: FID}}, one per DDIM sampler
    (plain or Analytic-DDIM, per η), and {σ²: {S: FID}}, one per ancestral σ² (respaced at
    S < T, the full chain at S = T); in the order sampled."""
    ddim: dict[str, dict[int, float | None]] = {}
    ancestral: dict[str | None, dict[int, float | None]] = {}
    for s in r.samplers:
        if s.kind == "ddim":
            ddim.setdefault(ddim_title(s.variance, s.eta), {})[s.steps] = r.fid_of(s)
        else:
            ancestral.setdefault(s.variance, {})[s.steps] = r.fid_of(s)
    return ddim, ancestral


def _bpd_against_steps(r: VariantResults, var: str) -> dict[int, float]:
    """One variant's bits/dim of the K-step chains with σ² `var`, by K (increasing)."""
    stem = bpd_key(var) + "_K"  # type: ignore[arg-type]
    return dict(sorted((int(k.removeprefix(stem)), v) for k, v in r.bpd.items()
                       if k.startswith(stem)))


def _at_steps(letter: str, values: dict[int, float | None], digits: int = 3) -> dict[str, str]:
    """Numbers by number of steps as table cells: {"S = 10": "13.360", ...}."""
    return {f"{letter} = {k}": _fmt(x, digits) for k, x in values.items()}


def _label(var: str | None) -> str:
    """The table label of a σ² (σ² = β, ...)."""
    return SIGMA2_MODES[var].label  # type: ignore[index]


# the σ² of the σ²-against-steps tables and figures: those of Analytic-DPM's published tables
# (β, β̃, analytic), then Bao et al. 2022b's heads (NPR, SN)
SIGMA2_COMPARED = (*(v for v in SIGMA2_MODES if v in published.ANALYTIC_DPM_BPD), *HEAD_KINDS)
_VAR_OF = {m.key: var for var, m in SIGMA2_MODES.items()}  # bpd/<v>.csv column -> σ²


def _by_steps(rows: list[dict[str, str]], first: list[str], last: list[str]) -> pd.DataFrame:
    """Rows with `K = k` / `S = s` columns in increasing k between `first` and `last`."""
    df = pd.DataFrame(rows)
    steps = sorted((c for c in df.columns if c not in first + last),
                   key=lambda c: int(c.split("=")[1]))
    return df[first + steps + last].fillna("–")


def sigma2_steps_tables(params: Params, res: Results) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Bits/dim against K, and FID against S, for σ² = β, β̃, analytic, NPR, SN: one row per
    measured variant and σ² (FID: and per DDIM sampler, plain, Analytic-, NPR- and SN-DDIM),
    then Analytic-DPM's published CIFAR-10 (LS) rows (FID: their DDIM and Analytic-DDIM rows
    too) and Bao et al. 2022b's NPR bits/dim and SN-DDIM FID as issue 20 gives them (labelled
    unchecked); columns are the number of steps (K for the bound, S for sampling) and each row
    says which spacing it used."""
    bpd_rows, fid_rows = [], []
    for name, r in res.variants.items():
        measured = {"source": f"measured: {name}", "metric": res.features.label,
                    "spacing": params.sample.spacing}
        ddim, ancestral = _fid_against_steps(r)
        for var in SIGMA2_COMPARED:
            if bpd := _bpd_against_steps(r, var):
                bpd_rows.append({"source": measured["source"], "σ²": _label(var),
                                 **_at_steps("K", bpd), "spacing": "even"})
            if var in ancestral:
                fid_rows.append({**measured, "σ²": _label(var), **_at_steps("S", ancestral[var])})
        fid_rows += [{**measured, "σ²": title, **_at_steps("S", fids)}
                     for title, fids in ddim.items()]
    pub = {"source": "published: Analytic-DPM CIFAR-10 (LS)", "spacing": "even"}
    pub_fid = {**pub, "metric": "FID (Inception-v3)"}
    for var in published.ANALYTIC_DPM_BPD:
        bpd_rows.append({**pub, "σ²": _label(var),
                         **_at_steps("K", published.ANALYTIC_DPM_BPD[var], 2)})
        fid_rows.append({**pub_fid, "σ²": _label(var),
                         **_at_steps("S", published.ANALYTIC_DPM_FID[var], 2)})
    fid_rows += [{**pub_fid, "σ²": ddim_title(None if kind == "ddim" else "analytic", 0.0),
                  **_at_steps("S", fids, 2)}
                 for kind, fids in published.ANALYTIC_DPM_DDIM_FID.items()]
    # Bao et al. 2022b's rows as issue 20 gives them (HEADS_SOURCE: not checked against it)
    heads = {"source": f"published: {published.HEADS_LABEL}", "spacing": "even"}
    bpd_rows += [{**heads, "σ²": _label(var), **_at_steps("K", ks, 2)}
                 for var, ks in published.HEADS_BPD.items()]
    fid_rows += [{**heads, "metric": "FID (Inception-v3)", "σ²": ddim_title(var, 0.0),
                  **_at_steps("S", ss, 2)} for var, ss in published.HEADS_DDIM_FID.items()]
    return (_by_steps(bpd_rows, ["source", "σ²"], ["spacing"]),
            _by_steps(fid_rows, ["source", "σ²", "metric"], ["spacing"]))


def npr_against_analytic(res: Results) -> list[str]:
    """Per model: whether the bound with σ² NPR lies below the analytic one at every K measured
    (Bao et al. 2022b's claim), or at which K it does not."""
    lines = []
    for name, r in res.variants.items():
        npr, ana = _bpd_against_steps(r, "npr"), _bpd_against_steps(r, "analytic")
        both = [K for K in npr if K in ana]
        if not both:
            continue
        above = [K for K in both if npr[K] >= ana[K]]
        gaps = ", ".join(f"K = {K}: {npr[K] - ana[K]:+.3f}" for K in both)
        lines.append(f"`{name}`: NPR {'beats' if not above else 'does not beat'} analytic "
                     f"at every K" + ("" if not above else
                                      f" (not at K = {', '.join(map(str, above))})")
                     + f"; NPR − analytic bits/dim: {gaps}.")
    return lines


def likelihood_table(res: Results) -> pd.DataFrame:
    """Per model the full-chain bound (DDPM eq. 5) for each σ² measured (β, β̃, analytic; a
    learned σ²) and the exact bits/dim by the probability-flow ODE (± standard error over the
    images, mean NFE), then the published CIFAR-10 rows (labelled published)."""
    rows = []
    for name, r in res.variants.items():
        row = {"likelihood": f"measured: {name}"}
        bounds = {var: r.bpd[bpd_key(var)] for var in SIGMA2_MODES if bpd_key(var) in r.bpd}
        for var, b in bounds.items():
            row[f"bound {_label(var)}"] = _fmt(b)
        below = []
        for k in NLL_KEYS.values():
            ode = r.nll.get(k.bpd)
            row[k.column] = (("– (μ model: no ODE)" if not r.nll else "–") if ode is None
                             else f"{ode:.3f} ± {_fmt(r.nll.get(k.se))}")
            row[f"{k.column}: NFE (mean)"] = _fmt(r.nll.get(k.nfe), 0)
            below.append("–" if ode is None or not bounds else
                         "yes" if ode < min(bounds.values()) else "no")
        row["ODE < every bound (" + " / ".join(NLL_KEYS) + ")"] = " / ".join(below)
        rows.append(row)
    for pub in published.NLL_TABLE:
        rows.append({"likelihood": f"published (CIFAR-10): {pub['model']}",
                     f"bound {_label('fixed_large')}": pub["bound σ² = β"] or "–",
                     NLL_KEYS["uniform"].column: _fmt(pub["ODE"], 2)})
    df = pd.DataFrame(rows)
    first = ["likelihood"] + [c for c in df.columns if c.startswith("bound ")]
    return df[first + [c for c in df.columns if c not in first]].fillna("–")


def timings_table(res: Results) -> pd.DataFrame:
    """Wall time of every timed stage (timings/), features first, then stage by stage; the
    work column is templates/timings_work.jinja's."""
    work = TEMPLATES.get_template("timings_work.jinja")
    rows, total = [], 0.0
    timed = [("features", "features", res.features.timings)] if res.features.timings else []
    timed += [(f"{stage}@{name}", stage, r.timings[stage])
              for stage in TIMED_STAGES
              for name, r in res.variants.items() if stage in r.timings]
    for name, stage, t in timed:
        seconds = wall_seconds(t)
        total += seconds or 0.0
        rows.append({"stage": name, "wall time (s)": _fmt(seconds, 1),
                     "work": work.render(stage=stage, t=t)})
    rows.append({"stage": "total of the timed stages", "wall time (s)": _fmt(total, 1),
                 "work": "prepare, gamma and report are not timed"})
    return pd.DataFrame(rows).set_index("stage")


def grid_table(res: Results, specs: list[SamplerSpec]) -> str:
    """Sample grids as a Markdown table: one row per sampler of `specs`, one column per model;
    each cell a linked image (figures/samples_<model>_<sampler>.png) and its FID."""
    label = res.features.label.split(" (")[0]

    def cell(name: str, spec: SamplerSpec) -> str:
        r = res.variants[name]
        src = f"figures/samples_{name}_{spec.name}.png"
        if spec.name not in r.num_samples:  # this model has no such sample set
            return "–"
        return f"[![{name}: {spec.name}]({src})]({src}) {label} {_fmt(r.fid_of(spec))}"

    rows = [{"sampler": spec.label(), **{n: cell(n, spec) for n in res.variants}}
            for spec in specs]
    return _markdown(pd.DataFrame(rows, columns=["sampler", *res.variants]))


def grid_specs(res: Results) -> tuple[list[SamplerSpec], list[SamplerSpec]]:
    """The grids shown open, then every other sampler (a closed <details>: they differ little
    to the eye). Open: the full chain with σ² = β (DDPM's Algorithm 2; else the first full
    chain) and, at their fewest steps, respaced ancestral with σ² analytic and DDIM; in the
    order sampled."""
    every = list({s.name: s for r in res.variants.values() for s in r.samplers}.values())
    full = [s for s in every if s.kind == "ancestral"]
    pick = [next((s for s in full if s.variance == "fixed_large"), full[0])] if full else []
    for kind, variance in (("respaced", "analytic"), ("ddim", None)):
        few = [s for s in every if s.kind == kind and (variance is None or s.variance == variance)]
        if few:
            pick.append(min(few, key=lambda s: s.steps))
    shown = [s for s in every if s in pick] or every
    return shown, [s for s in every if s not in shown]


def train_images_table(params: Params) -> str:
    """The training images drawn as the sample grids are: one linked thumbnail."""
    src = f"figures/{TRAIN_GRID}"
    return _markdown(pd.DataFrame({
        "real images": [f"first {params.sample.grid_size} images of {DATA_DIR / 'train.npy'}"],
        "training split": [f"[![training images]({src})]({src})"]}))


def _markdown(df: pd.DataFrame, index: bool = False) -> str:
    """A table as Markdown, cells as written (no number parsing)."""
    return df.to_markdown(index=index, disable_numparse=True)


def thumb_width(res: Results) -> int:
    """Thumbnail width in px: 200 for up to four models, narrower beyond (never below 96)."""
    lo, hi = THUMB_WIDTH
    return max(lo, min(hi, 880 // max(1, len(res.variants))))


# in every figure (C3, C4: the DDIM lines of fid_vs_steps)
SIGMA2_COLOR = dict(zip(SIGMA2_COMPARED, ("C0", "C1", "C2", "C5", "C6"), strict=True))
MODEL_STYLE = (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"))  # line, marker: model k (mod 4)
LOSS_AXIS = {  # training loss kind -> (panel title, y label with the unit); {x}: the mean target
    "simple": ("L_simple (DDPM eq. 14)", "MSE of the {x} prediction\n(mean over dimensions)"),
    "vlb": ("L_vlb (DDPM eq. 5)", "$T \\cdot L_{{t-1}}$ at the drawn t\n(bits/dim)"),
    "hybrid": ("L_hybrid = L_simple + λ L_vlb (improved DDPM)",
               "MSE of the {x} prediction + $\\lambda T L_{{t-1}}$\n(MSE + λ · bits/dim)"),
}
MEAN_TARGET = {"eps": "ε", "x0": "x₀", "mu": r"$\tilde{\mu}$"}  # what L_simple's MSE compares


class _PlainLog(LogFormatter):
    """Log-axis labels as plain numbers (0.05, 2, 30; not 2 × 10⁰), minor ticks labelled only
    where matplotlib labels them (an axis spanning about a decade or less). Should matplotlib
    rename the method, the labels fall back to its own plain LogFormatter's."""

    def _num_to_string(self, x: float, vmin: float, vmax: float) -> str:
        return f"{x:g}"


def _plain_ticks(ax: plt.Axes, xs: list[int] | None = None) -> None:
    """Plain numbers on log axes; x ticks at the measured xs (steps K or S) when given."""
    if xs:
        ax.set_xticks(sorted(set(xs)))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    if ax.get_yscale() == "log":
        ax.yaxis.set_major_formatter(_PlainLog())
        ax.yaxis.set_minor_formatter(_PlainLog(labelOnlyBase=False))


def _panels(n: int, width: float, height: float) -> tuple[plt.Figure, list[plt.Axes]]:
    """n panels side by side under constrained layout: no label runs into the next panel."""
    fig, axes = plt.subplots(1, n, figsize=(width * n, height), squeeze=False,
                             layout="constrained")
    return fig, list(axes[0])


def _legend_outside(fig: plt.Figure) -> None:
    """One legend for all panels (a line's label means the same in each), right of them."""
    lines: dict[str, object] = {}
    for ax in fig.get_axes():
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            lines.setdefault(label, handle)
    if lines:
        fig.legend(list(lines.values()), list(lines), loc="outside right upper", fontsize=8)


def sigma2_steps_figure(params: Params, res: Results, fig_dir: Path) -> str | None:
    """Bits/dim vs K and FID vs S, one line per variant and σ² (measured; the published
    Analytic-DPM numbers are in the table beside them, on another scale)."""
    fig, (a1, a2) = _panels(2, 4.6, 3.6)
    ks_all, ss_all = [], []
    for k, (name, r) in enumerate(res.variants.items()):
        line, marker = MODEL_STYLE[k % len(MODEL_STYLE)]
        _, ancestral = _fid_against_steps(r)
        for var in SIGMA2_COMPARED:
            style = {"color": SIGMA2_COLOR[var], "ls": line, "marker": marker,
                     "label": f"{name}, {_label(var)}"}
            if bpd := _bpd_against_steps(r, var):
                a1.plot(list(bpd), list(bpd.values()), **style)
                ks_all += list(bpd)
            if pts := sorted((S, f) for S, f in ancestral.get(var, {}).items() if f is not None):
                a2.plot(*zip(*pts, strict=True), **style)
                ss_all += [S for S, _ in pts]
    if not ks_all and not ss_all:
        plt.close(fig)
        return None
    a1.set(xscale="log", xlabel="steps K (even trajectory)", ylabel="bits/dim (test split)",
           title=f"Bound, measured ({params.data.dataset})")
    a2.set(xscale="log", yscale="log", xlabel=f"sampling steps S ({params.sample.spacing})",
           ylabel=res.features.label, title=f"Samples, measured ({params.data.dataset})")
    _plain_ticks(a1, ks_all)
    _plain_ticks(a2, ss_all)
    _legend_outside(fig)
    return fig_to_file(fig, fig_dir, "sigma2_vs_steps.png")


def fig_to_file(fig: plt.Figure, fig_dir: Path, name: str) -> str:
    """Save a figure into fig_dir; returns its path as the Markdown cites it."""
    path = fig_dir / name
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return f"figures/{name}"


def loss_figure(params: Params, res: Results, fig_dir: Path) -> str | None:
    """Training loss against step: one panel per loss kind (each its own unit), one line per
    model trained with it (a pretrained model has no curve)."""
    kinds: dict[str, dict[str, pd.DataFrame]] = {}
    for n, r in res.variants.items():
        if r.paths.loss_csv.is_file() and len(df := pd.read_csv(r.paths.loss_csv)):
            kinds.setdefault(params.variants[n].loss, {})[n] = df
    if not kinds:
        return None
    fig, axes = _panels(len(kinds), 4.8, 3.4)
    names = list(res.variants)
    for ax, (kind, curves) in zip(axes, kinds.items(), strict=True):
        targets = {MEAN_TARGET.get(params.variants[n].mean_type, "mean") for n in curves}
        title, ylabel = LOSS_AXIS[kind]
        for n, df in curves.items():
            line, _ = MODEL_STYLE[names.index(n) % len(MODEL_STYLE)]
            ax.plot(df["step"], df["loss"], ls=line, label=n)
        ax.set(yscale="log", title=title, xlabel="training step",
               ylabel=ylabel.format(x=targets.pop() if len(targets) == 1 else "mean"))
        _plain_ticks(ax)
        ax.legend(fontsize=8, title="model", title_fontsize=8)
    return fig_to_file(fig, fig_dir, "loss.png")


def terms_figure(params: Params, res: Results, fig_dir: Path) -> str | None:
    """The terms L_{t-1} of the bound against t, and their running sum (DDPM Fig. 5 style):
    one line per model and σ²."""
    tables = {n: pd.read_csv(r.paths.bpd_terms) for n, r in res.variants.items()
              if r.paths.bpd_terms.is_file()}
    if not tables:
        return None
    fig, (a1, a2) = _panels(2, 4.6, 3.4)
    for k, (n, df) in enumerate(tables.items()):
        line, _ = MODEL_STYLE[k % len(MODEL_STYLE)]
        steps = df[df["term"] != "L_T"].sort_values("t")
        for col in df.columns[2:]:
            var = _VAR_OF.get(col)
            style = {"ls": line, "label": f"{n}, {_label(var) if var else col}",
                     **({"color": SIGMA2_COLOR[var]} if var in SIGMA2_COLOR else {})}
            a1.plot(steps["t"], steps[col], **style)
            a2.plot(steps["t"], steps[col].cumsum(), **style)
    a1.set(yscale="log", title="term $L_{t-1}$ of the bound at step t", xlabel="step t",
           ylabel="bits/dim")
    a2.set(title="cumulative: $L_0 + \\ldots + L_{t-1}$", xlabel="step t", ylabel="bits/dim")
    _plain_ticks(a1)
    _legend_outside(fig)
    return fig_to_file(fig, fig_dir, "vlb_terms.png")


def steps_figure(params: Params, res: Results, fig_dir: Path) -> str | None:
    """FID against S (plots/fid_steps/<v>.csv): DDIM, Analytic-, NPR- and SN-DDIM and respaced
    ancestral with σ² = β, one line each per model, above the floor."""
    fig, (ax,) = _panels(1, 6.0, 3.6)
    drawn: list[int] = []
    for k, (name, r) in enumerate(res.variants.items()):
        if not r.paths.fid_steps.is_file():
            continue
        df = pd.read_csv(r.paths.fid_steps)
        line, marker = MODEL_STYLE[k % len(MODEL_STYLE)]
        for col, color, what in (("ddim", "C3", "DDIM η=0"),
                                 ("ddim_analytic", "C4", "Analytic-DDIM η=0"),
                                 ("ddim_npr", SIGMA2_COLOR["npr"], "NPR-DDIM η=0"),
                                 ("ddim_sn", SIGMA2_COLOR["sn"], "SN-DDIM η=0"),
                                 ("respaced", SIGMA2_COLOR["fixed_large"], "ancestral σ²=β")):
            if col in df and len(pts := df[["steps", col]].dropna()):
                ax.plot(pts["steps"], pts[col], ls=line, marker=marker, color=color,
                        label=f"{name}: {what}")
                drawn += [int(x) for x in pts["steps"]]
    if not drawn:
        plt.close(fig)
        return None
    ax.axhline(res.features.floor["fid"], color="grey", lw=0.8, label="floor (test vs train)")
    ax.set(xscale="log", xlabel="sampling steps S", ylabel=res.features.label,
           title="FID vs number of sampling steps")
    _plain_ticks(ax, drawn)
    _legend_outside(fig)
    return fig_to_file(fig, fig_dir, "fid_vs_steps.png")


FIGURES = (("Loss curves", "loss", loss_figure),  # in the report's order
           ("Per-timestep terms of the bound (DDPM Fig. 5 style)", "terms", terms_figure),
           ("FID vs number of sampling steps: DDIM vs respaced ancestral", "steps", steps_figure),
           ("Bits/dim vs K and FID vs S for σ² = β, β̃, analytic, NPR, SN (measured)",
            "sigma2_steps",
            sigma2_steps_figure))
TEMPLATES = jinja2.Environment(  # report.md.jinja (the text) and report.html.jinja (the page)
    loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"), trim_blocks=True,
    lstrip_blocks=True, keep_trailing_newline=True, undefined=jinja2.StrictUndefined)


def build_markdown(params: Params, res: Results, figures: dict[str, str | None],
                   prov: dict[str, str] | None = None) -> str:
    """report.md: the tables of this module in the text of templates/report.md.jinja."""
    shown, rest = grid_specs(res)
    caps = sorted({(s.last_sigma_cap_y, _cap(s)) for r in res.variants.values()
                   for s in r.samplers if s.last_sigma_cap_y is not None})  # σ caps, by y
    sigma2_bpd, sigma2_fid = sigma2_steps_tables(params, res)
    t = {"summary": _markdown(summary_table(res), index=True),
         "likelihood": _markdown(likelihood_table(res)),
         "sample_sets": _markdown(sample_sets_table(res)),
         "steps": _markdown(steps_table(res).reset_index()),
         "sigma2_bpd": _markdown(sigma2_bpd), "sigma2_fid": _markdown(sigma2_fid),
         "npr_vs_analytic": npr_against_analytic(res),
         "table1": pd.DataFrame(published.TABLE1).set_index("model").to_markdown(),
         "table2": pd.DataFrame(published.TABLE2).set_index("parameterisation").to_markdown(),
         "ddim": _markdown(pd.DataFrame([{"sampler": name, **_at_steps("S", fids, 2)}
                                         for name, fids in published.DDIM_TABLE.items()]
                                        ).set_index("sampler"), index=True),
         "train_images": train_images_table(params), "grids": grid_table(res, shown),
         "other_grids": grid_table(res, rest) if rest else None,
         "timings": _markdown(timings_table(res), index=True),
         "provenance": None if prov is None else provenance_table(prov)}
    return TEMPLATES.get_template("report.md.jinja").render(
        p=params, feats=res.features, label=res.features.label, published=published, t=t,
        nll=NLL_KEYS, caps=[c for _, c in caps], n_other=len(rest),
        figures=[(title, key, figures[key]) for title, key, _ in FIGURES if figures.get(key)])


def provenance_table(prov: dict[str, str]) -> str:
    """The provenance as a Markdown table, values shown as written (file names hold `_`)."""
    escaped = [re.sub(r"([\\`*_\[\]<>|])", r"\\\1", v) for v in prov.values()]
    return _markdown(pd.DataFrame({"provenance": list(prov), "value": escaped}))


_NUM = r"[-+]?\d[\d,]*(\.\d+)?"
_NUMBER = re.compile(rf"{_NUM}( ± {_NUM})?|–|n/a")  # right-aligned table cells (not 3.11.7)


def _wrap_table(self, tokens: list, idx: int, options: dict, env: dict) -> str:
    """Tables scroll sideways inside a <div> rather than widen the page."""
    tag = self.renderToken(tokens, idx, options, env)
    return '<div class="scroll">' + tag if tokens[idx].nesting == 1 else tag + "</div>"


def markdown_to_html(md: str, fig_dir: Path, thumb: int = THUMB_WIDTH[1]) -> str:
    """report.md as a page (CommonMark and tables by markdown-it-py; raw HTML only as blocks:
    the <details> section). Images figures/x.png are read from fig_dir and inlined as base64;
    a table cell holding a linked image is a `thumb`-pixel thumbnail linking to the full-size
    file beside the report (its table: class grids); number cells are right-aligned."""
    parser = MarkdownIt("commonmark", {"xhtmlOut": False}).enable("table").disable(
        "html_inline")
    parser.add_render_rule("table_open", _wrap_table)
    parser.add_render_rule("table_close", _wrap_table)
    tokens = parser.parse(md)
    for i, tok in enumerate(tokens):
        if tok.type == "table_open":
            table = tok
        elif tok.type in ("th_open", "td_open"):
            tok.attrs.pop("style", None)  # pandas' `:---` alignment: the stylesheet aligns
            images = [c for c in tokens[i + 1].children if c.type == "image"]
            for im in images:
                im.attrSet("width", str(thumb))
            if images:
                tok.attrSet("class", "thumb")
                table.attrSet("class", "grids")
            elif tok.type == "td_open" and _NUMBER.fullmatch(tokens[i + 1].content):
                tok.attrSet("class", "n")
        for im in (c for c in tok.children or () if c.type == "image"):  # as a data: URL
            png = (fig_dir / Path(im.attrGet("src")).name).read_bytes()
            im.attrSet("src", f"data:image/png;base64,{base64.b64encode(png).decode()}")
    body = parser.renderer.render(tokens, parser.options, {})
    return TEMPLATES.get_template("report.html.jinja").render(body=body)


def main(params: Params) -> None:
    res = load_results(params)
    with atomic_dir(FIG_DIR) as tmp_fig:
        for name, r in res.variants.items():
            for spec in r.samplers:
                src = r.paths.grids / f"{spec.name}.png"
                (tmp_fig / f"samples_{name}_{spec.name}.png").write_bytes(src.read_bytes())
        save_grid(load_images(DATA_DIR / "train.npy"), tmp_fig / TRAIN_GRID,
                  params.sample.grid_size)  # drawn as sample@<v> draws its grids
        figures = {key: draw(params, res, tmp_fig) for _, key, draw in FIGURES}
        md = build_markdown(params, res, figures, provenance(params))
        page = markdown_to_html(md, tmp_fig, thumb_width(res))
    write_text(md, REPORTS_DIR / "report.md")
    write_text(page, REPORTS_DIR / "report.html")
    print(f"report: {REPORTS_DIR / 'report.md'}, {REPORTS_DIR / 'report.html'}")


if __name__ == "__main__":
    run_stage(main)
