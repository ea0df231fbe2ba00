"""Configurations of the V-JEPA 2 video encoder and the V-JEPA 2-AC predictor.

Named configs hold the published shapes (ViT-L and ViT-g encoders from the
V-JEPA 2 release, the 24-block AC predictor of ``vjepa2-ac-vitg.pt``) and a
tiny variant of each that shares every code path.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "AC_CONFIGS",
    "ENCODER_CONFIGS",
    "ACPredictorConfig",
    "EncoderConfig",
]


@dataclass(frozen=True, slots=True)
class EncoderConfig:
    """The ViT video encoder (field names follow transformers' ``VJEPA2Config``)."""

    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    mlp_hidden_size: int = 4096  # explicit: ViT-g's ratio 48/11 is not exact in floating point
    patch_size: int = 16
    tubelet_size: int = 2
    crop_size: int = 256
    frames_per_clip: int = 64
    in_chans: int = 3
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def grid_size(self) -> int:
        """Patches per side of a frame."""
        return self.crop_size // self.patch_size

    @property
    def tokens_per_tubelet(self) -> int:
        return self.grid_size * self.grid_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class ACPredictorConfig:
    """The action-conditioned predictor (``VisionTransformerPredictorAC`` of the release)."""

    embed_dim: int = 1408  # the encoder's width (ViT-g)
    predictor_embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_hidden_size: int = 4096
    action_dim: int = 7  # end-effector delta: xyz, euler xyz, gripper
    use_extrinsics: bool = False  # the release checkpoint was trained without them
    crop_size: int = 256
    patch_size: int = 16
    max_frames: int = 32  # num_frames 64 // tubelet 2: the length of the release's attention mask
    layer_norm_eps: float = 1e-6

    @property
    def state_dim(self) -> int:
        return self.action_dim

    @property
    def extrinsics_dim(self) -> int:
        # The release builds the extrinsics encoder as Linear(action_dim - 1, ...): xyz + euler xyz.
        return self.action_dim - 1

    @property
    def cond_tokens(self) -> int:
        """Conditioning tokens per frame: action, state (and extrinsics)."""
        return 3 if self.use_extrinsics else 2

    @property
    def grid_size(self) -> int:
        return self.crop_size // self.patch_size

    @property
    def tokens_per_frame(self) -> int:
        return self.grid_size * self.grid_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


ENCODER_CONFIGS: dict[str, EncoderConfig] = {
    # facebook/vjepa2-vitl-fpc64-256
    "vitl": EncoderConfig(),
    # facebook/vjepa2-vitg-fpc64-256 (the encoder of V-JEPA 2-AC)
    "vitg": EncoderConfig(hidden_size=1408, num_hidden_layers=40, num_attention_heads=22, mlp_hidden_size=6144),
    # head_dim 16: 3 x 4 rotated dims plus 4 left as they are, like the full models' 3 x 20 + 4.
    "tiny": EncoderConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, mlp_hidden_size=128, crop_size=32, frames_per_clip=8
    ),
}

AC_CONFIGS: dict[str, ACPredictorConfig] = {
    "release": ACPredictorConfig(),
    "tiny": ACPredictorConfig(
        embed_dim=64, predictor_embed_dim=64, depth=2, num_heads=4, mlp_hidden_size=128, crop_size=32, max_frames=8
    ),
}
