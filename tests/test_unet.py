"""The DDPM U-Net: architecture (Ho et al. 2020, App. B), parameter counts, compile/precision."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from ddpm_core.unet import PRESETS, AttnBlock, UNet, UNetConfig, num_groups, timestep_embedding

TINY = UNetConfig(8, 1, 2, 32, (1, 2), 1, (4,), 0.1)


def _params(cfg: UNetConfig) -> int:
    """Parameters of the U-Net of cfg, built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        model = UNet(cfg)
    assert all(p.is_meta for p in model.parameters())
    return sum(p.numel() for p in model.parameters())


def _randomize(model: UNet, seed: int = 0) -> UNet:
    """Replace the near-zero official init of the last layers so outputs depend on inputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(max(p[0].numel(), 1)))
    return model


def test_cifar10_parameter_count_equals_official_35746307() -> None:
    assert _params(PRESETS["cifar10"]) == 35_746_307


@pytest.mark.parametrize("name", ["celebahq256", "lsun256"])
def test_256_parameter_count_is_about_114M(name: str) -> None:
    n = _params(PRESETS[name])
    print(f"{name}: {n:,} parameters")
    assert abs(n - 114e6) / 114e6 < 0.01


def test_digits_preset_is_small_and_keeps_the_shape() -> None:
    cfg = PRESETS["digits"]
    assert _params(cfg) < 1_000_000
    model = UNet(cfg)
    out = model(torch.randn(3, 1, 8, 8), torch.tensor([0, 500, 999]))
    assert out.shape == (3, 1, 8, 8)


def test_learned_variance_output_has_twice_the_channels() -> None:
    out = UNet(TINY)(torch.randn(2, 1, 8, 8), torch.tensor([1, 2]))
    assert out.shape == (2, 2, 8, 8)


def test_timestep_embedding_is_sin_cos_of_t_times_10000_pow_minus_i_over_half_minus_1() -> None:
    t = torch.tensor([0, 1, 17, 999])
    dim, half = 16, 8
    emb = timestep_embedding(t, dim).double()
    i = torch.arange(half, dtype=torch.float64)
    args = t.double()[:, None] * 10000.0 ** (-i / (half - 1))
    expected = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    assert emb.shape == (4, dim)
    torch.testing.assert_close(emb, expected, atol=2e-4, rtol=0)  # float32 args up to 999 rad


def test_group_norm_groups_are_32_for_wide_layers_and_divide_narrow_ones() -> None:
    for c in (128, 256, 384, 512, 768, 1024):
        assert num_groups(c) == 32
    for c in (8, 16, 24, 32, 48, 64, 96, 100):
        g = num_groups(c)
        assert c % g == 0 and c // g >= 4


def test_attention_runs_at_16x16_and_in_the_middle_only() -> None:
    model = UNet(PRESETS["cifar10"])
    sizes: list[tuple[int, int, int]] = []
    for m in model.modules():
        if isinstance(m, AttnBlock):
            m.register_forward_hook(lambda mod, inp, out: sizes.append(tuple(inp[0].shape[1:])))
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32), torch.tensor([3]))
    # 2 blocks on the way down, 3 on the way up at 16x16 (256 ch), one in the middle at 4x4.
    assert sorted(sizes) == sorted([(256, 16, 16)] * 5 + [(256, 4, 4)])


def test_output_depends_on_timestep_and_every_parameter_gets_a_gradient() -> None:
    model = _randomize(UNet(replace(TINY, dropout=0.0)))
    x = torch.randn(2, 1, 8, 8)
    a, b = model(x, torch.tensor([0, 0])), model(x, torch.tensor([500, 500]))
    assert (a - b).abs().max() > 1e-3
    (a.square().mean() + b.square().mean()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_official_init_makes_the_initial_output_nearly_zero() -> None:
    out = UNet(TINY)(torch.randn(2, 1, 8, 8), torch.tensor([3, 4]))
    assert out.abs().max() < 1e-3


def test_bad_shapes_are_rejected() -> None:
    model = UNet(TINY)
    with pytest.raises(AssertionError):
        model(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]))  # wrong channels
    with pytest.raises(AssertionError):
        model(torch.randn(2, 1, 8, 8), torch.tensor([1]))  # t is not [B]
    with pytest.raises(ValueError, match="image_size"):
        UNetConfig(10, 1, 1, 32, (1, 2, 2), 1, (), 0.0)


def test_channels_last_gives_the_same_output() -> None:
    model = _randomize(UNet(TINY)).eval()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 900])
    with torch.no_grad():
        ref = model(x, t)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.to(memory_format=torch.channels_last), t)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_bf16_autocast_is_close_to_fp32() -> None:
    model = _randomize(UNet(TINY)).eval()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 900])
    with torch.no_grad():
        ref = model(x, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t)
    assert out.dtype == torch.bfloat16
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 0.05


def test_forward_and_backward_trace_as_one_graph_without_breaks() -> None:
    # Dynamo tracing only (no Inductor codegen): seconds on the CPU.
    torch._dynamo.reset()
    model = UNet(TINY)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([1, 2])
    compiled = torch.compile(model, fullgraph=True, backend="eager")  # raises on a graph break
    compiled(x, t).sum().backward()
    assert model.conv_in.weight.grad is not None


def test_benchmark_runs_and_prints_every_figure(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.unet import parse_args, run

    argv = ["--preset", "digits", "--batch", "2", "--steps", "1", "--device", "cpu",
            "--peak-tflops", "1"]
    res = run(parse_args(argv))
    out = capsys.readouterr().out
    for field in ("params", "GFLOP/img", "train img/s", "forward img/s", "train % of 1 TFLOP/s"):
        assert field in out, field
    assert res["ours"]["params"] == _params(PRESETS["digits"])
    assert res["ours"]["gflop_per_image"] > 0 and res["ours"]["train_images_per_s"] > 0
    if "diffusers" in res:  # the same architecture: same parameters and FLOPs
        assert "ratio ours/diffusers" in out
        assert res["diffusers"]["params"] == res["ours"]["params"]
        assert res["diffusers"]["gflop_per_image"] == pytest.approx(
            res["ours"]["gflop_per_image"], rel=1e-6
        )


def test_attention_at_a_resolution_the_unet_does_not_have_is_an_error():
    import dataclasses

    import pytest

    from ddpm_core.unet import PRESETS

    with pytest.raises(ValueError, match=r"attn_resolutions=\[3\]: \[3\] is not a feature-map"):
        dataclasses.replace(PRESETS["digits"], attn_resolutions=(3,))
    assert dataclasses.replace(PRESETS["digits"], attn_resolutions=(8, 4)).attn_resolutions
