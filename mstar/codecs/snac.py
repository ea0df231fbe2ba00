"""The SNAC audio codec's decoder (codes -> waveform), batched, with seedable noise.

SNAC (Siuzdak et al., "Multi-Scale Neural Audio Codec") quantizes audio into
several code streams at different rates; Orpheus emits the 24 kHz model's
three streams (1, 2 and 4 codes per 2048-sample frame). Only the decoding
half is built here: the codebooks with their output projections, and the
convolutional decoder. Module and parameter names follow the published
``pytorch_model.bin`` (``quantizer.quantizers.N.codebook.weight``,
``decoder.model.N....parametrizations.weight.original0``, ...), so those
weights load directly; encoder tensors in a checkpoint are not needed.

The decoder's noise blocks inject Gaussian noise; here each batch row draws
it from its own ``torch.Generator`` so a seeded request decodes to the same
samples whatever else shares the batch.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

__all__ = ["SNAC_24KHZ", "SNACConfig", "SNACDecoder"]


@dataclass(frozen=True)
class SNACConfig:
    """Hyper-parameters, named as in SNAC's ``config.json``."""

    sampling_rate: int = 24000
    encoder_dim: int = 48
    encoder_rates: tuple[int, ...] = (2, 4, 8, 8)
    latent_dim: int | None = None
    decoder_dim: int = 1024
    decoder_rates: tuple[int, ...] = (8, 8, 4, 2)
    attn_window_size: int | None = None
    codebook_size: int = 4096
    codebook_dim: int = 8
    vq_strides: tuple[int, ...] = (4, 2, 1)
    noise: bool = True
    depthwise: bool = True
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SNACConfig:
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        kw: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known}
        return cls(**kw, extra={k: v for k, v in d.items() if k not in known})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extra")
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @property
    def latent(self) -> int:
        return self.latent_dim if self.latent_dim is not None else self.encoder_dim * 2 ** len(self.encoder_rates)

    @property
    def hop_length(self) -> int:
        """Output samples per code of the finest stream."""
        return math.prod(self.decoder_rates)


#: The published ``hubertsiuzdak/snac_24khz`` configuration (the codec Orpheus was trained with).
SNAC_24KHZ = SNACConfig()


def _wn_conv(*args: Any, **kwargs: Any) -> nn.Module:
    return weight_norm(nn.Conv1d(*args, **kwargs))


def _wn_conv_t(*args: Any, **kwargs: Any) -> nn.Module:
    return weight_norm(nn.ConvTranspose1d(*args, **kwargs))


class Snake(nn.Module):
    """Periodic activation x + sin^2(alpha x) / alpha, one alpha per channel."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + (self.alpha + 1e-9).reciprocal() * torch.sin(self.alpha * x).pow(2)


class NoiseInjection(nn.Module):
    """Adds per-sample Gaussian noise scaled by a learned 1x1 projection of the input."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = _wn_conv(dim, dim, kernel_size=1, bias=False)
        #: Set by :meth:`SNACDecoder.decode` for the duration of one call: one generator per batch row.
        self.generators: Sequence[torch.Generator | None] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, t = x.shape
        gens = self.generators
        if gens is None:
            noise = torch.randn((b, 1, t), device=x.device, dtype=x.dtype)
        else:
            rows = [torch.randn((1, 1, t), generator=g, device=x.device, dtype=x.dtype) for g in gens]
            noise = torch.cat(rows)
        return x + noise * self.linear(x)


