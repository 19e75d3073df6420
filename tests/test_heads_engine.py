"""The variance heads (Bao et al. 2022b, heads.py) in the engine: api.bound, api.sample,
train_heads, the heads file and the `ddpm` command line, on a tiny UNet."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import OURS_TINY, make_model_file, random_net

from ddpm_core import api
from ddpm_core.api import NET_BATCH, FixedRows
from ddpm_core.chains import chain_of
from ddpm_core.cli import main
from ddpm_core.data import load_digits_images, to_unit
from ddpm_core.diffusion import Diffusion, q_sample
from ddpm_core.headfile import HeadsFileError
from ddpm_core.heads import (
    cov_x0,
    ddpm_sigma2,
    head_for,
    head_loss,
    head_vlb_terms,
    unet_backbone,
)
from ddpm_core.likelihood import even_trajectory, prior_bpd
from ddpm_core.seeds import keyed_randn

pytestmark = pytest.mark.usefixtures("one_thread")
T = 10


@pytest.fixture(scope="module")
def model() -> tuple[torch.nn.Module, Diffusion]:
    return random_net(OURS_TINY), Diffusion.from_schedule("linear", T)


def _heads(net: torch.nn.Module, scale: float = 0.0, seed: int = 0) -> dict:
    """Zero-initialised heads (scale 0) or heads with random weights of that scale."""
    g = torch.Generator().manual_seed(seed)
    heads = {}
    for kind in ("npr", "sn"):
        heads[kind] = head_for(net).eval().requires_grad_(False)
        with torch.no_grad():
            for p in heads[kind].conv.parameters():
                p.add_(scale * torch.randn(p.shape, generator=g))
            heads[kind].conv.bias.add_(3 * scale)  # h > ε̂² somewhere: SN's Cov not all 0
    return heads


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)


# ------------------------------------------------------------------------------- the bound
def _bound_by_hand(net, diff, heads, images, K, kind, seed):
    """Prior + Σ_k head_vlb_terms of the K-step chain, σ² = ddpm_sigma2 of the head's Cov,
    each x_τ from (seed, i, τ), the network in calls of NET_BATCH rows: per image [N]."""
    x0 = to_unit(torch.from_numpy(images).permute(0, 3, 1, 2)).double()
    steps, chain = chain_of(diff, None if K == diff.T else even_trajectory(diff.T, K))
    chain = chain.with_decoder_variance(diff.decoder_variance)
    backbone = unet_backbone(FixedRows(net, NET_BATCH))
    N = x0.shape[0]
    total = prior_bpd(diff, x0, steps[-1])
    for k, tau in enumerate(steps):
        t = torch.full((N,), tau)
        x_t = q_sample(diff, x0, t, keyed_randn(seed, [(i, tau) for i in range(N)], (1, 8, 8)))
        out, features = backbone(x_t.float(), t)
        out = out.double()
        h = heads[kind](features).double()
        kk = torch.full((N,), k)
        sigma2 = ddpm_sigma2(chain, kk, cov_x0(chain, kk, h, out, kind=kind, clip=True))
        total = total + head_vlb_terms(chain, out, x0, x_t, kk, sigma2=sigma2, clip_x0=True)
    return total


def test_bound_of_npr_and_sn_is_head_vlb_terms_summed(model) -> None:
    """api.bound's npr/sn totals are the prior plus head_vlb_terms of each step (per-pixel
    σ²_{s|t}(x_t) = β̃ + ᾱ_s β²/(1−ᾱ_t)² Cov), computed here step by step, at K < T and K = T;
    the β numbers of the same pass are those of a bound without heads, bit for bit."""
    net, diff = model
    heads = _heads(net, scale=0.05)
    images = _images(5)
    res = api.bound(net, diff, images, sigma2=["beta", "npr", "sn"], steps=[4, T], heads=heads,
                    seed=3, batch_size=2, t_batch=3)
    for K in (4, T):
        for kind in ("npr", "sn"):
            want = _bound_by_hand(net, diff, heads, images, K, kind, seed=3)
            assert torch.allclose(res[K][kind].total, want, rtol=1e-6, atol=0), (K, kind)
        assert not torch.allclose(res[K]["npr"].total, res[K]["sn"].total)
    plain = api.bound(net, diff, images, sigma2=["beta"], steps=[4, T], seed=3, batch_size=2,
                      t_batch=3)
    for K in (4, T):
        assert torch.equal(plain[K]["fixed_large"].total, res[K]["fixed_large"].total)


class _Calls(torch.nn.Module):
    """net, counting its calls."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.net(x, t)


