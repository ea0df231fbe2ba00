"""Loading V-JEPA 2 weights: hub (transformers) checkpoints, the release's .pt files, tiny variants.

- V-JEPA 2: a transformers checkpoint directory (``config.json`` +
  ``*.safetensors``) or hub id; only ``encoder.*`` tensors are read.
- V-JEPA 2-AC: the release file ``vjepa2-ac-vitg.pt`` (a dict with
  ``"encoder"`` and ``"predictor"`` state dicts, keys possibly prefixed
  ``module.`` / ``backbone.``), given as the file itself or a directory that
  holds it. The encoder may instead come from a transformers checkpoint of
  ``facebook/vjepa2-vitg-fpc64-256`` in the same directory.
- ``"tiny"``: deterministic random weights from :func:`mstar.weights.tiny_state_dict`.

Modules are built on the meta device and the tensors assigned, so a full
checkpoint is never materialised twice.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from mstar.errors import WeightsError
from mstar.models.vjepa2.config import AC_CONFIGS, ENCODER_CONFIGS, ACPredictorConfig, EncoderConfig
from mstar.models.vjepa2.encoder import VJEPA2Backbone
from mstar.models.vjepa2.predictor import ACPredictor
from mstar.progress import progress
from mstar.weights import TINY, resolve_checkpoint_dir, tiny_state_dict

__all__ = [
    "AC_RELEASE_FILE",
    "ac_config_from_release",
    "clean_release_keys",
    "encoder_config_from_hf",
    "encoder_config_from_release",
    "load_ac",
    "load_encoder",
    "release_encoder_to_hf",
    "tiny_predictor_state",
]

AC_RELEASE_FILE = "vjepa2-ac-vitg.pt"
AC_RELEASE_URL = "https://dl.fbaipublicfiles.com/vjepa2/vjepa2-ac-vitg.pt"
# Heads are not recoverable from tensor shapes; the release's ViTs by width.
_HEADS_BY_WIDTH = {1024: 16, 1280: 16, 1408: 22}


# ----------------------------------------------------------------------------- key mapping


def clean_release_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the ``module.`` (DDP) and ``backbone.`` (wrapper) prefixes of the release's keys."""
    return {k.replace("module.", "").replace("backbone.", ""): v for k, v in state.items()}


