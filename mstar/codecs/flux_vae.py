"""The FLUX autoencoder (KL-VAE, 16 latent channels, 8x downsampling) used by BAGEL.

Parameter names follow the published ``ae.safetensors`` (``encoder.down.0.block.0.conv1.weight``,
``decoder.up.3.upsample.conv.weight``, ...). Latents are normalised with
``scale * (z - shift)``; the FLUX constants are scale 0.3611 and shift 0.1159.
Images are [B, 3, H, W] in [-1, 1].
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FLUX_VAE", "AutoEncoder", "VAEConfig", "denormalize_latent", "normalize_latent"]


@dataclass(frozen=True)
class VAEConfig:
    """Shape of the autoencoder; the defaults are FLUX's."""

    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = field(default=(1, 2, 4, 4))
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159
    norm_groups: int = 32

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


FLUX_VAE = VAEConfig()


def normalize_latent(z: torch.Tensor, scale: float, shift: float) -> torch.Tensor:
    """Raw VAE latent to the diffusion model's latent space."""
    return scale * (z - shift)


def denormalize_latent(z: torch.Tensor, scale: float, shift: float) -> torch.Tensor:
    """Inverse of :func:`normalize_latent`."""
    return z / scale + shift


def _norm(groups: int, channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=min(groups, channels), num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int) -> None:
        super().__init__()
        self.norm1 = _norm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = self.nin_shortcut(x) if self.nin_shortcut is not None else x
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions (1x1 convolutions as projections)."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = _norm(groups, channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (m(n).reshape(b, 1, c, h * w).transpose(2, 3) for m in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v).transpose(2, 3).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Pad right/bottom only, so a stride-2 3x3 conv halves even sizes exactly.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Mid(nn.Module):
    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class _Level(nn.Module):
    """One resolution: residual blocks, then an optional resampler."""

    def __init__(self, blocks: list[ResnetBlock], resample: nn.Module | None, name: str) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        if resample is not None:
            self.add_module(name, resample)
        self._resample_name = name if resample is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.block:
            x = blk(x)
        if self._resample_name is not None:
            x = getattr(self, self._resample_name)(x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        g = cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        levels = []
        cin = cfg.ch
        for i, mult in enumerate(cfg.ch_mult):
            cout = cfg.ch * mult
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(cin, cout, g))
                cin = cout
            last = i == len(cfg.ch_mult) - 1
            levels.append(_Level(blocks, None if last else Downsample(cin), "downsample"))
        self.down = nn.ModuleList(levels)
        self.mid = _Mid(cin, g)
        self.norm_out = _norm(g, cin)
        self.conv_out = nn.Conv2d(cin, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        g = cfg.norm_groups
        cin = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, cin, 3, padding=1)
        self.mid = _Mid(cin, g)
        levels: list[_Level] = []
        for i in reversed(range(len(cfg.ch_mult))):
            cout = cfg.ch * cfg.ch_mult[i]
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(cin, cout, g))
                cin = cout
            levels.insert(0, _Level(blocks, Upsample(cin) if i != 0 else None, "upsample"))
        # Stored lowest resolution last (index = level), run from the last one up.
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(g, cin)
        self.conv_out = nn.Conv2d(cin, cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoEncoder(nn.Module):
    """Encode images to normalised latents and back."""

    def __init__(self, cfg: VAEConfig = FLUX_VAE) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] to normalised latents [B, z, H/8, W/8].

        Draws from the posterior as the reference does (with ``generator``
        for reproducibility); ``sample=False`` returns its mean.
        """
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        z = mean
        if sample:
            noise = torch.randn(
                mean.shape, generator=generator, device=generator.device if generator is not None else mean.device
            )
            z = mean + torch.exp(0.5 * logvar) * noise.to(mean.device, mean.dtype)
        return normalize_latent(z, self.cfg.scale_factor, self.cfg.shift_factor)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents to images in (about) [-1, 1]."""
        return self.decoder(denormalize_latent(z, self.cfg.scale_factor, self.cfg.shift_factor))
