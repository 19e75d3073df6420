"""The `ddpm` command line: one-line errors and exit codes, sample/bpd/convert on tiny models,
`ddpm check` against expected metrics and the table1_cifar10 preset path."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from ddpm_core.cli import main

ROOT = Path(__file__).resolve().parents[1]
SUBCOMMANDS = ["sample", "bpd", "nll", "convert", "check", "preset"]


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, *words: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip() and "it/s" not in ln and "%|" not in ln]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])


# ----------------------------------------------------------------------------- help and errors


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_every_subcommand_has_help(cmd: str, capsys) -> None:
    code, out, _ = run([cmd, "--help"], capsys)
    assert code == 0
    assert out.startswith(f"usage: ddpm {cmd}")


def test_console_entry_point_runs_as_a_module() -> None:
    r = subprocess.run([sys.executable, "-m", "ddpm_core.cli", "--help"], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 0 and all(c in r.stdout for c in SUBCOMMANDS)
    r = subprocess.run([sys.executable, "-m", "ddpm_core.cli", "sample"], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 2
    assert_one_line_error(r.stderr, "model")


@pytest.mark.parametrize(("argv", "words"), [
    (["frobnicate"], ["invalid choice", "frobnicate"]),
    (["sample", "m.pt", "--sampler", "euler"], ["--sampler", "euler"]),
    (["sample", "m.pt", "--steps", "ten"], ["--steps", "ten"]),
])
def test_bad_arguments_are_one_line_exit_2(argv, words, capsys) -> None:
    code, _, err = run(argv, capsys)
    assert code == 2
    assert_one_line_error(err, *words)


def test_missing_model_is_one_line_exit_2(tmp_path: Path, capsys) -> None:
    code, _, err = run(["sample", str(tmp_path / "absent.pt")], capsys)
    assert code == 2
    assert_one_line_error(err, "absent.pt", "no such file")


def test_hub_id_offline_is_one_line_exit_2(monkeypatch, capsys) -> None:
    import huggingface_hub

    def offline(*args, **kwargs):
        raise ConnectionError("Failed to resolve 'huggingface.co'\nMax retries exceeded")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    code, _, err = run(["sample", "google/ddpm-cifar10-32"], capsys)
    assert code == 2
    assert_one_line_error(err, "could not fetch 'google/ddpm-cifar10-32'", "ConnectionError")


# ----------------------------------------------------------------------------- sample / bpd


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory) -> Path:
    from tiny import make_diffusers_folder

    path = tmp_path_factory.mktemp("models") / "tiny-ddpm"
    make_diffusers_folder(path, T=8)
    return path


def test_sample_writes_npz_and_grid_equal_to_the_api(diffusers_folder, tmp_path, capsys,
                                                      one_thread) -> None:
    import ddpm_core

    out = tmp_path / "s.npz"
    code, stdout, _ = run(["sample", str(diffusers_folder), "-n", "5", "--sampler", "ddim",
                           "--steps", "4", "--seed", "3", "--batch-size", "2",
                           "--device", "cpu", "-o", str(out)], capsys)
    assert code == 0, stdout
    with np.load(out) as z:
        images = z["images"]
    assert images.dtype == np.uint8 and images.shape == (5, 8, 8, 3)
    net, diff = ddpm_core.load_model(diffusers_folder)
    same = ddpm_core.sample(net, diff, 5, sampler="ddim", steps=4, seed=3, batch_size=2)
    assert np.array_equal(images, same)
    grid = np.asarray(Image.open(out.with_suffix(".png")))
    assert grid.shape == ((2 * 9 + 1) * 8, (3 * 9 + 1) * 8, 3)  # 2x3 cells, 1 px gaps, x8
    cell = grid[8:72, 8 + 72:8 + 72 + 64]  # image 1 (row 0, column 1), each pixel 8x8
    assert np.array_equal(cell, images[1].repeat(8, 0).repeat(8, 1))


def test_sample_with_units_reads_back_what_a_killed_run_finished(diffusers_folder, tmp_path,
                                                                 capsys, one_thread) -> None:
    """--units DIR: batches an earlier run finished (here: shard 0 of 2, as a killed run would
    leave them) are read back, not computed; the images are one run's; DIR goes at the end."""
    import ddpm_core
    from ddpm_core.units import Shard, UnitStore

    net, diff = ddpm_core.load_model(diffusers_folder)
    opts = {"sampler": "ddim", "steps": 3, "seed": 1, "batch_size": 2}
    ddpm_core.sample(net, diff, 5, units=UnitStore(tmp_path / "u", Shard(0, 2)), **opts)
    out = tmp_path / "s.npz"
    code, stdout, _ = run(["sample", str(diffusers_folder), "-n", "5", "--sampler", "ddim",
                           "--steps", "3", "--seed", "1", "--batch-size", "2", "--device", "cpu",
                           "--units", str(tmp_path / "u"), "-o", str(out)], capsys)
    assert code == 0, stdout
    assert "units: 1 computed, 2 reused" in stdout
    with np.load(out) as z:
        assert np.array_equal(z["images"], ddpm_core.sample(net, diff, 5, **opts))
    assert not (tmp_path / "u").exists()