def release_encoder_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a release-format ViT state dict to transformers' names; split fused qkv.

    Tensors the RoPE encoder has no use for (``pos_embed``, mask tokens) are dropped.
    """
    out: dict[str, torch.Tensor] = {}
    for key, val in clean_release_keys(state).items():
        if key.startswith("patch_embed.proj."):
            out["encoder.embeddings.patch_embeddings.proj." + key.rsplit(".", 1)[1]] = val
        elif key.startswith("norm."):
            out["encoder.layernorm." + key.rsplit(".", 1)[1]] = val
        elif m := re.fullmatch(r"blocks\.(\d+)\.(.+)", key):
            layer, rest = f"encoder.layer.{m.group(1)}.", m.group(2)
            if rest.startswith("attn.qkv."):
                kind = rest.rsplit(".", 1)[1]
                for name, part in zip(("query", "key", "value"), val.chunk(3, dim=0), strict=True):
                    out[f"{layer}attention.{name}.{kind}"] = part
            elif rest.startswith("attn.proj."):
                out[layer + "attention." + rest[len("attn.") :]] = val
            else:  # norm1, norm2, mlp.fc1, mlp.fc2 keep their names
                out[layer + rest] = val
    return out


def encoder_config_from_hf(cfg: dict[str, object]) -> EncoderConfig:
    """EncoderConfig from a transformers ``config.json`` (model_type vjepa2)."""
    try:
        hidden = int(cfg["hidden_size"])  # type: ignore[call-overload]
        mlp_ratio = float(cfg.get("mlp_ratio", 4.0))  # type: ignore[arg-type]
        return EncoderConfig(
            hidden_size=hidden,
            num_hidden_layers=int(cfg["num_hidden_layers"]),  # type: ignore[call-overload]
            num_attention_heads=int(cfg["num_attention_heads"]),  # type: ignore[call-overload]
            # transformers truncates hidden * ratio; round here so 48/11 gives ViT-g's 6144, not 6143.
            mlp_hidden_size=int(round(hidden * mlp_ratio)),
            patch_size=int(cfg.get("patch_size", 16)),  # type: ignore[call-overload]
            tubelet_size=int(cfg.get("tubelet_size", 2)),  # type: ignore[call-overload]
            crop_size=int(cfg.get("crop_size", 256)),  # type: ignore[call-overload]
            frames_per_clip=int(cfg.get("frames_per_clip", 64)),  # type: ignore[call-overload]
            in_chans=int(cfg.get("in_chans", 3)),  # type: ignore[call-overload]
            layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-6)),  # type: ignore[arg-type]
            qkv_bias=bool(cfg.get("qkv_bias", True)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise WeightsError(f"config.json is not a V-JEPA 2 config: {exc}") from exc


def encoder_config_from_release(state: dict[str, torch.Tensor]) -> EncoderConfig:
    try:
        proj = state["encoder.embeddings.patch_embeddings.proj.weight"]
        fc1 = state["encoder.layer.0.mlp.fc1.weight"]
    except KeyError as exc:
        raise WeightsError(f"the release checkpoint's encoder lacks {exc}") from None
    width = int(proj.shape[0])
    if width not in _HEADS_BY_WIDTH:
        raise WeightsError(f"unknown encoder width {width}; expected one of {sorted(_HEADS_BY_WIDTH)}")
    depth = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
    return EncoderConfig(
        hidden_size=width,
        num_hidden_layers=depth,
        num_attention_heads=_HEADS_BY_WIDTH[width],
        mlp_hidden_size=int(fc1.shape[0]),
        patch_size=int(proj.shape[-1]),
        tubelet_size=int(proj.shape[2]),
        in_chans=int(proj.shape[1]),
    )


# ----------------------------------------------------------------------------- module building


def _materialise(build: Callable[[], nn.Module], state: dict[str, torch.Tensor], what: str) -> nn.Module:
    """Build on meta, check names and shapes, assign the tensors."""
    with torch.device("meta"):
        module = build()
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    if missing:
        raise WeightsError(f"{what} checkpoint lacks {len(missing)} tensor(s), e.g. {', '.join(missing[:3])}")
    wrong = [f"{k}: {tuple(state[k].shape)} != {expected[k]}" for k in expected if tuple(state[k].shape) != expected[k]]
    if wrong:
        raise WeightsError(f"{what} checkpoint has tensors of the wrong shape: {'; '.join(wrong[:3])}")
    module.load_state_dict({k: state[k] for k in expected}, strict=True, assign=True)
    return module.eval()


def _tiny_init(module: nn.Module) -> dict[str, torch.Tensor]:
    """Random weights with non-trivial norms, so parity tests exercise every parameter."""
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, nn.LayerNorm):
                sub.weight.copy_(1.0 + 0.1 * torch.randn_like(sub.weight))
                sub.bias.copy_(0.1 * torch.randn_like(sub.bias))
            elif isinstance(sub, nn.Linear) and sub.bias is not None:
                sub.bias.copy_(0.02 * torch.randn_like(sub.bias))
    return module.state_dict()


def _safetensors_state(directory: Path, keep: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"no *.safetensors files in {str(directory)!r}")
    state: dict[str, torch.Tensor] = {}
    for file in progress(files, desc=f"loading {directory.name}", unit="file"):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                name = key[len("vjepa2.") :] if key.startswith("vjepa2.") else key  # classification wrappers
                if keep(name):
                    state[name] = f.get_tensor(key)
    return state


def _cast(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    return module.to(device=device, dtype=dtype)


def load_encoder(weights: str, device: torch.device, dtype: torch.dtype) -> tuple[VJEPA2Backbone, EncoderConfig]:
    """The V-JEPA 2 encoder from ``"tiny"``, a transformers checkpoint directory or a hub id."""
    if weights == TINY:
        cfg = ENCODER_CONFIGS["tiny"]
        state = tiny_state_dict("vjepa2-encoder", cfg.to_dict(), lambda: _tiny_init(VJEPA2Backbone(cfg)))
    else:
        directory = resolve_checkpoint_dir(weights, allow_patterns=["*.json", "*.safetensors"])
        try:
            cfg = encoder_config_from_hf(json.loads((directory / "config.json").read_text()))
        except OSError as exc:
            raise WeightsError(f"no readable config.json in {str(directory)!r}: {exc}") from exc
        state = _safetensors_state(directory, lambda k: k.startswith("encoder."))
    module = _materialise(lambda: VJEPA2Backbone(cfg), state, "V-JEPA 2 encoder")
    return _cast(module, device, dtype), cfg  # type: ignore[return-value]


# ----------------------------------------------------------------------------- V-JEPA 2-AC


def tiny_predictor_state(cfg: ACPredictorConfig) -> dict[str, torch.Tensor]:
    """Deterministic random AC predictor weights for ``cfg`` (fixed seed, cached): the tiny variant's."""
    return tiny_state_dict("vjepa2-ac-predictor", cfg.to_dict(), lambda: _tiny_init(ACPredictor(cfg)))


