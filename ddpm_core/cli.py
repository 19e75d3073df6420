"""`ddpm` command line: sample, bpd, nll, convert, check, preset.

Every subcommand has --help. Errors are one line `error: ...` on stderr: exit status 2 for bad
arguments or input (a missing file, a malformed model or params file), 1 for a failure while
running (a metric check that misses, no expected entry for the params, out of memory). Set
DDPM_DEBUG=1 to see the traceback instead.

Start-up stays light: parsing, --help, usage errors and a missing model path import neither torch
nor the library's heavy modules (each subcommand imports what it needs), so they answer at once.
Which model arguments are hub ids: ddpm_core.sources.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, get_args

from ddpm_core.errors import is_out_of_memory, loaded, out_of_memory_line
from ddpm_core.last_sigma import DEFAULT_LAST_SIGMA_CAP_Y
from ddpm_core.modes import (
    DEFAULT_SPACING,
    HEAD_KINDS,
    NET_BATCH,
    SAMPLER_KINDS,
    SIGMA2_MODES,
    SPACINGS,
    Dequantization,
    Which,
)
from ddpm_core.sources import check_model_source

if TYPE_CHECKING:
    from ddpm_core.units import UnitStore

PRESETS_DIR = Path("presets")


class UsageError(ValueError):
    """Bad arguments: exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not argparse's usage + error
        raise UsageError(f"{message} (see `{self.prog} --help`)")


# Batch sizes to lower when a command runs out of memory (accelerator or CPU).
OOM_HINT = ("lower --batch-size (bpd: --batch-size or --t-batch; one network call holds "
            "batch-size x t-batch images)")


# ----------------------------------------------------------------------------- files

IMAGE_SOURCES = "a folder of PNG/JPEG images, an .npz with uint8 `images` or an .npy"


def read_images(path: str | Path) -> Any:
    """uint8 [N, H, W, C] from an image folder, an .npz (`images`) or an .npy."""
    path = Path(path)
    if not path.exists():  # before torch is imported (by ddpm_core.data)
        raise FileNotFoundError(f"{path}: not found; give {IMAGE_SOURCES}")
    from ddpm_core.data import DataError, load_image_folder, load_images, load_npz

    if path.is_dir():
        return load_image_folder(path)
    if path.suffix == ".npz":
        return load_npz(path)[0]
    if path.suffix == ".npy":
        return load_images(path)
    raise DataError(f"{path}: unknown image source; give {IMAGE_SOURCES}")


# ----------------------------------------------------------------------------- subcommands


def _gamma(a: argparse.Namespace, net: Any, diff: Any) -> Any:
    """Γ for sigma2 analytic, estimated on --gamma-images (None otherwise)."""
    from ddpm_core.api import estimate_gamma

    who = ("--sampler ddim_analytic" if getattr(a, "sampler", None) == "ddim_analytic" else
           "--sigma2 analytic" if a.sigma2 == "analytic" else None)
    if who is None:
        if a.gamma_images is not None:
            raise UsageError("--gamma-images is only used with --sigma2 analytic or "
                             "--sampler ddim_analytic")
        return None
    if a.gamma_images is None:
        raise UsageError(f"{who} needs --gamma-images (training images, e.g. "
                         "data/prepared/train.npy) to estimate Γ")
    return estimate_gamma(net, diff, read_images(a.gamma_images), M=a.gamma_m,
                          batch_size=a.batch_size, progress=True)


def _heads_file(a: argparse.Namespace) -> Path | None:
    """--heads of --sigma2 npr or sn, checked before torch is imported (None: no heads)."""
    if a.sigma2 not in HEAD_KINDS:
        if a.heads is not None:
            raise UsageError("--heads is only used with --sigma2 " + " or ".join(HEAD_KINDS))
        return None
    if a.heads is None:
        raise UsageError(f"--sigma2 {a.sigma2} needs --heads (the heads file of this model, e.g. "
                         "models/<variant>.heads.pt: ddpm_core.api.train_heads, then save_heads)")
    if not Path(a.heads).is_file():
        raise FileNotFoundError(f"{a.heads}: heads file not found; give the heads file of this "
                                "model (ddpm_core.api.train_heads, then save_heads)")
    return Path(a.heads)


