"""One engine, seeded per image (issue 17 §1): the same numbers whatever the batch size, the
number of processes or the door (the `ddpm` command or a pipeline stage)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_ranks, run_stage, tiny_params
from tiny import OURS_TINY, make_model_file, random_net

from ddpm_core import api
from ddpm_core.diffusion import Diffusion
from ddpm_core.seeds import ImageNoise, image_seed, keyed_randn

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model() -> tuple[torch.nn.Module, Diffusion]:
    return random_net(OURS_TINY), Diffusion.from_schedule("linear", 10)


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)


def test_image_seed_depends_on_the_seed_and_every_key_only() -> None:
    seeds = {image_seed(s, *k) for s in (0, 1) for k in ((0,), (1,), (0, 1), (1, 0), (0, 0))}
    assert len(seeds) == 10 and all(0 <= s < 2**63 for s in seeds)
    assert image_seed(3, 5, 7) == image_seed(3, 5, 7)
    rows = keyed_randn(0, [(4, 2), (9, 1)], (1, 2, 2))
    assert torch.equal(rows[1], keyed_randn(0, [(9, 1)], (1, 2, 2))[0])


def test_image_noise_row_is_its_own_stream_whatever_its_companions() -> None:
    both = ImageNoise(0, [3, 8])
    alone = ImageNoise(0, [8])
    for _ in range(3):  # x_T, then two steps' noise, in order
        assert torch.equal(both.randn((2, 1, 4, 4))[1], alone.randn((1, 1, 4, 4))[0])


def test_unet_outputs_depend_on_the_batch_size_but_not_at_a_fixed_call_shape(model,
                                                                             one_thread) -> None:
    """Why the engine calls the network in NET_BATCH rows: BLAS picks kernels by shape."""
    net, _ = model
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g)
    with torch.no_grad():
        full = net(x, t)
        fixed = api.FixedRows(net, 64)
        parts = torch.cat([fixed(x[s:s + 13], t[s:s + 13]) for s in range(0, 64, 13)])
    assert torch.equal(parts, full)
    with torch.no_grad():
        ones = torch.cat([net(x[i:i + 1], t[i:i + 1]) for i in range(64)])
    # measured on CPU: the 1-image calls differ from the 64-image call in the last bits
    assert (ones - full).abs().max() < 1e-4


@pytest.mark.parametrize("kwargs", [dict(steps=3, sigma2="beta"),
                                    dict(sampler="ddim", steps=3, eta=0.5)])
def test_sample_is_the_same_for_batch_sizes_7_64_and_400(model, kwargs, one_thread) -> None:
    net, diff = model
    runs = [api.sample(net, diff, n=400, seed=5, batch_size=b, net_batch=16, **kwargs)
            for b in (7, 64, 400)]
    assert runs[0].shape == (400, 8, 8, 1)
    assert np.array_equal(runs[0], runs[1]) and np.array_equal(runs[0], runs[2])
    assert len({im.tobytes() for im in runs[0]}) > 390  # every image its own noise
    # image i is its own: the first 5 of n = 400 are the 5 of n = 5
    assert np.array_equal(api.sample(net, diff, n=5, seed=5, net_batch=16, **kwargs),
                          runs[0][:5])


def test_every_sampler_starts_image_i_from_the_same_x_T(model, monkeypatch) -> None:
    """x_T of image i is the first draw of its stream (seed, i), for every sampler."""
    from ddpm_core import samplers

    net, diff = model
    seen = []

    def record(diff, model, x_T, **kw):
        seen.append(x_T.clone())
        return x_T.clamp(-1, 1)

    monkeypatch.setattr(samplers, "sample_ancestral", record)
    monkeypatch.setattr(samplers, "sample_ddim", record)
    gamma = torch.full((10,), 0.5, dtype=torch.float64)
    for kwargs in (dict(), dict(steps=4, sigma2="beta_tilde"), dict(sampler="ddim", steps=4),
                   dict(sampler="ddim_analytic", steps=4, gamma=gamma)):
        api.sample(net, diff, n=5, seed=2, batch_size=2, **kwargs)
    assert len(seen) == 4 * 3
    want = ImageNoise(2, range(5)).randn((5, 1, 8, 8))
    for k in range(4):
        assert torch.equal(torch.cat(seen[3 * k:3 * k + 3]), want)


def test_bits_per_dim_per_image_is_the_same_for_batch_sizes_t_batches_and_chains(
        model, one_thread) -> None:
    net, diff = model
    images = _images(360)
    per = {b: api.bits_per_dim_per_image(net, diff, images, batch_size=b, t_batch=3,
                                         net_batch=32) for b in (1, 13, 360)}
    assert np.array_equal(per[1], per[13]) and np.array_equal(per[1], per[360])
    assert np.array_equal(per[1], api.bits_per_dim_per_image(net, diff, images, batch_size=50,
                                                             t_batch=10, net_batch=32))
    # asked with other K and σ², the full chain's σ² = β bound of each image is the same
    many = api.bound(net, diff, images[:26], sigma2=["beta_tilde", "fixed_large"],
                     steps=[4, 10, 6], batch_size=13, t_batch=4, net_batch=32)
    assert np.array_equal(many[10]["fixed_large"].total.numpy(), per[1][:26])
    k4 = api.bits_per_dim_per_image(net, diff, images[:26], sigma2="beta_tilde", steps=4,
                                    batch_size=5, t_batch=1, net_batch=32)
    assert np.array_equal(many[4]["fixed_small"].total.numpy(), k4)
    assert not np.array_equal(api.bits_per_dim_per_image(net, diff, images[:26], seed=1,
                                                         net_batch=32), per[1][:26])


def test_bound_total_is_its_prior_plus_its_terms(model, one_thread) -> None:
    net, diff = model
    res = api.bound(net, diff, _images(4), steps=[4, 10])
    for K, r in ((4, res[4]["fixed_large"]), (10, res[10]["fixed_large"])):
        assert r.terms.shape == (4, K) and r.timesteps[-1] == 9
        torch.testing.assert_close(r.total, r.prior + r.terms.sum(1), rtol=0, atol=0)


def test_gamma_is_the_same_for_every_batch_size(model, one_thread) -> None:
    net, diff = model
    images = _images(12)
    runs = [api.estimate_gamma(net, diff, images, M=12, seed=4, batch_size=b)
            for b in (1, 7, 500)]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


# ----------------------------------------------------------------------------- processes

WORKER = """
import json, sys
import numpy as np, torch
sys.path.insert(0, "tests")
from tiny import OURS_TINY, random_net
from ddpm_core import api, distributed as D
from ddpm_core.diffusion import Diffusion
torch.set_num_threads(1)
D.init_distributed("cpu")
net, diff = random_net(OURS_TINY), Diffusion.from_schedule("linear", 10)
images = np.random.default_rng(0).integers(0, 256, (9, 8, 8, 1), dtype=np.uint8)
bpd = api.bits_per_dim_per_image(net, diff, images, batch_size=2, t_batch=3)
x = api.sample(net, diff, n=7, steps=3, seed=1, batch_size=2)
json.dump({"bpd": bpd.tolist(), "sample": x.tolist()}, open(sys.argv[1], "w"))
D.cleanup()
"""


@pytest.mark.slow
def test_bits_per_dim_and_samples_of_two_gloo_processes_equal_one(tmp_path: Path) -> None:
    run_ranks(lambda rank: [sys.executable, "-c", WORKER, str(tmp_path / f"{rank}")], timeout=180)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    subprocess.run([sys.executable, "-c", WORKER, str(tmp_path / "one")], cwd=ROOT, env=env,
                   check=True, timeout=180)
    one = json.loads((tmp_path / "one").read_text())
    for rank in range(2):
        got = json.loads((tmp_path / f"{rank}").read_text())
        assert got["bpd"] == one["bpd"] and got["sample"] == one["sample"]


@pytest.mark.slow
def test_ddpm_bpd_and_the_bpd_stage_print_the_same_bits_per_dim(tmp_path: Path) -> None:
    """Same model file and images: `ddpm bpd --json` (its default batch and t_batch) and
    bpd@simple (params' batch 4, t_batch 5) agree to every printed digit."""
    (tmp_path / "models").mkdir()
    (tmp_path / "data" / "prepared").mkdir(parents=True)
    make_model_file(tmp_path / "models" / "simple.pt", T=10)
    np.save(tmp_path / "data" / "prepared" / "test.npy", _images(6, seed=3))
    p = tiny_params()
    p["variants"] = {"simple": p["variants"]["simple"]}
    p["bpd"].update(num_images=None, batch_size=4, t_batch=5, steps=[],
                    variances=["fixed_large", "fixed_small"])
    r = run_stage("bpd", tmp_path, p)
    assert r.returncode == 0, r.stderr
    stage = json.loads((tmp_path / "metrics" / "bpd" / "simple.json").read_text())["simple"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for short, key in (("beta", "bpd_sigma2_beta"), ("beta_tilde", "bpd_sigma2_beta_tilde")):
        out = tmp_path / f"{short}.json"
        c = subprocess.run([sys.executable, "-m", "ddpm_core.cli", "bpd", "models/simple.pt",
                            "data/prepared/test.npy", "--sigma2", short, "--json", str(out),
                            "--device", "cpu"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert c.returncode == 0, c.stderr
        cli = json.loads(out.read_text())["bpd"]
        assert round(cli, 5) == stage[key], (short, cli, stage[key])
        assert f"{stage[key]:.4f}" in r.stdout and f"bits/dim {cli:.5f}" in c.stdout


@pytest.mark.slow
def test_import_of_pretrained_weights_checks_them_against_params(tmp_path: Path) -> None:
    """train@<v> with `pretrained`: api.load_model, then api.check_matches against params.yaml
    (the 1000-step model under diffusion.timesteps 10 was imported silently), then the file."""
    from tiny import make_diffusers_folder

    from ddpm_core.modelfile import load_model_file

    make_diffusers_folder(tmp_path / "official", T=1000, schedule="linear")
    make_diffusers_folder(tmp_path / "small", T=10, schedule="quadratic")
    p = tiny_params()
    p["variants"] = {"official": {"pretrained": str(tmp_path / "official"),
                                  "format": "diffusers"}}
    r = run_stage("train", tmp_path, p)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("error: diffusion.timesteps is 10 but variants.official.pretrained")
    assert "has T = 1000 (set diffusion.timesteps: 1000)" in lines[0]
    assert not (tmp_path / "models").exists()
    p["variants"] = {"small": {"pretrained": str(tmp_path / "small"), "format": "diffusers"}}
    r = run_stage("train", tmp_path, p)  # params' schedule is linear, the weights' quadratic
    assert r.returncode == 2 and "schedule 'linear' gives β[" in r.stderr, r.stderr
    p["schedule"] = "quadratic"
    r = run_stage("train", tmp_path, p)
    assert r.returncode == 0, r.stderr
    m = load_model_file(tmp_path / "models" / "small.pt")
    assert m.diffusion.T == 10 and m.spec.schedule == "quadratic"