def test_heads_cost_no_network_call_of_their_own(model) -> None:
    """npr and sn at every K come from the pass the other σ² make: as many network calls."""
    net, diff = model
    counted = _Calls(net)
    kw = dict(steps=[3, 6, T], batch_size=2, t_batch=3)
    api.bound(counted, diff, _images(5), sigma2=["beta"], **kw)
    plain, counted.calls = counted.calls, 0
    api.bound(counted, diff, _images(5), sigma2=["beta", "npr", "sn"], heads=_heads(net), **kw)
    assert counted.calls == plain > 0
    counted.calls = 0
    api.sample(counted, diff, 3, steps=4, sigma2="npr", heads=_heads(net))
    assert counted.calls == 4


def test_zero_heads_bound_is_the_beta_tilde_bound(model) -> None:
    """h = 0: NPR's Cov = 0 and SN's Cov = −(1−ᾱ)/ᾱ ε̂² clamped to 0, so σ² = β̃ exactly
    (the decoder: the full chain's β̃ in both) at every K, K = T too."""
    net, diff = model
    images = _images(4, 1)
    res = api.bound(net, diff, images, sigma2=["beta_tilde", "npr", "sn"], steps=[3, 6, T],
                    heads=_heads(net))
    for by in res.values():
        for kind in ("npr", "sn"):
            assert torch.allclose(by[kind].terms, by["fixed_small"].terms, rtol=1e-12, atol=0)
            assert torch.allclose(by[kind].total, by["fixed_small"].total, rtol=1e-12, atol=0)


def test_bound_of_trained_npr_heads_beats_beta_tilde_at_few_steps(model) -> None:
    """A few steps of train_heads make NPR's σ² larger than β̃ where ε̂ errs: at K = 3 (β̃ far
    too small) the bound drops well below β̃'s."""
    net, diff = model
    images = _images(32, 2)
    heads = api.train_heads(net, diff, images, steps=30, lr=1e-2, batch_size=16, seed=0)
    res = api.bound(net, diff, images[:8], sigma2=["beta_tilde", "npr"], steps=[3], heads=heads)
    assert float(res[3]["npr"].total.mean()) < float(res[3]["fixed_small"].total.mean()) - 1.0


# ------------------------------------------------------------------------------ the samplers
@pytest.mark.parametrize(("sampler", "steps", "sigma2", "eta"), [
    ("ancestral", None, "npr", 0.0), ("ancestral", 4, "sn", 0.0), ("ddim", 4, "npr", 0.0),
    ("ddim", 5, "sn", 0.5)])
def test_sample_with_heads_is_per_image_seeded(model, sampler, steps, sigma2, eta) -> None:
    """Image i depends on (seed, i) only: batch sizes 3 and 8 give the same images."""
    net, diff = model
    heads = _heads(net, scale=0.05)
    kw = dict(sampler=sampler, steps=steps, sigma2=sigma2, eta=eta, seed=5, heads=heads)
    a = api.sample(net, diff, 8, batch_size=3, **kw)
    assert np.array_equal(a, api.sample(net, diff, 8, batch_size=8, **kw))
    assert not np.array_equal(a, api.sample(net, diff, 8, batch_size=8, **{**kw, "seed": 6}))


def test_ddim_with_heads_at_eta_0_adds_the_heads_noise(model) -> None:
    """DDIM at η = 0: zero heads (Cov = 0, σ² = λ² = 0) are plain DDIM exactly; trained-like
    heads add their noise σ² = (√ᾱ_s − √((1−ᾱ_s) ᾱ_t/(1−ᾱ_t)))² Cov > 0 (Bao et al. 2022b)."""
    net, diff = model
    kw = dict(sampler="ddim", steps=5, eta=0.0, seed=2)
    plain = api.sample(net, diff, 4, **kw)
    for kind in ("npr", "sn"):
        zero = api.sample(net, diff, 4, sigma2=kind, heads=_heads(net), **kw)
        assert np.array_equal(zero, plain), kind
        noisy = api.sample(net, diff, 4, sigma2=kind, heads=_heads(net, scale=0.05), **kw)
        assert np.abs(noisy.astype(int) - plain.astype(int)).max() > 2, kind
    # η = 0.5: zero heads add λ² = η² β̃ noise, capped on the step to x_{τ_1}, as plain DDIM
    # (up to float32 rounding of σ)
    kw["eta"] = 0.5
    plain = api.sample(net, diff, 4, **kw).astype(int)
    assert not np.array_equal(plain, api.sample(net, diff, 4, last_sigma_cap_y=None, **kw))
    for kind in ("npr", "sn"):
        zero = api.sample(net, diff, 4, sigma2=kind, heads=_heads(net), **kw)
        assert np.abs(zero.astype(int) - plain).max() <= 1, kind


