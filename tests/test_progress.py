"""ddpm_core.progress: plain lines when output is not a terminal, and the network-call counter
the sample and bpd stages and the API's sample and bits/dim drive it with."""

from __future__ import annotations

import io

import torch
from tiny import OURS_TINY, random_net

from ddpm_core.progress import Progress, counting


def test_plain_lines_when_not_a_terminal(capsys):
    with Progress(4, "sample[x]", "calls", every=0.0, stream=io.StringIO()) as bar:
        for _ in range(4):
            bar.update(1)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4  # the closing line is not printed twice
    assert lines[0].startswith("sample[x]: 1/4 (25%)") and lines[-1].startswith("sample[x]: 4/4")
    assert all("calls/s" in ln and "eta" in ln for ln in lines)


def test_units_read_back_leave_the_total_and_the_line_names_the_unit(capsys):
    """A unit read back from the scratch area is taken off the total (the ETA is that of the
    rest) and the line says which unit runs."""
    with Progress(8, "sample[x]", "calls", every=0.0, stream=io.StringIO()) as bar:
        bar.skip(4, "unit 1/2")
        bar.update(2)
        bar.set_note("unit 2/2")
        bar.update(2)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("sample[x]: 2/4 (50%)") and lines[0].endswith(", unit 1/2")
    assert lines[1].startswith("sample[x]: 4/4 (100%)") and "eta 0 s, unit 2/2" in lines[1]


def test_no_lines_when_disabled_or_before_the_interval(capsys):
    with Progress(3, "a", enabled=False, every=0.0, stream=io.StringIO()) as bar:
        bar.update(3)
    with Progress(3, "b", every=3600.0, stream=io.StringIO()) as bar:
        bar.update(3)
    assert capsys.readouterr().out == ""


def test_counting_counts_network_calls_and_passes_outputs_through():
    net = torch.nn.Linear(2, 2)
    bar = Progress(0, "n", enabled=False)
    wrapped = counting(net, bar)
    x = torch.randn(3, 2)
    for _ in range(5):
        assert torch.equal(wrapped(x), net(x))
    assert bar.n == 5


class Recording:
    """A Progress that keeps what it was told: its total and every update."""

    made: list[Recording] = []

    def __init__(self, total: int, desc: str, unit: str = "it", **_: object) -> None:
        self.total, self.desc, self.unit, self.n, self.updates = total, desc, unit, 0, []
        Recording.made.append(self)

    def update(self, n: int = 1) -> None:
        self.n += n
        self.updates.append(n)

    def skip(self, n: int, note: str = "") -> None:
        self.total -= n

    def close(self) -> None:
        pass

    def __enter__(self) -> Recording:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _recorded(monkeypatch, net: torch.nn.Module) -> tuple[list, list[int]]:
    """Recording progress bars, and at each network call how many updates came before it."""
    from ddpm_core import progress

    Recording.made = []
    monkeypatch.setattr(progress, "Progress", Recording)
    seen: list[int] = []
    net.register_forward_pre_hook(
        lambda *_: seen.append(sum(len(b.updates) for b in Recording.made)))
    return Recording.made, seen


def test_sample_progress_moves_with_every_network_call_not_every_batch(monkeypatch):
    # `ddpm sample` counted images per finished batch (0 -> 64 after two minutes): the bar must
    # count the steps of every batch, so that it and its ETA move during a batch
    import ddpm_core
    from ddpm_core.diffusion import Diffusion

    diff = Diffusion.from_schedule("linear", 6, "eps", "fixed_large")
    for kwargs, steps in (({}, 6), ({"steps": 3}, 3), ({"sampler": "ddim", "steps": 4}, 4)):
        net = random_net(OURS_TINY)
        made, seen = _recorded(monkeypatch, net)
        ddpm_core.sample(net, diff, n=5, batch_size=2, seed=0, progress=True, **kwargs)
        assert len(made) == 1, kwargs
        bar = made[0]
        assert bar.total == 3 * steps and bar.unit == "calls", (kwargs, bar.total)  # 3 batches
        assert bar.n == bar.total and set(bar.updates) == {1}, kwargs
        assert seen == list(range(bar.total)), kwargs  # one update after each call, in step


def test_bound_progress_moves_with_every_network_call(monkeypatch):
    import numpy as np

    import ddpm_core
    from ddpm_core.diffusion import Diffusion

    diff = Diffusion.from_schedule("linear", 10, "eps", "fixed_large")
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 1), dtype=np.uint8)
    net = random_net(OURS_TINY)
    made, seen = _recorded(monkeypatch, net)
    ddpm_core.bits_per_dim(net, diff, images, sigma2="beta", batch_size=2, t_batch=3,
                           progress=True)
    bar, = made
    assert bar.total == 3 * 4 and bar.n == bar.total  # 3 batches x ceil(10 / 3) calls
    assert seen == list(range(bar.total))
