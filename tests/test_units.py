"""Units that survive a kill (issue 18 §1) and shards (§2), at the engine: each finished batch
of sample, bound, Γ and the ODE is kept in a scratch area keyed by the settings; a rerun
computes only the missing ones, a corrupt one is found and computed again, and shards plus the
assembling call give the bytes of one uninterrupted call."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from tiny import OURS_TINY, random_net

from ddpm_core import api
from ddpm_core.diffusion import Diffusion
from ddpm_core.inference import inference_model
from ddpm_core.units import Shard, UnitStore, digest, owned, units_of


@pytest.fixture(scope="module")
def model() -> tuple[torch.nn.Module, Diffusion]:
    return random_net(OURS_TINY), Diffusion.from_schedule("linear", 10)


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)


@contextmanager
def dies_at(net: torch.nn.Module, at: int = 0) -> Iterator[list[int]]:
    """Count net's calls ([calls]) and raise at call `at` (as a kill would stop it; 0: never);
    a hook, so the network and its units' key are unchanged."""
    calls = [0]

    def hook(module: torch.nn.Module, args: tuple) -> None:
        calls[0] += 1
        if calls[0] == at:
            raise KeyboardInterrupt("killed")

    handle = net.register_forward_pre_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


def _unit_files(store: UnitStore) -> list:
    return sorted(p for p in store.root.rglob("*.npz"))


def test_units_and_shards_cover_every_image_once() -> None:
    assert units_of(10, 4) == [range(0, 4), range(4, 8), range(8, 10)]
    blocks = [owned(10, 3, Shard(i, 3)) for i in range(3)]
    assert [i for b in blocks for ids in b for i in ids] == list(range(10))
    assert [len(b) for b in blocks] == [2, 1, 1]
    with pytest.raises(ValueError, match="shard 4/5 has no unit"):
        owned(10, 3, Shard(4, 5))
    assert Shard.parse("1/4") == Shard(1, 4)
    for bad in ("4/4", "-1/2", "1", "a/b", "1/0"):
        with pytest.raises(ValueError, match="expected i/N"):
            Shard.parse(bad)


def test_a_killed_sample_call_resumes_with_only_the_missing_units(model, tmp_path) -> None:
    net, diff = model
    opts = {"sampler": "ancestral", "steps": 5, "seed": 3, "batch_size": 4}
    whole = api.sample(net, diff, 10, **opts)
    store = UnitStore(tmp_path / "units")
    # 5 steps, one call each per batch of 4: call 11 is in the third unit
    with pytest.raises(KeyboardInterrupt), dies_at(net, 11):
        api.sample(net, diff, 10, units=store, **opts)
    assert len(_unit_files(store)) == 2
    again = UnitStore(tmp_path / "units")
    with dies_at(net) as calls:
        out = api.sample(net, diff, 10, units=again, **opts)
    assert np.array_equal(out, whole)
    (units,) = again.opened
    assert (units.reused, units.computed, units.corrupt) == (2, 1, 0)
    assert calls == [5]  # the third unit's 5 steps only
    again.remove()
    assert not (tmp_path / "units").exists()


