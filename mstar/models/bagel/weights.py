"""Building BAGEL and its VAE, and filling them with tiny random or published weights."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mstar.codecs.flux_vae import AutoEncoder
from mstar.errors import WeightsError
from mstar.models.bagel.config import BagelConfig
from mstar.models.bagel.model import Bagel
from mstar.progress import progress
from mstar.weights import tiny_state_dict

__all__ = ["CHECKPOINT_FILES", "build_models", "load_checkpoint", "load_tiny"]

CHECKPOINT_FILES = [
    "ema.safetensors",
    "ae.safetensors",
    "llm_config.json",
    "vit_config.json",
    "tokenizer.json",
    "*.txt",
    "*.json",
]


def build_models(cfg: BagelConfig, device: torch.device | str = "cpu") -> tuple[Bagel, AutoEncoder]:
    with torch.device(device):
        return Bagel(cfg), AutoEncoder(cfg.vae)


def _tiny_build(cfg: BagelConfig, which: str) -> dict[str, torch.Tensor]:
    # torch's default initialisation; norms start at 1 and the position tables are the fixed sin-cos ones.
    model, vae = build_models(cfg)
    return (model if which == "ema" else vae).state_dict()


def load_tiny(cfg: BagelConfig, model: Bagel, vae: AutoEncoder) -> None:
    """Deterministic random weights, cached on disk (the same tensors on every machine)."""
    digest = cfg.to_dict()
    model.load_state_dict(tiny_state_dict("bagel-ema", digest, lambda: _tiny_build(cfg, "ema"), seed=0))
    vae.load_state_dict(tiny_state_dict("bagel-ae", digest, lambda: _tiny_build(cfg, "ae"), seed=1))


def _load_file(module: nn.Module, path: Path, device: torch.device, dtype: torch.dtype) -> None:
    from safetensors import safe_open

    if not path.is_file():
        raise WeightsError(f"checkpoint file {str(path)!r} is missing")
    expected = module.state_dict()
    state: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        names = set(f.keys())
        missing = sorted(set(expected) - names)
        unexpected = sorted(names - set(expected))
        if missing or unexpected:
            raise WeightsError(
                f"{path.name} does not match the model: {len(missing)} missing (e.g. {missing[:3]}), "
                f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
            )
        for name in progress(sorted(names), desc=f"loading {path.name}", unit="tensor"):
            t = f.get_tensor(name)
            if list(t.shape) != list(expected[name].shape):
                raise WeightsError(
                    f"{path.name}: {name} has shape {list(t.shape)}, the model expects {list(expected[name].shape)}"
                )
            state[name] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
    module.load_state_dict(state, assign=True)


def load_checkpoint(root: Path, model: Bagel, vae: AutoEncoder, device: torch.device, dtype: torch.dtype) -> None:
    """Load ``ema.safetensors`` into ``model`` and ``ae.safetensors`` into ``vae`` (strict names and shapes)."""
    _load_file(model, root / "ema.safetensors", device, dtype)
    _load_file(vae, root / "ae.safetensors", device, torch.float32)
