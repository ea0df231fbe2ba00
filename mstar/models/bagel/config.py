"""BAGEL's configuration: the Qwen2 MoT language model, the SigLIP ViT, the FLUX VAE and the glue.

``BagelConfig.full()`` is BAGEL-7B-MoT as published (``llm_config.json``,
``vit_config.json`` and the constants the reference app sets in code);
``BagelConfig.tiny()`` keeps every structural feature at toy width so that
tests run in seconds on a CPU.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from mstar.codecs.flux_vae import FLUX_VAE, VAEConfig

__all__ = ["BagelConfig", "LLMConfig", "ViTConfig"]


@dataclass(frozen=True)
class LLMConfig:
    """Qwen2 with QK-norm, each layer holding an understanding and a generation expert."""

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    max_position_embeddings: int = 32768
    qk_norm: bool = True
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class ViTConfig:
    """SigLIP so400m/14 at 980 px with learned absolute positions (no 2D RoPE)."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 26  # the published 27 minus the last (vit_select_layer -2)
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 980
    patch_size: int = 14
    layer_norm_eps: float = 1e-6

    @property
    def num_patches_per_side(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class BagelConfig:
    llm: LLMConfig = field(default_factory=LLMConfig)
    vit: ViTConfig = field(default_factory=ViTConfig)
    vae: VAEConfig = FLUX_VAE
    latent_patch_size: int = 2
    max_latent_size: int = 64  # latent patches per side: 64 * 16 = 1024 px
    vit_max_num_patch_per_side: int = 70
    timestep_embed_dim: int = 256
    # Image preprocessing (the reference's ImageTransform arguments).
    vae_image_max: int = 1024
    vae_image_min: int = 512
    vit_image_max: int = 980
    vit_image_min: int = 224
    # Token ids of the markers (Qwen2 layout).
    bos_token_id: int = 151644  # <|im_start|>
    eos_token_id: int = 151645  # <|im_end|>
    start_of_image: int = 151652  # <|vision_start|>
    end_of_image: int = 151653  # <|vision_end|>

    @property
    def latent_downsample(self) -> int:
        """Pixels per latent token side: VAE downsampling times the latent patch size (16)."""
        return self.vae.downsample * self.latent_patch_size

    @property
    def max_image_side(self) -> int:
        return self.max_latent_size * self.latent_downsample

    @property
    def patch_latent_dim(self) -> int:
        return self.latent_patch_size**2 * self.vae.z_channels

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # ------------------------------------------------------------------ variants
    @classmethod
    def full(cls) -> BagelConfig:
        return cls()

    @classmethod
    def tiny(cls) -> BagelConfig:
        """Toy widths, the real vocabulary size (so special tokens keep their ids)."""
        return cls(
            llm=LLMConfig(
                vocab_size=152064,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                rope_theta=10000.0,
            ),
            vit=ViTConfig(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=224,
                patch_size=14,
            ),
            vae=VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, norm_groups=8),
            max_latent_size=8,  # up to 128 x 128 px
            vit_max_num_patch_per_side=16,
            timestep_embed_dim=32,
            vae_image_max=128,
            vae_image_min=32,
            vit_image_max=224,
            vit_image_min=28,
        )

    @classmethod
    def from_checkpoint_dir(cls, path: str | Path) -> BagelConfig:
        """Read ``llm_config.json`` and ``vit_config.json``; the rest are the reference's code constants."""
        root = Path(path)
        llm_raw = json.loads((root / "llm_config.json").read_text())
        vit_raw = json.loads((root / "vit_config.json").read_text())
        base = cls.full()
        llm = replace(
            base.llm,
            **{
                k: llm_raw[k]
                for k in (
                    "vocab_size",
                    "hidden_size",
                    "intermediate_size",
                    "num_hidden_layers",
                    "num_attention_heads",
                    "num_key_value_heads",
                    "rms_norm_eps",
                    "rope_theta",
                    "max_position_embeddings",
                )
                if k in llm_raw
            },
        )
        vit_fields = {
            k: vit_raw[k]
            for k in (
                "hidden_size",
                "intermediate_size",
                "num_attention_heads",
                "num_channels",
                "image_size",
                "patch_size",
                "layer_norm_eps",
            )
            if k in vit_raw
        }
        if "num_hidden_layers" in vit_raw:
            # The reference drops the last layer (features come from the penultimate one).
            vit_fields["num_hidden_layers"] = int(vit_raw["num_hidden_layers"]) - 1
        return replace(base, llm=llm, vit=replace(base.vit, **vit_fields))
