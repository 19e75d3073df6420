"""ddpm_core.progress: plain lines when output is not a terminal, and the network-call counter
the sample and bpd stages drive it with."""

from __future__ import annotations

import io

import torch

from ddpm_core.progress import Progress, counting


def test_plain_lines_when_not_a_terminal(capsys):
    with Progress(4, "sample[x]", "calls", every=0.0, stream=io.StringIO()) as bar:
        for _ in range(4):
            bar.update(1)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("sample[x]: 1/4 (25%)") and lines[-1].startswith("sample[x]: 4/4")
    assert all("calls/s" in ln and "eta" in ln for ln in lines)


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
