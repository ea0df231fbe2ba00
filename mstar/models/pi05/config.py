"""Pi0.5 sizes and constants: the published checkpoint's, a tiny variant's, and reading config.json."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from mstar.errors import WeightsError
from mstar.layers.gemma import GemmaDims
from mstar.layers.siglip import SiglipDims

__all__ = ["FULL", "GEMMA_VARIANTS", "TINY", "Pi05Config", "config_from_lerobot"]

#: The Gemma sizes openpi names (shared by lerobot's config.json).
GEMMA_VARIANTS: dict[str, GemmaDims] = {
    "gemma_300m": GemmaDims(width=1024, depth=18, mlp_dim=4096, num_heads=8, num_kv_heads=1, head_dim=256),
    "gemma_2b": GemmaDims(width=2048, depth=18, mlp_dim=16384, num_heads=8, num_kv_heads=1, head_dim=256),
}


@dataclass(frozen=True)
class Pi05Config:
    """Everything that sizes a Pi0.5 model and its pre/post-processing."""

    vlm: GemmaDims
    expert: GemmaDims
    vision: SiglipDims
    vocab_size: int = 257152
    action_dim: int = 32  # actions are padded to this many channels
    max_state_dim: int = 32
    chunk_size: int = 50  # actions per chunk (openpi's action_horizon)
    num_steps: int = 10  # Euler steps from noise (t=1) to actions (t=0)
    min_period: float = 4e-3  # sinusoidal time embedding periods
    max_period: float = 4.0
    max_text_tokens: int = 200  # the prompt budget the checkpoint was trained with
    max_cameras: int = 3
    rope_theta: float = 10000.0
    state_bins: int = 256

    def __post_init__(self) -> None:
        # The expert reads the VLM's cache layer by layer, so the two stacks must agree on it.
        v, e = self.vlm, self.expert
        if (v.depth, v.num_kv_heads, v.head_dim) != (e.depth, e.num_kv_heads, e.head_dim):
            raise WeightsError(
                f"the action expert (depth {e.depth}, {e.num_kv_heads} KV heads of {e.head_dim}) must match the VLM "
                f"(depth {v.depth}, {v.num_kv_heads} KV heads of {v.head_dim}) to share its KV cache"
            )

    @property
    def image_tokens(self) -> int:
        return self.vision.num_patches

    @property
    def max_prefix_len(self) -> int:
        return self.max_cameras * self.image_tokens + self.max_text_tokens

    def digest(self) -> dict[str, Any]:
        """A JSON-able summary (keys the tiny weights cache)."""
        return asdict(self)


FULL = Pi05Config(
    vlm=GEMMA_VARIANTS["gemma_2b"],
    expert=GEMMA_VARIANTS["gemma_300m"],
    vision=SiglipDims(width=1152, depth=27, mlp_dim=4304, num_heads=16, patch_size=14, image_size=224),
)

#: Same code path and pre/post-processing as FULL (224 px, 50 x 32 actions), random weights, small widths.
TINY = Pi05Config(
    vlm=GemmaDims(width=64, depth=2, mlp_dim=128, num_heads=4, num_kv_heads=1, head_dim=16),
    expert=GemmaDims(width=32, depth=2, mlp_dim=64, num_heads=4, num_kv_heads=1, head_dim=16),
    vision=SiglipDims(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=14, image_size=224),
    vocab_size=512,
)


def config_from_lerobot(path: Path) -> Pi05Config:
    """Read lerobot's ``config.json`` (PI05Config fields); missing keys keep the published defaults."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise WeightsError(f"could not read {str(path)!r}: {exc}") from exc
    if raw.get("type", "pi05") != "pi05":
        raise WeightsError(f"{str(path)!r} describes a {raw.get('type')!r} policy, not pi05")
    cfg = FULL
    try:
        vlm = GEMMA_VARIANTS[raw.get("paligemma_variant", "gemma_2b")]
        expert = GEMMA_VARIANTS[raw.get("action_expert_variant", "gemma_300m")]
    except KeyError as exc:
        raise WeightsError(
            f"unknown Gemma variant {exc} in {str(path)!r}; known: {', '.join(GEMMA_VARIANTS)}"
        ) from None
    res = raw.get("image_resolution", [224, 224])
    if len(res) != 2 or res[0] != res[1]:
        raise WeightsError(f"pi05 needs square images; {str(path)!r} asks for {res}")
    return replace(
        cfg,
        vlm=vlm,
        expert=expert,
        vision=replace(cfg.vision, image_size=int(res[0])),
        action_dim=int(raw.get("max_action_dim", cfg.action_dim)),
        max_state_dim=int(raw.get("max_state_dim", cfg.max_state_dim)),
        chunk_size=int(raw.get("chunk_size", cfg.chunk_size)),
        num_steps=int(raw.get("num_inference_steps", cfg.num_steps)),
        min_period=float(raw.get("min_period", cfg.min_period)),
        max_period=float(raw.get("max_period", cfg.max_period)),
        max_text_tokens=int(raw.get("tokenizer_max_length", cfg.max_text_tokens)),
    )