def test_bpd_of_npz_and_image_folder(diffusers_folder, tmp_path, capsys, one_thread) -> None:
    import ddpm_core

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "x.npz", images=images)
    (tmp_path / "png").mkdir()
    for i, im in enumerate(images):
        Image.fromarray(im).save(tmp_path / "png" / f"{i}.png")
    net, diff = ddpm_core.load_model(diffusers_folder)
    want = ddpm_core.bits_per_dim(net, diff, images, batch_size=2)
    for src in (tmp_path / "x.npz", tmp_path / "png"):
        code, out, _ = run(["bpd", str(diffusers_folder), str(src), "--batch-size", "2",
                            "--device", "cpu", "--json", str(tmp_path / "r.json")], capsys)
        assert code == 0
        assert json.loads((tmp_path / "r.json").read_text())["bpd"] == pytest.approx(want,
                                                                                     rel=1e-12)
        assert f"bits/dim {want:.5f}" in out


def test_bpd_of_a_folder_holding_a_decompression_bomb_is_exit_2(diffusers_folder, tmp_path,
                                                                  capsys) -> None:
    from test_data import write_bomb_png

    for name in ("a.png", "b.png"):
        write_bomb_png(tmp_path / name)
    code, _, err = run(["bpd", str(diffusers_folder), str(tmp_path), "--device", "cpu"], capsys)
    assert code == 2
    assert_one_line_error(err, str(tmp_path / "a.png"))


def test_typo_in_a_local_path_is_not_found_without_asking_the_hub(tmp_path, monkeypatch,
                                                                  capsys) -> None:
    """A path that looks local is never a hub id: (models/ exists here, so models/x is local)."""
    import huggingface_hub

    def no_hub(*args, **kwargs):
        raise AssertionError("the hub was asked")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for path in ["mdoels/simple.pt", "models/simpel", "./typo/model", "~/no-such-dir-xyz/m",
                 "weights/tiny.safetensors", "owner/name.npz", str(tmp_path / "abs" / "m")]:
        for cmd in (["sample", path], ["convert", path, "out.pt"]):
            code, _, err = run(cmd, capsys)
            assert code == 2, (cmd, err)
            assert_one_line_error(err, f"error: {path}: not found")


def test_hub_id_rule(monkeypatch) -> None:
    from ddpm_core.sources import is_hub_id

    monkeypatch.chdir(ROOT)

    assert is_hub_id("google/ddpm-cifar10-32") and is_hub_id("Qwen/Qwen2.5-7B")
    for local in ["mdoels/simple.pt", "./a/b", "~/a", "/a/b", "a/b/c", "a", "a/b.safetensors",
                  "a/b.npz", "a/b.bin", ".hidden/x", "tests/nothing"]:  # tests/ exists
        assert not is_hub_id(local), local