def _heads(path: Path | None) -> Any:
    from ddpm_core.api import load_heads

    return None if path is None else load_heads(path)


def _load(a: argparse.Namespace, images: str | None = None) -> tuple[Any, Any, Any]:
    """The model and the first -n of `images` (None: no images), both paths checked before torch
    is imported, so that a mistyped one answers at once."""
    check_model_source(a.model)
    x = read_images(images)[:a.n] if images is not None else None  # a.n None: all of them
    from ddpm_core.api import load_model
    from ddpm_core.inference import default_device

    net, diff = load_model(a.model, which=a.which, device=a.device or default_device())
    return net, diff, x


def cmd_sample(a: argparse.Namespace) -> int:
    heads = _heads_file(a)
    net, diff, _ = _load(a)
    from ddpm_core.api import sample
    from ddpm_core.data import save_grid
    from ddpm_core.files import save_npz

    images = sample(net, diff, a.n, sampler=a.sampler, steps=a.steps, sigma2=a.sigma2,
                    spacing=a.spacing, eta=a.eta, seed=a.seed, batch_size=a.batch_size,
                    clip_x0=not a.no_clip, gamma=_gamma(a, net, diff), heads=_heads(heads),
                    last_sigma_cap_y=a.last_sigma_cap_y, net_batch=a.net_batch,
                    units=(units := _units(a)), progress=True)
    out = Path(a.out)
    save_npz(out, images=images)
    grid = Path(a.grid) if a.grid else out.with_suffix(".png")
    save_grid(images, grid, a.grid_n)
    _done(units)
    print(f"wrote {len(images)} images {tuple(images.shape[1:])} to {out} and a grid to {grid}")
    return 0


def _units(a: argparse.Namespace) -> UnitStore | None:
    """--units DIR: the scratch area of the engine call's units."""
    from ddpm_core.units import UnitStore

    return UnitStore(Path(a.units)) if a.units else None


def _done(units: UnitStore | None) -> None:
    """The result is written: its units go (one line when some were read back)."""
    if units is not None:
        if line := units.summary():
            print(f"units: {line}")
        units.remove()


def _write_result(path: str | None, result: dict) -> None:
    """--json: the printed result as a JSON file."""
    if path:
        from ddpm_core.files import write_json

        write_json(result, path, sort_keys=False)


def cmd_bpd(a: argparse.Namespace) -> int:
    heads = _heads_file(a)
    net, diff, images = _load(a, a.images)
    from ddpm_core.api import bits_per_dim_per_image

    per = bits_per_dim_per_image(net, diff, images, sigma2=a.sigma2, steps=a.steps,
                                 gamma=_gamma(a, net, diff), heads=_heads(heads),
                                 batch_size=a.batch_size, t_batch=a.t_batch,
                                 net_batch=a.net_batch, units=(units := _units(a)),
                                 progress=True)
    mean, se = float(per.mean()), float(per.std(ddof=1) / math.sqrt(len(per))) if len(
        per) > 1 else float("nan")
    result = {"bpd": mean, "standard_error": se, "images": int(len(per)), "T": diff.T,
              "steps": a.steps or diff.T, "sigma2": a.sigma2 or diff.var_type}
    print(f"bits/dim {mean:.5f} ± {se:.5f} (standard error) on {len(per)} images, "
          f"T = {diff.T}, {result['steps']} steps, σ² {result['sigma2']}")
    _write_result(a.json, result)
    _done(units)
    return 0


def cmd_nll(a: argparse.Namespace) -> int:
    net, diff, images = _load(a, a.images)
    from ddpm_core.api import nll

    res = nll(net, diff, images, rtol=a.rtol, atol=a.atol, repeats=a.repeats,
              batch_size=a.batch_size, seed=a.seed, dequantization=a.dequantization,
              units=(units := _units(a)), progress=True)
    result = {"nll_ode_bpd": res.mean, "standard_error": res.standard_error,
              "nfe_mean": res.nfe_mean, "images": int(len(res.bpd)), "T": diff.T,
              "rtol": a.rtol, "atol": a.atol, "repeats": a.repeats, "batch_size": a.batch_size,
              "seed": a.seed, "dequantization": a.dequantization}
    print(f"ODE bits/dim ({a.dequantization} dequantization) {res.mean:.5f} ± "
          f"{res.standard_error:.5f} (standard error) on "
          f"{len(res.bpd)} images, mean NFE {res.nfe_mean:.1f}, T = {diff.T}, "
          f"rtol {a.rtol:g}, atol {a.atol:g}, batch size {a.batch_size}")
    _write_result(a.json, result)
    _done(units)
    return 0