def test_ancestral_zero_heads_are_beta_tilde(model) -> None:
    """Zero heads: σ² = β̃ on the respaced chain, the same draws: the β̃ sampler's images (up to
    float32 rounding of σ, one grey level at most)."""
    net, diff = model
    for steps in (None, 4):
        want = api.sample(net, diff, 4, steps=steps, sigma2="beta_tilde", seed=1).astype(int)
        for kind in ("npr", "sn"):
            got = api.sample(net, diff, 4, steps=steps, sigma2=kind, heads=_heads(net), seed=1)
            assert np.abs(got.astype(int) - want).max() <= 1, (steps, kind)


# ----------------------------------------------------------------------------- train_heads
def _mean_head_loss(net, diff, heads, x0, seed: int) -> dict[str, float]:
    """Mean head_loss on fixed draws (t uniform) held out from training's."""
    g = torch.Generator().manual_seed(seed)
    n = x0.shape[0]
    t = torch.randint(diff.T, (n,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    x_t = q_sample(diff, x0, t, eps)
    out, features = unet_backbone(net)(x_t.float(), t)
    return {k: float(head_loss(k, h(features).double(), eps.double(), out.double()).mean())
            for k, h in heads.items()}


def test_train_heads_reduces_the_head_loss_and_reruns_identically() -> None:
    """On the digits (8×8) with a fixed tiny backbone: 40 Adam steps lower both heads' loss on
    held-out draws; the same seed gives the same weights, another seed other ones."""
    net, diff = random_net(OURS_TINY, seed=3), Diffusion.from_schedule("linear", 100)
    images = load_digits_images()[0][:256]
    kw = dict(steps=40, lr=1e-2, batch_size=32, seed=0)
    heads = api.train_heads(net, diff, images, **kw)
    x0 = to_unit(torch.from_numpy(images[:128]).permute(0, 3, 1, 2))
    before = _mean_head_loss(net, diff, _heads(net), x0, seed=99)
    after = _mean_head_loss(net, diff, heads, x0, seed=99)
    print(f"head loss before {before}, after 40 steps {after}")
    for kind in ("npr", "sn"):
        assert after[kind] < 0.7 * before[kind], (kind, before, after)
    again = api.train_heads(net, diff, images, **kw)
    other = api.train_heads(net, diff, images, **{**kw, "seed": 1})
    for kind in ("npr", "sn"):
        for (n, p), q in zip(heads[kind].state_dict().items(),
                             again[kind].state_dict().values(), strict=True):
            assert torch.equal(p, q), n
        assert not torch.equal(heads[kind].conv.weight, other[kind].conv.weight)
        assert not heads[kind].conv.weight.requires_grad


def test_train_heads_refuses_what_has_no_heads(model) -> None:
    net, diff = model
    images = _images(4)
    for other in (diff.with_var_type("learned_range"), Diffusion.from_schedule("linear", T, "x0")):
        with pytest.raises(ValueError, match="ε-model of fixed variance"):
            api.train_heads(net, other, images, steps=1)
    with pytest.raises(ValueError, match="steps >= 0"):
        api.train_heads(net, diff, images, steps=1, lr=0.0)
    net.train()
    try:
        with pytest.raises(ValueError, match="frozen: call net.eval"):
            api.train_heads(net, diff, images, steps=1)
    finally:
        net.eval()


# ------------------------------------------------------------------------------- the errors
@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(sigma2="npr"), "needs its head"),
    (dict(sigma2="sn", heads={"npr": None}), "needs its head"),
    (dict(sampler="ddim_analytic", sigma2="npr"), "DDIM's noise is set by eta"),
])
def test_sample_with_heads_rejects_bad_arguments_by_name(model, kwargs, match) -> None:
    net, diff = model
    with pytest.raises(ValueError, match=match):
        api.sample(net, diff, n=2, **kwargs)


def test_heads_are_refused_where_they_cannot_work(model) -> None:
    net, diff = model
    images = _images(2)
    with pytest.raises(ValueError, match="needs its head"):
        api.bound(net, diff, images, sigma2=["beta", "npr"])
    learned = Diffusion.from_schedule("linear", T, var_type="learned_range")
    with pytest.raises(ValueError, match="ε-model of fixed variance"):
        api.bound(net, learned, images, sigma2=["npr"], heads=_heads(net))
    with pytest.raises(ValueError, match="ε-model of fixed variance"):
        api.sample(net, Diffusion.from_schedule("linear", T, "x0"), 2, sampler="ddim",
                   sigma2="sn", heads=_heads(net))
    wider = random_net(OURS_TINY.__class__(**{**OURS_TINY.__dict__, "base_channels": 32}))
    with pytest.raises(ValueError, match="use the heads trained on this model"):
        api.bound(net, diff, images, sigma2=["npr"], heads=_heads(wider))
    with pytest.raises(ValueError, match="torch.compile does not run"):
        api.sample(torch.compile(net), diff, 2, sigma2="npr", heads=_heads(net))