def test_bpd_of_images_of_the_wrong_shape_is_exit_2(diffusers_folder, tmp_path, capsys) -> None:
    np.savez(tmp_path / "x.npz", images=np.zeros((2, 4, 4, 3), np.uint8))
    code, _, err = run(["bpd", str(diffusers_folder), str(tmp_path / "x.npz")], capsys)
    assert code == 2
    assert_one_line_error(err, "(4, 4, 3)", "(8, 8, 3)")


def test_sample_analytic_needs_gamma_images_and_uses_them(diffusers_folder, tmp_path, capsys,
                                                          one_thread) -> None:
    import ddpm_core

    code, _, err = run(["sample", str(diffusers_folder), "--sigma2", "analytic"], capsys)
    assert code == 2
    assert_one_line_error(err, "--gamma-images")
    train = np.random.default_rng(0).integers(0, 256, size=(6, 8, 8, 3), dtype=np.uint8)
    np.save(tmp_path / "train.npy", train)
    code, _, err = run(["sample", str(diffusers_folder), "-n", "2", "--steps", "4", "--sigma2",
                        "analytic", "--gamma-images", str(tmp_path / "train.npy"),
                        "--gamma-m", "4", "--device", "cpu", "-o", str(tmp_path / "a.npz")],
                       capsys)
    assert code == 0, err
    net, diff = ddpm_core.load_model(diffusers_folder)
    gamma = ddpm_core.estimate_gamma(net, diff, train, M=4, batch_size=256)
    want = ddpm_core.sample(net, diff, 2, steps=4, sigma2="analytic", gamma=gamma)
    with np.load(tmp_path / "a.npz") as z:
        assert np.array_equal(z["images"], want)


def test_cli_spacing_names_are_the_samplers(capsys) -> None:
    from ddpm_core import chains, cli, last_sigma, modes

    assert cli.SPACINGS is modes.SPACINGS and cli.DEFAULT_SPACING is chains.DEFAULT_SPACING
    assert cli.DEFAULT_LAST_SIGMA_CAP_Y == last_sigma.DEFAULT_LAST_SIGMA_CAP_Y


def test_sample_ddim_analytic_and_the_last_sigma_cap_flag(diffusers_folder, tmp_path, capsys,
                                                          one_thread) -> None:
    """--sampler ddim_analytic needs --gamma-images and is the API's; --last-sigma-cap-y Y
    (none: no cap) reaches the sampler; a bad Y is a one-line usage error."""
    import ddpm_core

    code, _, err = run(["sample", str(diffusers_folder), "--sampler", "ddim_analytic"], capsys)
    assert code == 2
    assert_one_line_error(err, "--gamma-images", "ddim_analytic")
    train = np.random.default_rng(0).integers(0, 256, size=(6, 8, 8, 3), dtype=np.uint8)
    np.save(tmp_path / "train.npy", train)
    net, diff = ddpm_core.load_model(diffusers_folder)
    gamma = ddpm_core.estimate_gamma(net, diff, train, M=4, batch_size=256)
    for flag, y in (([], 1.0), (["--last-sigma-cap-y", "2"], 2.0),
                    (["--last-sigma-cap-y", "none"], None)):
        code, _, err = run(["sample", str(diffusers_folder), "-n", "2", "--steps", "4",
                            "--sampler", "ddim_analytic", "--gamma-images",
                            str(tmp_path / "train.npy"), "--gamma-m", "4", "--device", "cpu",
                            "-o", str(tmp_path / "a.npz"), *flag], capsys)
        assert code == 0, err
        want = ddpm_core.sample(net, diff, 2, sampler="ddim_analytic", steps=4, gamma=gamma,
                                last_sigma_cap_y=y)
        with np.load(tmp_path / "a.npz") as z:
            assert np.array_equal(z["images"], want), flag
    for bad in ("0", "-1", "x"):
        code, _, err = run(["sample", str(diffusers_folder), "--last-sigma-cap-y", bad], capsys)
        assert code == 2
        assert_one_line_error(err, "--last-sigma-cap-y")


# ----------------------------------------------------------------------------- check