def _find_release_file(path: Path) -> Path | None:
    if path.is_file():
        return path
    named = path / AC_RELEASE_FILE
    if named.is_file():
        return named
    others = sorted(path.glob("*.pt")) + sorted(path.glob("*.pth"))
    return others[0] if others else None


def ac_config_from_release(state: dict[str, torch.Tensor], enc: EncoderConfig) -> ACPredictorConfig:
    base = AC_CONFIGS["release"]
    try:
        embed = state["predictor_embed.weight"]
        fc1 = state["predictor_blocks.0.mlp.fc1.weight"]
        action = state["action_encoder.weight"]
    except KeyError as exc:
        raise WeightsError(f"the release checkpoint's predictor lacks {exc}") from None
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("predictor_blocks."))
    return ACPredictorConfig(
        embed_dim=int(embed.shape[1]),
        predictor_embed_dim=int(embed.shape[0]),
        depth=depth,
        num_heads=base.num_heads,
        mlp_hidden_size=int(fc1.shape[0]),
        action_dim=int(action.shape[1]),
        use_extrinsics=base.use_extrinsics,
        crop_size=enc.crop_size,
        patch_size=enc.patch_size,
        max_frames=base.max_frames,
    )


def load_ac(
    weights: str,
    device: torch.device,
    dtype: torch.dtype,
    *,
    encoder_config: EncoderConfig | None = None,
    predictor_config: ACPredictorConfig | None = None,
) -> tuple[VJEPA2Backbone, EncoderConfig, ACPredictor, ACPredictorConfig]:
    """The V-JEPA 2-AC encoder and predictor from ``"tiny"``, the release .pt (file or directory) or a hub id.

    Head counts, crop size and ``use_extrinsics`` cannot be read off tensor
    shapes; they default to the release's. ``encoder_config`` /
    ``predictor_config`` override what is inferred (for other trainings).
    """
    if weights == TINY:
        enc_cfg, ac_cfg = ENCODER_CONFIGS["tiny"], AC_CONFIGS["tiny"]
        enc_state = tiny_state_dict("vjepa2-encoder", enc_cfg.to_dict(), lambda: _tiny_init(VJEPA2Backbone(enc_cfg)))
        pred_state = tiny_predictor_state(ac_cfg)
    else:
        path = Path(weights).expanduser()
        directory = (
            path
            if path.exists()
            else resolve_checkpoint_dir(weights, allow_patterns=["*.json", "*.safetensors", "*.pt"])
        )
        release = _find_release_file(directory)
        if release is None:
            raise WeightsError(
                f"no V-JEPA 2-AC predictor in {str(directory)!r}: put the release file {AC_RELEASE_FILE} "
                f"({AC_RELEASE_URL}) there, or pass its path as weights"
            )
        try:
            blob = torch.load(str(release), map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:
            raise WeightsError(f"could not read {str(release)!r}: {type(exc).__name__}: {exc}") from exc
        if not isinstance(blob, dict) or "predictor" not in blob:
            raise WeightsError(f"{str(release)!r} is not a V-JEPA 2-AC release file: it has no 'predictor' state dict")
        pred_state = clean_release_keys(blob["predictor"])
        hf_dir = directory if directory.is_dir() and (directory / "config.json").is_file() else None
        if hf_dir is not None and any(hf_dir.glob("*.safetensors")):
            enc_cfg = encoder_config_from_hf(json.loads((hf_dir / "config.json").read_text()))
            enc_state = _safetensors_state(hf_dir, lambda k: k.startswith("encoder."))
        elif "encoder" in blob:
            enc_state = release_encoder_to_hf(blob["encoder"])
            enc_cfg = encoder_config or encoder_config_from_release(enc_state)
        else:
            raise WeightsError(f"{str(release)!r} has no 'encoder' and no transformers encoder checkpoint is beside it")
        enc_cfg = encoder_config or enc_cfg
        ac_cfg = predictor_config or ac_config_from_release(pred_state, enc_cfg)
    encoder = _materialise(lambda: VJEPA2Backbone(enc_cfg), enc_state, "V-JEPA 2 encoder")
    predictor = _materialise(lambda: ACPredictor(ac_cfg), pred_state, "V-JEPA 2-AC predictor")
    return (
        _cast(encoder, device, dtype),  # type: ignore[return-value]
        enc_cfg,
        _cast(predictor, device, dtype),  # type: ignore[return-value]
        ac_cfg,
    )