class ResidualUnit(nn.Module):
    def __init__(self, dim: int, dilation: int, groups: int, kernel: int = 7) -> None:
        super().__init__()
        pad = (kernel - 1) * dilation // 2
        self.block = nn.Sequential(
            Snake(dim),
            _wn_conv(dim, dim, kernel_size=kernel, dilation=dilation, padding=pad, groups=groups),
            Snake(dim),
            _wn_conv(dim, dim, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        trim = (x.shape[-1] - y.shape[-1]) // 2
        if trim > 0:
            x = x[..., trim:-trim]
        return x + y


class DecoderBlock(nn.Module):
    """Upsample by ``stride`` (transposed conv), optional noise, three dilated residual units."""

    def __init__(self, in_dim: int, out_dim: int, stride: int, noise: bool, groups: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            Snake(in_dim),
            _wn_conv_t(
                in_dim,
                out_dim,
                kernel_size=2 * stride,
                stride=stride,
                padding=math.ceil(stride / 2),
                output_padding=stride % 2,
            ),
        ]
        if noise:
            layers.append(NoiseInjection(out_dim))
        layers += [ResidualUnit(out_dim, d, groups) for d in (1, 3, 9)]
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class Decoder(nn.Module):
    def __init__(self, cfg: SNACConfig) -> None:
        super().__init__()
        latent, channels = cfg.latent, cfg.decoder_dim
        if cfg.attn_window_size is not None:
            raise ValueError(
                "SNAC decoders with local attention (attn_window_size) are not supported; the 24 kHz model has none"
            )
        layers: list[nn.Module]
        if cfg.depthwise:
            layers = [
                _wn_conv(latent, latent, kernel_size=7, padding=3, groups=latent),
                _wn_conv(latent, channels, kernel_size=1),
            ]
        else:
            layers = [_wn_conv(latent, channels, kernel_size=7, padding=3)]
        out_dim = channels
        for i, stride in enumerate(cfg.decoder_rates):
            in_dim, out_dim = channels // 2**i, channels // 2 ** (i + 1)
            layers.append(DecoderBlock(in_dim, out_dim, stride, cfg.noise, groups=out_dim if cfg.depthwise else 1))
        layers += [Snake(out_dim), _wn_conv(out_dim, 1, kernel_size=7, padding=3), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.model(z)


class CodebookLevel(nn.Module):
    """One code stream: codebook lookup, projection to the latent, repeat to the finest rate."""

    def __init__(self, latent: int, codebook_size: int, codebook_dim: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.codebook = nn.Embedding(codebook_size, codebook_dim)
        self.out_proj = _wn_conv(codebook_dim, latent, kernel_size=1)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        z = self.out_proj(self.codebook(codes).transpose(1, 2))
        return z.repeat_interleave(self.stride, dim=-1)


class Quantizer(nn.Module):
    def __init__(self, cfg: SNACConfig) -> None:
        super().__init__()
        self.quantizers = nn.ModuleList(
            CodebookLevel(cfg.latent, cfg.codebook_size, cfg.codebook_dim, s) for s in cfg.vq_strides
        )

    def forward(self, codes: Sequence[torch.Tensor]) -> torch.Tensor:
        z: torch.Tensor | None = None
        for level, c in zip(self.quantizers, codes, strict=True):
            part = level(c)
            z = part if z is None else z + part
        assert z is not None
        return z


class SNACDecoder(nn.Module):
    """SNAC codes -> waveform in [-1, 1]."""

    def __init__(self, cfg: SNACConfig = SNAC_24KHZ) -> None:
        super().__init__()
        self.config = cfg
        self.quantizer = Quantizer(cfg)
        self.decoder = Decoder(cfg)

    @property
    def sample_rate(self) -> int:
        return self.config.sampling_rate

    def decode(
        self, codes: Sequence[torch.Tensor], generators: Sequence[torch.Generator | None] | None = None
    ) -> torch.Tensor:
        """Decode ``codes`` (one [B, T_i] LongTensor per stream) to audio [B, 1, samples].

        ``generators`` (one per row) make the noise reproducible; without
        them the global RNG is used, as the original package does.
        """
        if len(codes) != len(self.quantizer.quantizers):
            raise ValueError(f"SNAC expects {len(self.quantizer.quantizers)} code streams, got {len(codes)}")
        if generators is not None and len(generators) != codes[0].shape[0]:
            raise ValueError("decode needs one generator per batch row")
        noise_blocks = [m for m in self.modules() if isinstance(m, NoiseInjection)]
        for m in noise_blocks:
            m.generators = generators
        # oneDNN picks convolution kernels by batch size, so a row's samples would depend on who
        # shares its batch (by float rounding); the native CPU kernels are batch-invariant and, for
        # these 1-D convolutions, no slower. The switch is process-wide for the call's duration.
        on_cpu = codes[0].device.type == "cpu"
        try:
            # Weight norm recomputes each weight on every access; cache them for this call.
            with _mkldnn_off() if on_cpu else contextlib.nullcontext(), parametrize.cached():
                return self.decoder(self.quantizer(codes))
        finally:
            for m in noise_blocks:
                m.generators = None

    def forward(self, codes: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.decode(codes)


_mkldnn_lock = threading.Lock()
_mkldnn_users = 0
_mkldnn_was = True


@contextlib.contextmanager
def _mkldnn_off() -> Iterator[None]:
    """Switch oneDNN off while any decode runs (the switch is process-wide, so concurrent decodes
    share it: the last one out restores the setting found by the first one in)."""
    global _mkldnn_users, _mkldnn_was
    with _mkldnn_lock:
        if _mkldnn_users == 0:
            _mkldnn_was = torch._C._get_mkldnn_enabled()
            torch._C._set_mkldnn_enabled(False)
        _mkldnn_users += 1
    try:
        yield
    finally:
        with _mkldnn_lock:
            _mkldnn_users -= 1
            if _mkldnn_users == 0:
                torch._C._set_mkldnn_enabled(_mkldnn_was)