def _write(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj) if path.suffix == ".json" else yaml.safe_dump(obj))
    return path


EXPECTED = {"entries": [
    {"name": "toy", "when": {"data.dataset": "digits", "diffusion.timesteps": 100},
     "metrics": [
         {"name": "bpd", "file": "bpd.json", "key": "{pretrained.name}.bpd", "expected": 3.0,
          "abs": 0.1},
         {"name": "fid", "file": "fid.json", "key": "fid_x.m.ddim_S10", "expected": 10.0,
          "rel": 0.05}]},
    {"name": "other", "when": {"data.dataset": "cifar10"},
     "metrics": [{"file": "bpd.json", "key": "a", "expected": 1.0, "abs": 0.1}]},
]}
PARAMS = {"data": {"dataset": "digits"}, "diffusion": {"timesteps": 100},
          "pretrained": {"name": "m"}}


@pytest.fixture
def check_files(tmp_path: Path) -> dict[str, Path]:
    return {"params": _write(tmp_path / "params.yaml", PARAMS),
            "expected": _write(tmp_path / "expected.yaml", EXPECTED),
            "metrics": tmp_path / "metrics"}


def _check(files, capsys) -> tuple[int, str, str]:
    return run(["check", "--params", str(files["params"]), "--expected", str(files["expected"]),
                "--metrics-dir", str(files["metrics"])], capsys)


def test_check_passes_within_tolerance(check_files, capsys) -> None:
    _write(check_files["metrics"] / "bpd.json", {"m": {"bpd": 3.09}})
    _write(check_files["metrics"] / "fid.json", {"fid_x": {"m": {"ddim_S10": 10.45}}})
    code, out, err = _check(check_files, capsys)
    assert code == 0, err
    assert "entry: toy" in out and out.count("    pass\n") == 2 and "all 2 metrics pass" in out
    assert "10.45" in out and "0.5" in out  # measured and rel 5 % of 10 as the tolerance


@pytest.mark.parametrize(("bpd", "fid"), [(3.11, 10.0), (3.0, 9.4)], ids=["abs", "rel"])
def test_check_fails_outside_tolerance(check_files, capsys, bpd, fid) -> None:
    _write(check_files["metrics"] / "bpd.json", {"m": {"bpd": bpd}})
    _write(check_files["metrics"] / "fid.json", {"fid_x": {"m": {"ddim_S10": fid}}})
    code, out, err = _check(check_files, capsys)
    assert code == 1
    assert "FAIL" in out
    assert_one_line_error(err, "1 of 2 metrics do not pass", "outside tolerance")


def test_check_fails_on_a_missing_metric(check_files, capsys) -> None:
    _write(check_files["metrics"] / "bpd.json", {"m": {"bpd": 3.0}})  # no fid.json at all
    code, out, err = _check(check_files, capsys)
    assert code == 1 and "MISSING" in out
    assert_one_line_error(err, "fid: not measured")
    _write(check_files["metrics"] / "fid.json", {"fid_x": {"m": {"ddim_S20": 10.0}}})  # wrong key
    code, out, err = _check(check_files, capsys)
    assert code == 1 and "MISSING" in out


def test_check_fails_when_no_entry_matches(check_files, capsys) -> None:
    _write(check_files["params"], {**PARAMS, "diffusion": {"timesteps": 1000}})
    code, out, err = _check(check_files, capsys)
    assert code == 1 and out == ""
    assert_one_line_error(err, "no entry", "toy (data.dataset=digits, diffusion.timesteps=100)")


def test_check_fails_on_an_entry_without_numbers(check_files, capsys) -> None:
    expected = json.loads(json.dumps(EXPECTED))
    for m in expected["entries"][0]["metrics"]:
        m["expected"] = None
    _write(check_files["expected"], expected)
    _write(check_files["metrics"] / "bpd.json", {"m": {"bpd": 3.0}})
    _write(check_files["metrics"] / "fid.json", {"fid_x": {"m": {"ddim_S10": 10.0}}})
    code, out, err = _check(check_files, capsys)
    assert code == 1 and out.count("NO VALUE") == 2
    assert_one_line_error(err, "no expected value recorded")