def test_a_corrupt_unit_is_found_and_computed_again(model, tmp_path, capsys) -> None:
    net, diff = model
    images = _images(9)
    first = UnitStore(tmp_path)
    whole = api.bound(net, diff, images, steps=[4], batch_size=4, t_batch=2, units=first)
    files = _unit_files(first)
    assert len(files) == 3
    blob = files[1].read_bytes()
    files[1].write_bytes(blob[: len(blob) // 2])  # truncated, as by a failing disk or copy
    again = UnitStore(tmp_path)
    out = api.bound(net, diff, images, steps=[4], batch_size=4, t_batch=2, units=again)
    assert torch.equal(out[4]["fixed_large"].total, whole[4]["fixed_large"].total)
    (units,) = again.opened
    assert (units.reused, units.computed, units.corrupt) == (2, 1, 1)
    assert "truncated or corrupt (checksum); computing it again" in capsys.readouterr().err


def test_a_setting_that_changes_the_numbers_never_reuses_a_unit(model, tmp_path) -> None:
    net, diff = model
    base = {"sampler": "ddim", "steps": 3, "seed": 0, "batch_size": 5}
    changes = [{"seed": 1}, {"steps": 4}, {"eta": 0.5}, {"clip_x0": False}, {"net_batch": 7}]
    calls = [(net, base)] + [(net, {**base, **c}) for c in changes]
    calls += [(random_net(OURS_TINY, seed=1), base), (inference_model(net, "bf16"), base)]
    stores = []
    for n_, opts in calls:
        store = UnitStore(tmp_path)
        api.sample(n_, diff, 5, units=store, **opts)
        stores.append(store.opened[0])
    assert len({u.folder for u in stores}) == len(calls)
    assert all(u.reused == 0 for u in stores)
    # the batch size changes no number: units of the same indices are reused
    store = UnitStore(tmp_path)
    api.sample(net, diff, 5, units=store, **{**base, "batch_size": 5, "net_batch": 100})
    assert store.opened[0].folder == stores[0].folder and store.opened[0].reused == 1


def test_shards_then_the_assembling_call_give_one_calls_bytes(model, tmp_path) -> None:
    net, diff = model
    opts = {"sampler": "ancestral", "steps": 4, "seed": 5, "batch_size": 3}
    whole = api.sample(net, diff, 11, **opts)
    parts = [api.sample(net, diff, 11, units=UnitStore(tmp_path, Shard(i, 2)), **opts)
             for i in range(2)]
    assert np.array_equal(np.concatenate(parts), whole)  # shard 0: units 0-1, shard 1: 2-3
    assert len(parts[0]) == 6
    store = UnitStore(tmp_path)
    with dies_at(net) as calls:
        assert np.array_equal(api.sample(net, diff, 11, units=store, **opts), whole)
    assert calls == [0] and store.opened[0].reused == 4


def test_gamma_and_the_ode_in_units_equal_one_pass(model, tmp_path) -> None:
    net, diff = model
    images = _images(7)
    gamma = api.estimate_gamma(net, diff, images, M=7, seed=2, batch_size=30)
    for shard in (Shard(0, 2), Shard(1, 2)):
        api.estimate_gamma(net, diff, images, M=7, seed=2, batch_size=3,
                           units=UnitStore(tmp_path, shard))
    store = UnitStore(tmp_path)
    # units of 3 images, t-major pairs of 3 per call: the same Γ, bit for bit
    assert torch.equal(api.estimate_gamma(net, diff, images, M=7, seed=2, batch_size=3,
                                          units=store), gamma)
    assert store.opened[0].reused == 3 and store.opened[0].computed == 0
    one = api.nll(net, diff, images[:4], batch_size=2, rtol=1e-3, atol=1e-3, seed=1)
    with pytest.raises(KeyboardInterrupt), dies_at(net, one.nfe[0] + 1):  # in the 2nd solve
        api.nll(net, diff, images[:4], batch_size=2, rtol=1e-3, atol=1e-3, seed=1,
                units=UnitStore(tmp_path))
    store = UnitStore(tmp_path)
    res = api.nll(net, diff, images[:4], batch_size=2, rtol=1e-3, atol=1e-3, seed=1,
                  units=store)
    assert np.array_equal(res.bpd, one.bpd) and np.array_equal(res.nfe, one.nfe)
    assert (store.opened[0].reused, store.opened[0].computed) == (1, 1)


def test_digest_sees_weights_wrappers_and_values() -> None:
    net = random_net(OURS_TINY)
    assert digest({"net": net}) == digest({"net": random_net(OURS_TINY)})
    assert digest({"net": net}) != digest({"net": inference_model(net, "bf16")})
    assert digest({"net": inference_model(net, "fp32")}) != digest(
        {"net": inference_model(net, "bf16")})
    assert digest({"x": torch.zeros(3)}) != digest({"x": torch.zeros(3, dtype=torch.float64)})
    assert digest({"a": 1, "b": [1, 2]}) == digest({"b": [1, 2], "a": 1})
    assert digest({"a": 1}) != digest({"a": 2})


def test_the_key_holds_the_package_source(tmp_path, monkeypatch) -> None:
    """A unit of old code is never read back after the code changed (a fixed sampler)."""
    from ddpm_core import units as U

    first = UnitStore(tmp_path).open({"a": 1}).folder
    monkeypatch.setattr(U, "code_digest", lambda: "another version")
    assert UnitStore(tmp_path).open({"a": 1}).folder != first


def test_a_stores_calls_take_each_networks_digest_once(model, tmp_path, monkeypatch) -> None:
    """The sample stage's sets share one network: its weights are hashed once, not per set."""
    from ddpm_core import units as U

    net, diff = model
    hashed = []
    real = U.digest
    monkeypatch.setattr(U, "digest", lambda x: hashed.append(type(x)) or real(x))
    store = UnitStore(tmp_path)
    for steps in (2, 3):
        api.sample(net, diff, 2, sampler="ddim", steps=steps, units=store)
    assert hashed.count(type(net)) == 1 and len({u.folder for u in store.opened}) == 2
    assert UnitStore(tmp_path).open({"net": net}).folder == UnitStore(tmp_path).open(
        {"net": real(net)}).folder