# ------------------------------------------------------------------------------ the file
def test_heads_file_round_trip(model, tmp_path: Path) -> None:
    net, diff = model
    heads = _heads(net, scale=0.05)
    path = tmp_path / "m.heads.pt"
    api.save_heads(heads, path, meta={"model": "m.pt", "steps": 3})
    assert [p.name for p in tmp_path.iterdir()] == ["m.heads.pt"]  # no temporary left
    loaded = api.load_heads(path)
    assert set(loaded) == {"npr", "sn"}
    for kind in heads:
        for a, b in zip(heads[kind].state_dict().values(), loaded[kind].state_dict().values(),
                        strict=True):
            assert torch.equal(a, b)
    assert torch.load(path, weights_only=True)["meta"] == {"model": "m.pt", "steps": 3}
    images = _images(3)
    kw = dict(sigma2=["npr", "sn"], steps=[4])
    a = api.bound(net, diff, images, heads=heads, **kw)[4]
    b = api.bound(net, diff, images, heads=loaded, **kw)[4]
    assert all(torch.equal(a[v].total, b[v].total) for v in a)


def test_bad_heads_file_is_one_line_error_naming_path_and_fix(model, tmp_path: Path) -> None:
    net, _ = model
    good = tmp_path / "good.pt"
    api.save_heads(_heads(net), good)
    blob = good.read_bytes()
    model_file = tmp_path / "model.pt"
    make_model_file(model_file)
    cases = {"missing.pt": None, "text.pt": b"not a torch file", "cut.pt": blob[:len(blob) // 2],
             "model.pt": model_file.read_bytes()}
    for name, data in cases.items():
        path = tmp_path / name
        if data is not None:
            path.write_bytes(data)
        with pytest.raises(HeadsFileError) as e:
            api.load_heads(path)
        msg = str(e.value)
        assert "\n" not in msg and str(path) in msg and "train them again" in msg, msg


# --------------------------------------------------------------------------- the command line
def test_cli_sample_and_bpd_with_heads(tmp_path: Path, capsys) -> None:
    model_file = tmp_path / "m.pt"
    net, _, diff = make_model_file(model_file, T=T)
    heads_file = tmp_path / "m.heads.pt"
    heads = _heads(net, scale=0.05)
    api.save_heads(heads, heads_file)
    images = _images(3)
    np.save(tmp_path / "x.npy", images)
    out = tmp_path / "s.npz"
    code = main(["sample", str(model_file), "-n", "3", "--steps", "4", "--sampler", "ddim",
                 "--sigma2", "npr", "--heads", str(heads_file), "-o", str(out), "--device",
                 "cpu"])
    assert code == 0, capsys.readouterr().err
    want = api.sample(net, diff, 3, sampler="ddim", steps=4, sigma2="npr", heads=heads)
    assert np.array_equal(np.load(out)["images"], want)
    js = tmp_path / "b.json"
    code = main(["bpd", str(model_file), str(tmp_path / "x.npy"), "--sigma2", "sn", "--steps",
                 "4", "--heads", str(heads_file), "--json", str(js), "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    import json

    got = json.loads(js.read_text())["bpd"]
    want_bpd = api.bits_per_dim(net, diff, images, sigma2="sn", steps=4, heads=heads,
                                batch_size=100)
    assert math.isclose(got, want_bpd, rel_tol=1e-12)
    capsys.readouterr()
    for argv, words in (
            (["bpd", str(model_file), str(tmp_path / "x.npy"), "--sigma2", "npr"],
             ["--sigma2 npr needs --heads"]),
            (["bpd", str(model_file), str(tmp_path / "x.npy"), "--heads", str(heads_file)],
             ["--heads is only used with --sigma2 npr or sn"]),
            (["sample", str(model_file), "--sigma2", "sn", "--heads", str(tmp_path / "no.pt")],
             ["no.pt", "heads file not found"]),
            (["sample", str(model_file), "--sigma2", "sn", "--heads", str(model_file)],
             ["m.pt", "train them again"])):
        assert main(argv) == 2
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error: ")]
        assert len(err) == 1 and all(w in err[0] for w in words), (argv, err)
