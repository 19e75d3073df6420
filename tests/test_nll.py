"""Where users see the exact likelihood (issue 19, section 3): the one engine call api.nll, the
nll@<v> stage and `ddpm nll` giving the same number, the report's table of the bound beside the
ODE bits/dim (measured and published), and MLflow's metric on the variant run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import run_stage, tiny_params

import ddpm_core
from ddpm_core import cli
from ddpm_core.api import nll
from ddpm_core.data import DataError
from ddpm_core.diffusion import Diffusion
from ddpm_core.ode import ode_bits_per_dim
from ddpm_core.schedules import make_betas
from ddpm_core.unet import UNet, UNetConfig

TOL = dict(rtol=1e-3, atol=1e-3)  # seconds on the CPU; the engine's defaults are 1e-5


def tiny_unet(out_channels: int = 1) -> UNet:
    torch.manual_seed(0)
    return UNet(UNetConfig(8, 1, out_channels, 8, (1,), 1, (), 0.0)).eval()


def tiny_images(n: int) -> np.ndarray:
    """n uint8 images [n, 8, 8, 1] with structure (not uniform noise)."""
    g = np.random.default_rng(3)
    base = (np.arange(64).reshape(8, 8) * 4).astype(np.int64)
    return ((base[None] + g.integers(0, 40, (n, 8, 8))) % 256).astype(np.uint8)[..., None]


def test_nll_is_exported_lazily_like_sample_and_bits_per_dim():
    assert ddpm_core.nll is nll and "nll" in ddpm_core.__all__


def test_nll_first_k_images_do_not_depend_on_how_many_are_asked():
    net, diff = tiny_unet(), Diffusion(make_betas("linear", 10))
    images = tiny_images(4)
    two = nll(net, diff, images[:2], batch_size=1, **TOL)
    four = nll(net, diff, images, batch_size=1, **TOL)
    assert two.bpd.shape == two.se.shape == two.nfe.shape == (2,)
    assert np.array_equal(two.bpd, four.bpd[:2]) and np.array_equal(two.nfe, four.nfe[:2])
    assert (four.nfe > 0).all() and np.isnan(four.se).all()  # one probe: no SE per image
    assert len(set(four.bpd.tolist())) == 4  # really per image
    # the mean and its standard error over the images
    assert four.mean == pytest.approx(four.bpd.mean())
    assert four.standard_error == pytest.approx(four.bpd.std(ddof=1) / 2)
    assert four.nfe_mean == pytest.approx(four.nfe.mean())


def test_nll_takes_channels_last_images_and_matches_the_ode_engine():
    # [N, H, W, C] uint8 in, the image index = position + start_index, as ode_bits_per_dim
    net, diff = tiny_unet(), Diffusion(make_betas("linear", 10))
    images = tiny_images(3)
    images[..., 0] = np.triu(images[..., 0])  # not symmetric: H and W must not swap
    got = nll(net, diff, images[1:], start_index=1, repeats=2, batch_size=2, seed=5, **TOL)
    want = ode_bits_per_dim(diff, net, torch.from_numpy(images).permute(0, 3, 1, 2)[1:],
                            seed=5, start_index=1, repeats=2, batch_size=2, **TOL)
    assert np.array_equal(got.bpd, want.bpd.numpy()) and np.array_equal(got.se, want.se.numpy())
    assert (got.se > 0).all()  # two probes: a standard error per image
    swapped = nll(net, diff, images[1:].transpose(0, 2, 1, 3).copy(), start_index=1, repeats=2,
                  batch_size=2, seed=5, **TOL)
    assert not np.array_equal(swapped.bpd, got.bpd)


def test_nll_learned_variance_uses_the_mean_only_and_mu_models_are_refused():
    eps_net, diff = tiny_unet(), Diffusion(make_betas("linear", 10))
    learned = tiny_unet(out_channels=2)
    mine = eps_net.state_dict()  # the same ε channel; the variance channel its own weights
    learned.load_state_dict({k: (mine[k] if v.shape == mine[k].shape else
                                 torch.cat([mine[k], v[v.shape[0] // 2:]]))
                             for k, v in learned.state_dict().items()})
    assert not torch.equal(learned(torch.zeros(1, 1, 8, 8), torch.zeros(1))[:, 1], torch.zeros(
        1, 8, 8))
    images = tiny_images(2)
    a = nll(eps_net, diff, images, **TOL)
    b = nll(learned, Diffusion(make_betas("linear", 10), var_type="learned_range"), images,
            **TOL)
    # the variance channel plays no part in the ODE (equal up to the convolution's rounding)
    assert np.array_equal(a.nfe, b.nfe) and a.bpd == pytest.approx(b.bpd, rel=1e-10)
    with pytest.raises(ValueError, match="mean_type: 'mu'"):
        nll(eps_net, Diffusion(make_betas("linear", 10), mean_type="mu"), images, **TOL)


def test_nll_bad_input_is_one_line():
    net, diff = tiny_unet(), Diffusion(make_betas("linear", 10))
    with pytest.raises(DataError, match="uint8"):
        nll(net, diff, tiny_images(2).astype(np.float32))
    with pytest.raises(ValueError, match="rtol and atol must be > 0"):
        nll(net, diff, tiny_images(2), rtol=0.0)
    # validated once, in the engine (ode.py keeps asserts)
    with pytest.raises(ValueError, match="error: repeats: 2"):
        nll(net, diff, tiny_images(2), divergence="exact", repeats=2)
    with pytest.raises(ValueError, match="error: divergence: 'trace'"):
        nll(net, diff, tiny_images(2), divergence="trace")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="error: batch_size: 0"):
        nll(net, diff, tiny_images(2), batch_size=0)


# ----------------------------------------------------------------------------- stage and CLI


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("nll")
    p = tiny_params()
    p["variants"] = {"simple": p["variants"]["simple"]}
    p["nll"].update(num_images=3, batch_size=2, seed=7)
    for stage in ("prepare", "train"):
        r = run_stage(stage, root, p)
        assert r.returncode == 0, r.stderr
    return root, p


@pytest.mark.slow
def test_stage_and_cli_print_the_same_number(trained, capsys, monkeypatch):
    root, p = trained
    r = run_stage("nll", root, p)
    assert r.returncode == 0, r.stderr
    m = json.loads((root / "metrics" / "nll" / "simple.json").read_text())["simple"]
    assert set(m) == {"nll_ode_bpd", "nll_ode_bpd_se", "nll_nfe_mean", "nll_ode_vardeq_bpd",
                      "nll_ode_vardeq_bpd_se", "nll_vardeq_nfe_mean"}
    assert all(np.isfinite(list(m.values()))) and m["nll_nfe_mean"] > 0
    t = json.loads((root / "timings" / "nll" / "simple.json").read_text())
    assert t["images"] == 3 and t["seconds"] > 0
    c = p["nll"]
    monkeypatch.chdir(root)
    code = cli.main(["nll", "models/simple.pt", "data/prepared/test.npy", "--num-images", "3",
                     "--rtol", str(c["rtol"]), "--atol", str(c["atol"]), "--batch-size", "2",
                     "--seed", "7", "--repeats", "1", "--device", "cpu", "--json", "r.json"])
    out = capsys.readouterr().out
    assert code == 0, out
    printed = (f"ODE bits/dim (uniform dequantization) {m['nll_ode_bpd']:.5f} ± "
               f"{m['nll_ode_bpd_se']:.5f}")
    assert printed in out and f"mean NFE {m['nll_nfe_mean']:.1f}" in out
    assert printed in r.stdout  # the stage's own line
    got = json.loads((root / "r.json").read_text())
    assert round(got["nll_ode_bpd"], 5) == m["nll_ode_bpd"]
    assert round(got["standard_error"], 5) == m["nll_ode_bpd_se"]
    # the variational dequantization: the same number from the CLI as from the stage
    assert cli.main(["nll", "models/simple.pt", "data/prepared/test.npy", "-n", "3", "--rtol",
                     str(c["rtol"]), "--atol", str(c["atol"]), "--batch-size", "2", "--seed", "7",
                     "--dequantization", "variational", "--device", "cpu"]) == 0
    printed_v = (f"ODE bits/dim (variational dequantization) {m['nll_ode_vardeq_bpd']:.5f} ± "
                 f"{m['nll_ode_vardeq_bpd_se']:.5f}")
    out = capsys.readouterr().out
    assert printed_v in out and printed_v in r.stdout
    assert m["nll_ode_vardeq_bpd"] != m["nll_ode_bpd"]
    # another seed is another number: the settings reach the engine
    cli.main(["nll", "models/simple.pt", "data/prepared/test.npy", "-n", "3", "--rtol",
              str(c["rtol"]), "--atol", str(c["atol"]), "--batch-size", "2", "--seed", "8",
              "--device", "cpu"])
    assert printed not in capsys.readouterr().out


@pytest.mark.slow
def test_stage_refuses_a_bad_tolerance_in_one_line(trained):
    root, p = trained
    q = json.loads(json.dumps(p))
    q["nll"]["rtol"] = 0
    r = run_stage("nll", root, q)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "nll.rtol: must lie in (0, 1)" in lines[0], r.stderr


@pytest.mark.slow
def test_cli_bad_tolerance_is_one_line(trained, capsys, monkeypatch):
    root, _ = trained
    monkeypatch.chdir(root)
    code = cli.main(["nll", "models/simple.pt", "data/prepared/test.npy", "--rtol", "0"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "rtol and atol must be > 0" in err


@pytest.mark.slow
def test_stage_skips_a_mu_model_with_one_line(trained):
    root, p = trained
    q = json.loads(json.dumps(p))
    q["variants"]["mu"] = {"mean_type": "mu", "var_type": "fixed_large", "loss": "simple"}
    for stage in ("train", "nll"):
        r = run_stage(stage, root, q, variant="mu")
        assert r.returncode == 0, r.stderr
    assert "nll[mu]: skipped: a μ-predicting model has no continuous-time ε" in r.stdout
    assert json.loads((root / "metrics" / "nll" / "mu.json").read_text()) == {"mu": {}}
    assert json.loads((root / "timings" / "nll" / "mu.json").read_text())["skipped"]
