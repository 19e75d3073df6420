"""The DDPM U-Net (Ho et al. 2020, Appendix B): a Wide-ResNet U-Net in the PixelCNN++ style.

Residual blocks take a sinusoidal timestep embedding through an MLP (ch -> 4ch -> 4ch, SiLU),
self-attention runs at the chosen resolutions, skip connections join the down and up paths, and
the middle block is res-attn-res. GroupNorm eps is 1e-6 as in the official TensorFlow code.
The network knows nothing about diffusion: ``model(x, t) -> output`` with raw indices ``t``.

The computation matches the official model and diffusers' ``UNet2DModel`` in the google/ddpm-*
configuration exactly (see ``ddpm_core/convert.py``), including TensorFlow's "SAME" padding of
the stride-2 downsampling convolution (one zero row/column at the bottom/right).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ddpm_core.modes import Preset

NORM_EPS = 1e-6  # tf.contrib.layers.group_norm default, used by the official code


@dataclass(frozen=True)
class UNetConfig:
    """Hyper-parameters of the U-Net; ``attn_resolutions`` are feature-map sizes (e.g. 16)."""

    image_size: int
    in_channels: int
    out_channels: int
    base_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    attn_resolutions: tuple[int, ...]
    dropout: float

    def __post_init__(self) -> None:
        if self.image_size % 2 ** (len(self.channel_mult) - 1) != 0:
            raise ValueError(f"image_size={self.image_size} is not divisible by "
                             "2**(len(channel_mult)-1)")
        if min(self.in_channels, self.out_channels, self.base_channels, self.num_res_blocks) < 1:
            raise ValueError("in/out/base channels and num_res_blocks must be >= 1")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"channel_mult={self.channel_mult} must be non-empty positive ints")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if self.base_channels % 2 != 0:
            raise ValueError(f"base_channels={self.base_channels} must be even (sin/cos halves)")
        missing = [r for r in self.attn_resolutions if r not in self.resolutions]
        if missing:  # would silently build a U-Net without that attention
            raise ValueError(f"attn_resolutions={list(self.attn_resolutions)}: {missing} is not a "
                             f"feature-map size of this U-Net {list(self.resolutions)}")

    @property
    def resolutions(self) -> tuple[int, ...]:
        """Feature-map size of each level, from the input resolution down."""
        return tuple(self.image_size // 2**i for i in range(len(self.channel_mult)))


PRESETS: dict[Preset, UNetConfig] = {  # one per modes.Preset
    # Ho et al. 2020, Appendix B; 35,746,307 parameters (google/ddpm-cifar10-32).
    "cifar10": UNetConfig(32, 3, 3, 128, (1, 2, 2, 2), 2, (16,), 0.1),
    # Official run_celebahq.py / run_lsun.py: dropout 0.0 on these data sets; ~114M parameters.
    "celebahq256": UNetConfig(256, 3, 3, 128, (1, 1, 2, 2, 4, 4), 2, (16,), 0.0),
    "lsun256": UNetConfig(256, 3, 3, 128, (1, 1, 2, 2, 4, 4), 2, (16,), 0.0),
    # Not in the paper: 8x8x1 scikit-learn digits, sized to train on 2 CPU cores in minutes
    # (285k parameters, 15.8 MFLOP per image; (1, 2) would double the cost for little gain).
    "digits": UNetConfig(8, 1, 1, 32, (1, 1), 1, (4,), 0.1),
}


def num_groups(channels: int) -> int:
    """GroupNorm groups: 32 as in the paper; narrow layers get a divisor, >= 4 channels each."""
    # Same fallback as diffusers' min(C // 4, 32); every width >= 128 of the presets gets 32.
    g = min(32, max(1, channels // 4))
    while channels % g:
        g -= 1
    return g


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm over ``channels`` with the official eps."""
    return nn.GroupNorm(num_groups(channels), channels, eps=NORM_EPS)