def test_malformed_expected_file_is_exit_2(check_files, capsys) -> None:
    bad = json.loads(json.dumps(EXPECTED))
    del bad["entries"][0]["metrics"][0]["abs"]
    _write(check_files["expected"], bad)
    code, _, err = _check(check_files, capsys)
    assert code == 2
    assert_one_line_error(err, "toy.metrics[0]", "tolerance")


def test_check_outside_the_checkout_says_where_to_run_it(tmp_path: Path) -> None:
    """pipeline/ is not installed: `ddpm check` away from the checkout is one line, exit 2."""
    import os

    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "ddpm_core").symlink_to(ROOT / "ddpm_core")
    r = subprocess.run([sys.executable, "-c", "import sys; from ddpm_core.cli import main; "
                        "sys.exit(main(['check']))"], capture_output=True, text=True,
                       cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path / "lib")})
    assert r.returncode == 2, r.stderr
    assert_one_line_error(r.stderr, "run it from the repository's checkout")


def test_shipped_expected_file_is_valid_and_digits_entry_holds_the_default_runs_numbers(
        capsys) -> None:
    """The repository's own expected.yaml loads; the default run's entry matches the shipped
    params.yaml, has a recorded number for every metric (a null would fail `ddpm check`), names
    only metrics the shipped params produce, and keeps Analytic-DPM's order at K = 10."""
    from pipeline.check import load_expected, read_params, select_entry
    from pipeline.params import load_params

    entries = load_expected(ROOT / "reference" / "expected.yaml")
    entry = select_entry(entries, read_params(ROOT / "params.yaml"))
    assert entry.name == "digits_default"
    official = {e.name: e for e in entries}["table1_cifar10_official"]
    assert [m.expected for m in official.metrics] == [3.75, 3.17, 13.36, 6.84, 4.67, 4.16]
    params = load_params(ROOT / "params.yaml")
    got = {m.key: m.expected for m in entry.metrics}
    assert all(isinstance(v, float) for v in got.values()), got
    for key in got:
        variant, metric = key.split(".")
        assert variant in params.variants, key
        assert metric.startswith(("bpd_sigma2_", "fid_", "nll_ode_")), key
        if metric.startswith("nll_ode_"):  # the nll stage writes the dequantizations named
            deq = "variational" if metric.startswith("nll_ode_vardeq") else "uniform"
            assert deq in params.nll.dequantization, key
        if "_K" in metric:
            assert int(metric.rsplit("_K", 1)[1]) in params.bpd.steps, key
        if metric.endswith("_S10"):
            assert 10 in params.sample.steps, key
    assert got["simple.bpd_sigma2_analytic_K10"] < got["simple.bpd_sigma2_beta_K10"]
    # on the bound's footing the ODE lies below every bound (issue 19)
    assert got["simple.nll_ode_vardeq_bpd"] < got["simple.bpd_sigma2_analytic"]


# ----------------------------------------------------------------------------- preset -> check