def cmd_convert(a: argparse.Namespace) -> int:
    check_model_source(a.src)
    from tqdm.auto import tqdm

    from ddpm_core.api import load_model, save_model_file

    to = a.to or ("ours" if Path(a.dst).suffix == ".pt" else "diffusers")
    with tqdm(total=2, desc="convert", unit="step") as bar:
        net, diff = load_model(a.src, which=a.which)
        bar.update(1)
        if to == "diffusers":
            from ddpm_core.convert import save_diffusers

            save_diffusers(net, diff, Path(a.dst))
        else:
            save_model_file(net, diff, Path(a.dst), meta={"converted_from": str(a.src)})
        bar.update(1)
    print(f"wrote {to} model to {a.dst} ({diff!r})")
    return 0


def _pipeline(module: str) -> Any:
    """pipeline.<module>: the stages' code, which runs from the checkout (it is not installed)."""
    import importlib

    if Path("pipeline", "__init__.py").is_file() and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        return importlib.import_module(f"pipeline.{module}")
    except ModuleNotFoundError as e:
        if e.name != "pipeline":
            raise
        raise UsageError("this command reads the pipeline's params and results: run it from "
                         "the repository's checkout (pipeline/ is not installed)") from None


def cmd_check(a: argparse.Namespace) -> int:
    check = _pipeline("check")
    try:
        entry, rows = check.check(a.params, a.metrics_dir, a.expected)
    except LookupError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    print(f"entry: {entry.name}" + (f" ({entry.description})" if entry.description else ""))
    print(check.format_table(rows))
    bad = [r for r in rows if not r.ok]
    if bad:
        reasons = {"FAIL": "outside tolerance", "MISSING": "not measured (run the pipeline)",
                   "NO VALUE": f"no expected value recorded in {a.expected}"}
        detail = "; ".join(f"{r.metric}: {reasons[r.status]}" for r in bad)
        print(f"error: {len(bad)} of {len(rows)} metrics do not pass: {detail}", file=sys.stderr)
        return 1
    print(f"all {len(rows)} metrics pass")
    return 0


