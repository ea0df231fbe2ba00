"""Building BAGEL and its VAE, and filling them with tiny random or published weights."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mstar.codecs.flux_vae import AutoEncoder
from mstar.errors import WeightsError
from mstar.models.bagel.config import BagelConfig
from mstar.models.bagel.model import Bagel
from mstar.parallel.rank0 import NOTHING, Deferred
from mstar.parallel.shard import params_on_meta
from mstar.parallel.spec import BackboneSpec
from mstar.progress import progress
from mstar.weights import tiny_checkpoint_path, tiny_state_dict

__all__ = ["CHECKPOINT_FILES", "backbone_spec", "build_models", "load_checkpoint", "load_tiny"]

CHECKPOINT_FILES = [
    "ema.safetensors",
    "ae.safetensors",
    "llm_config.json",
    "vit_config.json",
    "tokenizer.json",
    "*.txt",
    "*.json",
]


def build_models(
    cfg: BagelConfig, device: torch.device | str = "cpu", *, defer: Deferred = NOTHING
) -> tuple[Bagel, AutoEncoder]:
    """BAGEL and its VAE on ``device``; with names to ``defer`` (tensor parallelism), BAGEL's
    parameters are built on the meta device, to be assigned by :func:`load_tiny` or
    :func:`load_checkpoint` and, for the deferred ones, by rank 0's slices."""
    with torch.device(device):
        if defer:
            with params_on_meta():
                model = Bagel(cfg)
        else:
            model = Bagel(cfg)
        return model, AutoEncoder(cfg.vae)


def _tiny_build(cfg: BagelConfig, which: str) -> dict[str, torch.Tensor]:
    # torch's default initialisation; norms start at 1 and the position tables are the fixed sin-cos ones.
    model, vae = build_models(cfg)
    return (model if which == "ema" else vae).state_dict()


def load_tiny(cfg: BagelConfig, model: Bagel, vae: AutoEncoder, defer: Deferred = NOTHING) -> None:
    """Deterministic random weights, cached on disk (the same tensors on every machine); the names
    in ``defer`` are not read (``model`` was built with ``build_models(defer=defer)``)."""
    digest = cfg.to_dict()
    ema = tiny_state_dict("bagel-ema", digest, lambda: _tiny_build(cfg, "ema"), seed=0, exclude=defer)
    if defer:
        defer.assign(model, ema, what="the tiny BAGEL checkpoint")
    else:
        model.load_state_dict(ema)
    vae.load_state_dict(tiny_state_dict("bagel-ae", digest, lambda: _tiny_build(cfg, "ae"), seed=1))


def backbone_spec(cfg: BagelConfig, root: Path | None) -> BackboneSpec:
    """The tensor-parallel backbone: the Qwen2 MoT decoder (``language_model.*`` of ``ema.safetensors``,
    or of the tiny cache file when ``root`` is None). Its token embedding and LM head, the ViT, the
    VAE and the latent connectors stay on rank 0."""
    path = tiny_checkpoint_path("bagel-ema", cfg.to_dict()) if root is None else root / "ema.safetensors"
    return BackboneSpec(
        "mstar.models.bagel.language_model:Qwen2MoTForCausalLM", cfg.llm, "forward", (str(path),),
        prefix="language_model.", skip=("model.embed_tokens", "lm_head"),
    )


def _load_file(
    module: nn.Module, path: Path, device: torch.device, dtype: torch.dtype, defer: Deferred = NOTHING
) -> None:
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
            shape = list(f.get_slice(name).get_shape())
            if shape != list(expected[name].shape):
                raise WeightsError(
                    f"{path.name}: {name} has shape {shape}, the model expects {list(expected[name].shape)}"
                )
            if name in defer:  # tensor parallelism: rank 0 reads its slices later
                continue
            t = f.get_tensor(name)
            state[name] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
    module.load_state_dict(state, assign=True, strict=not defer)


def load_checkpoint(
    root: Path, model: Bagel, vae: AutoEncoder, device: torch.device, dtype: torch.dtype, defer: Deferred = NOTHING
) -> None:
    """Load ``ema.safetensors`` into ``model`` and ``ae.safetensors`` into ``vae`` (strict names and
    shapes; the names in ``defer`` are checked but not read)."""
    _load_file(model, root / "ema.safetensors", device, dtype, defer)
    _load_file(vae, root / "ae.safetensors", device, torch.float32)