def test_table1_preset_then_check_on_fake_results(tmp_path: Path, monkeypatch, capsys,
                                                  one_thread) -> None:
    """The documented CIFAR-10 path on small fake files: the preset writes a valid params.yaml
    whose pretrained folder loads and matches its T, and `ddpm check` judges fake metrics."""
    from tiny import make_diffusers_folder

    import ddpm_core
    from pipeline.params import load_params

    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(ROOT / "presets", tmp_path / "presets")
    shutil.copytree(ROOT / "reference", tmp_path / "reference")
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(["preset", "--list"], capsys)
    assert code == 0 and "table1_cifar10" in out.split()
    code, out, err = run(["preset", "table1_cifar10"], capsys)
    assert code == 0, err
    params = load_params("params.yaml")  # the pipeline's own validation
    assert list(params.variants) == ["ddpm_cifar10"]  # the preset's variants replace ours
    v = params.variants["ddpm_cifar10"]
    assert (params.data.dataset, params.diffusion.timesteps, v.format,
            params.sample.num_samples, params.sample.spacing) == ("cifar10", 1000, "diffusers",
                                                                  50000, "ddim_quadratic")
    # a stand-in for google/ddpm-cifar10-32 where the preset looks for it
    make_diffusers_folder(Path(v.pretrained), T=1000)
    _, diff = ddpm_core.load_model(v.pretrained)
    ddpm_core.check_matches(diff, schedule=params.schedule, timesteps=params.diffusion.timesteps)
    name = "ddpm_cifar10"
    _write(Path(f"metrics/bpd/{name}.json"), {name: {"bpd_sigma2_beta": 3.74}})
    fid = {"fid_ancestral_beta": 3.3, "fid_ddim_S10": 13.0, "fid_ddim_S20": 7.0,
           "fid_ddim_S50": 4.8, "fid_ddim_S100": 4.2}
    _write(Path(f"metrics/fid/{name}.json"), {name: fid})
    code, out, err = run(["check"], capsys)
    assert code == 0, out + err
    assert "entry: table1_cifar10_official" in out and "all 6 metrics pass" in out
    _write(Path(f"metrics/fid/{name}.json"), {name: {**fid, "fid_ddim_S10": 20.0}})
    code, out, err = run(["check"], capsys)
    assert code == 1
    assert_one_line_error(err, "FID, DDIM eta = 0, S = 10 (DDIM Table 1): outside tolerance")


def test_unknown_preset_names_the_ones_there(tmp_path: Path, monkeypatch, capsys) -> None:
    shutil.copytree(ROOT / "presets", tmp_path / "presets")
    monkeypatch.chdir(tmp_path)
    code, _, err = run(["preset", "table9"], capsys)
    assert code == 2
    assert_one_line_error(err, "table9", "table1_cifar10")


# ----------------------------------------------------------------------------- convert


def test_convert_round_trip_ours_diffusers_ours(tmp_path: Path, capsys, one_thread) -> None:
    """ours -> diffusers folder (read by real diffusers) -> ours: outputs equal."""
    import diffusers
    import torch
    from tiny import DIFFUSERS_TINY, make_model_file

    import ddpm_core
    ema, _, diff = make_model_file(tmp_path / "m.pt", cfg=DIFFUSERS_TINY, T=50,
                                   schedule="cosine", var_type="fixed_small")
    code, _, err = run(["convert", str(tmp_path / "m.pt"), str(tmp_path / "hf")], capsys)
    assert code == 0, err
    theirs = diffusers.UNet2DModel.from_pretrained(tmp_path / "hf").eval()
    sched = diffusers.DDPMScheduler.from_pretrained(tmp_path / "hf")
    code, _, err = run(["convert", str(tmp_path / "hf"), str(tmp_path / "back.pt")], capsys)
    assert code == 0, err
    back, back_diff = ddpm_core.load_model(tmp_path / "back.pt")
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 21, 49])
    with torch.no_grad():
        ours, ref, again = ema(x, t), theirs(x, t).sample, back(x, t)
    assert ours.abs().max() > 0.1
    assert (ours - ref).abs().max().item() <= 1e-5
    assert torch.equal(ours, again)
    assert sched.config.variance_type == "fixed_small"
    assert sched.config.beta_schedule == "squaredcos_cap_v2"
    torch.testing.assert_close(sched.betas.double(), diff.betas, rtol=1e-6, atol=1e-9)
    assert torch.equal(back_diff.betas, diff.betas) and back_diff.var_type == "fixed_small"


def test_convert_narrow_model_to_diffusers_is_one_line_exit_2(tmp_path: Path, capsys) -> None:
    from tiny import make_model_file

    make_model_file(tmp_path / "m.pt")
    code, _, err = run(["convert", str(tmp_path / "m.pt"), str(tmp_path / "hf")], capsys)
    assert code == 2
    assert_one_line_error(err, "32 GroupNorm groups")
    assert not (tmp_path / "hf").exists()