def merge(base: Any, over: Any) -> Any:
    """Deep merge of mappings; lists and scalars in `over` replace those of `base`."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = merge(base[k], v) if k in base else v
        return out
    return over


def cmd_preset(a: argparse.Namespace) -> int:
    import yaml

    from ddpm_core.config import ConfigError

    if a.list:
        for f in sorted(PRESETS_DIR.glob("*.yaml")):
            print(f.stem)
        return 0
    if a.name is None:
        raise UsageError("give a preset name (ddpm preset --list shows them)")
    file = Path(a.name) if a.name.endswith((".yaml", ".yml")) else PRESETS_DIR / f"{a.name}.yaml"
    if not file.is_file():
        have = ", ".join(sorted(f.stem for f in PRESETS_DIR.glob("*.yaml"))) or "none"
        raise FileNotFoundError(f"{file}: no such preset (presets here: {have})")
    over = yaml.safe_load(file.read_text())
    if not isinstance(over, dict):
        raise UsageError(f"{file}: a preset is a mapping of params.yaml sections")
    merged = merge(_pipeline("check").read_params(a.params), over)
    if "variants" in over:  # a preset names its models: they replace, not join, the variants
        merged["variants"] = over["variants"]
    try:
        _pipeline("params").params_from_dict(merged)
    except ConfigError as e:
        raise UsageError(f"preset {file.stem} does not fit {a.params}: {e}") from None
    text = (f"# {a.params} with presets/{file.name} applied by `ddpm preset {file.stem}`; "
            f"`git checkout {a.params}` restores the default run.\n")
    Path(a.params).write_text(text + yaml.safe_dump(merged, sort_keys=False))
    print(f"wrote {a.params} (preset {file.stem}); now run `dvc repro`, then `ddpm check`")
    return 0


# ----------------------------------------------------------------------------- parser

SIGMA2 = [m.short for m in SIGMA2_MODES.values()]  # --sigma2 beta, beta_tilde, ...
WHICH = get_args(Which)


def _cap_y(text: str) -> float | None:
    """--last-sigma-cap-y: pixel levels y > 0, or none (no cap)."""
    if text.lower() == "none":
        return None
    try:
        y = float(text)
    except ValueError:
        y = float("nan")
    if not y > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of pixel levels > 0 (or "
                                         "none)")
    return y


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ddpm", description="DDPM models: sample, bits/dim, convert, check results.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    model_help = ("our model file (models/<variant>.pt), a training checkpoint (ckpt_*.pt), a "
                  "diffusers folder (config.json, weights, scheduler_config.json) or a hub id "
                  "owner/name (a missing path that looks local is 'not found', never a hub id)")
    model = argparse.ArgumentParser(add_help=False)  # sample, bpd, nll: the model, where it runs
    model.add_argument("model", help=model_help)
    model.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if any)")
    model.add_argument("--which", choices=WHICH, default="ema",
                       help="EMA (default) or raw weights of our files")
    model.add_argument("--units", default=None, metavar="DIR",
                       help="keep every finished batch in DIR (ddpm_core.units): a rerun after "
                       "a kill computes only the missing ones; removed once the result is "
                       "written")
    images = argparse.ArgumentParser(add_help=False)  # bpd, nll: the images and a result file
    images.add_argument("images", help=IMAGE_SOURCES)
    images.add_argument("--json", default=None, help="also write the result to this JSON file")
    gamma = argparse.ArgumentParser(add_help=False)  # sample, bpd: Γ, heads, net batch
    gamma.add_argument("--gamma-images", default=None,
                       help="training images (folder, .npz, .npy) for Γ of --sigma2 analytic")
    gamma.add_argument("--gamma-m", type=int, default=100,
                       help="images used for Γ (default 100; Bao et al.: 10 or 100 suffice)")
    gamma.add_argument("--heads", default=None,
                       help="heads file of --sigma2 npr or sn (Bao et al. 2022b's variance heads "
                       "of this model, e.g. models/<variant>.heads.pt)")
    gamma.add_argument("--net-batch", type=int, default=NET_BATCH,
                       help=f"rows of every network call (default {NET_BATCH}, as params.yaml's; "
                       "the numbers depend on it, not on --batch-size)")

    s = sub.add_parser("sample", help="draw images: an .npz with uint8 `images` and a PNG grid",
                       description="Draw images from a model; writes OUT (.npz, uint8 `images` "
                                   "[N, H, W, C]) and a PNG grid.", parents=[model, gamma])
    s.add_argument("-n", "--num", dest="n", type=int, default=64, help="images (default 64)")
    s.add_argument("--sampler", choices=SAMPLER_KINDS,
                   default="ancestral", help="ancestral (DDPM), ddim (η = --eta) or "
                   "ddim_analytic (Analytic-DDIM: DDIM with σ̂² noise; needs --gamma-images)")
    s.add_argument("--steps", type=int, default=None, help="sampling steps (default: all T)")
    s.add_argument("--sigma2", choices=SIGMA2, default=None,
                   help="reverse variance (default: the model's own; DDIM: eta, or analytic, "
                   "or npr/sn: the head's noise even at eta 0; npr, sn need --heads)")
    s.add_argument("--spacing", choices=SPACINGS, default=DEFAULT_SPACING,
                   help=f"which steps a respaced chain visits (default {DEFAULT_SPACING})")
    s.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity in [0, 1]")
    s.add_argument("--last-sigma-cap-y", type=_cap_y, default=DEFAULT_LAST_SIGMA_CAP_Y,
                   metavar="Y", help="cap σ of the step to x_τ1 at 2Y/255·√(π/2) (Bao et al.; "
                   f"chains of < T steps and DDIM; default {DEFAULT_LAST_SIGMA_CAP_Y:g}, "
                   "CIFAR-10: 2; none: no cap)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-size", type=int, default=256)
    s.add_argument("--no-clip", action="store_true", help="do not clip x̂_0 to [-1, 1]")
    s.add_argument("-o", "--out", default="samples.npz", help="output .npz (default samples.npz)")
    s.add_argument("--grid", default=None, help="PNG grid (default: OUT with .png)")
    s.add_argument("--grid-n", type=int, default=64, help="images in the grid (default 64)")
    s.set_defaults(func=cmd_sample)

    b = sub.add_parser("bpd", help="bits/dim (DDPM's full variational bound) of images",
                       description="Negative log-likelihood bound in bits/dim of uint8 images.",
                       parents=[model, images, gamma])
    b.add_argument("-n", "--num", dest="n", type=int, default=None, help="first N images only")
    b.add_argument("--sigma2", choices=SIGMA2, default=None,
                   help="reverse variance (default: the model's own; npr, sn need --heads)")
    b.add_argument("--steps", type=int, default=None,
                   help="K-step chain on the even trajectory (default: all T steps)")
    b.add_argument("--batch-size", type=int, default=100)
    b.add_argument("--t-batch", type=int, default=10, help="timesteps per network call")
    b.set_defaults(func=cmd_bpd)

    e = sub.add_parser("nll", help="exact bits/dim by the probability-flow ODE",
                       description="Bits/dim of uint8 images by the probability-flow ODE (Song "
                                   "et al. 2021: uniform dequantization, Hutchinson divergence, "
                                   "RK45). Image i's noise comes from (--seed, i); images of one "
                                   "batch share the solver's steps, so the number depends on "
                                   "--batch-size within the tolerance.",
                       parents=[model, images])
    e.add_argument("-n", "--num-images", dest="n", type=int, default=None,
                   help="first N images only")
    e.add_argument("--rtol", type=float, default=1e-5, help="RK45 rtol (default 1e-5)")
    e.add_argument("--atol", type=float, default=1e-5, help="RK45 atol (default 1e-5)")
    e.add_argument("--repeats", type=int, default=1, help="Hutchinson probes per image")
    e.add_argument("--batch-size", type=int, default=1,
                   help="images per solve (default 1: each image's number its own)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--dequantization", choices=get_args(Dequantization), default="uniform",
                   help="uniform (Song et al. 2021) or variational: through the chain's first "
                        "step and its decoder, a bound on the discrete likelihood")
    e.set_defaults(func=cmd_nll)

    c = sub.add_parser("convert", help="our model file <-> a diffusers folder",
                       description="Convert between our model file (.pt) and a diffusers folder "
                                   "(UNet2DModel config.json + safetensors + DDPMScheduler "
                                   "scheduler_config.json). diffusers is not needed.")
    c.add_argument("src", help=model_help)
    c.add_argument("dst", help="a .pt file (ours) or a folder (diffusers)")
    c.add_argument("--to", choices=["ours", "diffusers"], default=None,
                   help="output format (default: ours for a .pt destination, else diffusers)")
    c.add_argument("--which", choices=WHICH, default="ema")
    c.set_defaults(func=cmd_convert)

    k = sub.add_parser("check", help="compare metrics/ with reference/expected.yaml",
                       description="Pick the entry of the expected metrics matching params.yaml, "
                                   "print expected vs measured; exit 1 on any miss.")
    k.add_argument("--params", default="params.yaml")
    k.add_argument("--metrics-dir", default="metrics")
    k.add_argument("--expected", default="reference/expected.yaml")
    k.set_defaults(func=cmd_check)

    r = sub.add_parser("preset", help="apply presets/NAME.yaml to params.yaml",
                       description="Merge a preset (e.g. table1_cifar10) into params.yaml.")
    r.add_argument("name", nargs="?", help="preset name or a .yaml file")
    r.add_argument("--params", default="params.yaml")
    r.add_argument("--list", action="store_true", help="list the presets")
    r.set_defaults(func=cmd_preset)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `ddpm` console script; returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args))
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if os.environ.get("DDPM_DEBUG"):
            raise
        if is_out_of_memory(e):
            print(f"error: {out_of_memory_line(e, OOM_HINT)}", file=sys.stderr)
            return 1
        # the input is wrong (exit 2; the messages are written for users); the classes of
        # modules never imported cannot have been raised, so none is imported here
        bad_input = (UsageError, ValueError, FileNotFoundError,
                     *loaded("ddpm_core.data:DataError", "ddpm_core.checkpoint:CheckpointError",
                             "ddpm_core.modelfile:ModelFileError", "yaml:YAMLError"))
        code = 2 if isinstance(e, bad_input) else 1
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