# Ho et al. 2020, Appendix B (Transformer sinusoidal embedding; official get_timestep_embedding)
def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding [B] -> [B, dim]: sin half then cos half, freqs 10000^(-i/(dim/2-1))."""
    half = dim // 2
    # Same op order as the official code / diffusers (freq_shift=1) so results are bit-identical.
    exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - 1))
    args = t[:, None].float() * freqs[None, :]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class ResBlock(nn.Module):
    """Wide-ResNet block [B, cin, H, W] + embedding [B, 4ch] -> [B, cout, H, W]."""

    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = group_norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb_proj = nn.Linear(emb_dim, cout)
        self.norm2 = group_norm(cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb_act: torch.Tensor) -> torch.Tensor:
        # emb_act is SiLU(embedding), computed once per forward pass by the caller.
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(emb_act)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over positions with a residual: [B, C, H, W] -> same."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.norm = group_norm(ch)
        self.qkv = nn.Linear(ch, 3 * ch)  # q, k, v fused in one matmul
        self.proj = nn.Linear(ch, ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]; a free view if channels_last
        q, k, v = self.qkv(h).unsqueeze(1).chunk(3, dim=-1)  # each [B, 1, HW, C]
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v
        h = self.proj(h.squeeze(1))
        return x + h.transpose(1, 2).reshape(b, c, hh, ww)  # keeps x's memory format


class Downsample(nn.Module):
    """Stride-2 3x3 conv with TF "SAME" padding (zero row/col at bottom/right): [B,C,H,W] -> H/2."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then 3x3 conv: [B, C, H, W] -> [B, C, 2H, 2W]."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution of the down or up path: res blocks, optional attention, resampling."""

    def __init__(self, blocks: list[ResBlock], attn: bool, resample: nn.Module | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        ch = [blk.conv2.out_channels for blk in blocks]
        self.attns = nn.ModuleList([AttnBlock(c) for c in ch] if attn else [])
        self.resample = resample

    def block(self, j: int, h: torch.Tensor, emb_act: torch.Tensor) -> torch.Tensor:
        """Res block j, then its attention if this level has any."""
        h = self.blocks[j](h, emb_act)
        return self.attns[j](h) if len(self.attns) > 0 else h


class MidBlock(nn.Module):
    """Middle of the U-Net, res-attn-res: [B, C, h, w] -> same."""

    def __init__(self, ch: int, emb_dim: int, dropout: float) -> None:
        super().__init__()
        self.block1 = ResBlock(ch, ch, emb_dim, dropout)
        self.attn = AttnBlock(ch)
        self.block2 = ResBlock(ch, ch, emb_dim, dropout)

    def forward(self, x: torch.Tensor, emb_act: torch.Tensor) -> torch.Tensor:
        return self.block2(self.attn(self.block1(x, emb_act)), emb_act)


class UNet(nn.Module):
    """DDPM U-Net: x [B, in, H, W] float, t [B] long -> [B, out, H, W]."""

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        ch, emb_dim, p = cfg.base_channels, 4 * cfg.base_channels, cfg.dropout
        widths = [ch * m for m in cfg.channel_mult]
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(),
                                      nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)

        skip_ch = [ch]  # channels of every tensor pushed on the skip stack
        self.down = nn.ModuleList()
        cin = ch
        for i, cout in enumerate(widths):
            blocks = [ResBlock(cin if j == 0 else cout, cout, emb_dim, p)
                      for j in range(cfg.num_res_blocks)]
            cin = cout
            down = Downsample(cout) if i < len(widths) - 1 else None
            skip_ch += [cout] * (cfg.num_res_blocks + (down is not None))
            self.down.append(Level(blocks, cfg.resolutions[i] in cfg.attn_resolutions, down))

        self.mid = MidBlock(cin, emb_dim, p)

        self.up = nn.ModuleList()  # from the lowest resolution up, in execution order
        for i, cout in reversed(list(enumerate(widths))):
            blocks = [ResBlock((cin if j == 0 else cout) + skip_ch.pop(), cout, emb_dim, p)
                      for j in range(cfg.num_res_blocks + 1)]  # each joins one skip tensor
            cin = cout
            up = Upsample(cout) if i > 0 else None
            self.up.append(Level(blocks, cfg.resolutions[i] in cfg.attn_resolutions, up))
        assert not skip_ch

        self.norm_out = group_norm(cin)
        self.conv_out = nn.Conv2d(cin, cfg.out_channels, 3, padding=1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official init: Xavier-uniform (variance_scaling fan_avg), zero biases, ~0 last layers."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        # default_init(scale=1e-10) in the official code: std scaled by sqrt(1e-10).
        last = [self.conv_out] + [m.conv2 for m in self.modules() if isinstance(m, ResBlock)]
        last += [m.proj for m in self.modules() if isinstance(m, AttnBlock)]
        for m in last:
            nn.init.xavier_uniform_(m.weight, gain=1e-5)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Predict the network output [B, out, H, W] from x [B, in, H, W] and indices t [B]."""
        cfg = self.cfg
        b, c, hh, ww = x.shape
        f = 2 ** (len(cfg.channel_mult) - 1)
        assert c == cfg.in_channels and hh % f == 0 and ww % f == 0, f"bad input {x.shape}"
        assert t.shape == (b,), f"t must be [B]={b}, got {tuple(t.shape)}"

        emb = self.time_mlp(timestep_embedding(t, cfg.base_channels).to(self.conv_in.weight.dtype))
        emb_act = F.silu(emb)  # every ResBlock applies SiLU before its projection

        h = self.conv_in(x)
        skips = [h]
        for level in self.down:
            for j in range(len(level.blocks)):
                h = level.block(j, h, emb_act)
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)
                skips.append(h)

        h = self.mid(h, emb_act)

        for level in self.up:
            for j in range(len(level.blocks)):
                h = level.block(j, torch.cat([h, skips.pop()], dim=1), emb_act)
            if level.resample is not None:
                h = level.resample(h)

        return self.conv_out(F.silu(self.norm_out(h)))
