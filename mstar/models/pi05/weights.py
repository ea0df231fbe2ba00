"""Loading Pi0.5 weights: the published ``lerobot/pi05_base`` layout (strict names and shapes) or tiny random ones.

The published ``model.safetensors`` follows lerobot's PI05Policy tree: every
name starts with ``model.``; the VLM's token embedding is stored once, as
``paligemma.lm_head.weight`` (tied to ``embed_tokens``, which
``safetensors.save_model`` drops); the expert keeps an unused
``gemma_expert.lm_head.weight``. Accepted variants: names without the
``model.`` prefix, ``embed_tokens`` stored instead of (or as well as)
``lm_head``, and transformers-5 style SigLIP names without ``vision_model.``.
Anything else missing, extra or of another shape raises
:class:`~mstar.errors.WeightsError`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mstar.errors import WeightsError
from mstar.layers.gemma import GemmaRMSNorm
from mstar.models.pi05.config import Pi05Config
from mstar.models.pi05.model import Pi05Model
from mstar.progress import progress
from mstar.weights import tiny_state_dict

__all__ = ["build_model", "load_checkpoint", "tiny_model"]

_EMBED = "paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight"
_VLM_HEAD = "paligemma_with_expert.paligemma.lm_head.weight"
_EXPERT_HEAD = "paligemma_with_expert.gemma_expert.lm_head.weight"
_TOWER = "paligemma_with_expert.paligemma.model.vision_tower."
# Parameters kept in float32 whatever the serving dtype: the vision path (as the reference does).
_FLOAT32_PREFIXES = (_TOWER, "paligemma_with_expert.paligemma.model.multi_modal_projector.")


def build_model(cfg: Pi05Config, device: torch.device | str = "meta") -> Pi05Model:
    """An uninitialised model; on the meta device it costs no memory (for shape checks and loading)."""
    with torch.device(device):
        return Pi05Model(cfg)


def _own_shapes(cfg: Pi05Config) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in build_model(cfg).state_dict().items()}


def _canonical(name: str) -> str:
    name = name.removeprefix("model.")
    if name.startswith(_TOWER) and not name.startswith(_TOWER + "vision_model."):
        name = _TOWER + "vision_model." + name[len(_TOWER) :]
    return name


def _target_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if name.startswith(_FLOAT32_PREFIXES) else dtype


def _place(model: Pi05Model, state: dict[str, torch.Tensor]) -> Pi05Model:
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def load_checkpoint(path: Path, cfg: Pi05Config, *, device: torch.device, dtype: torch.dtype) -> Pi05Model:
    """Load ``path/model.safetensors`` into a model of ``cfg``, checking every name and shape."""
    from safetensors import safe_open

    file = path / "model.safetensors"
    if not file.is_file():
        raise WeightsError(f"no model.safetensors in {str(path)!r}")
    expected = _own_shapes(cfg)
    try:
        handle = safe_open(str(file), framework="pt", device="cpu")
    except Exception as exc:
        raise WeightsError(f"could not open {str(file)!r}: {exc}") from exc
    with handle as f:
        stored = {_canonical(k): k for k in f.keys()}
        if len(stored) != len(list(f.keys())):
            raise WeightsError(f"{str(file)!r} holds the same tensor under two spellings (with and without 'model.')")
        if _EMBED not in stored and _VLM_HEAD in stored:
            stored[_EMBED] = stored.pop(_VLM_HEAD)  # tied: the embedding was saved as the LM head
        ignorable = {_VLM_HEAD: (cfg.vocab_size, cfg.vlm.width), _EXPERT_HEAD: (cfg.vocab_size, cfg.expert.width)}
        missing = sorted(set(expected) - set(stored))
        unexpected = sorted(set(stored) - set(expected) - set(ignorable))
        if missing or unexpected:
            raise WeightsError(
                f"{str(file)!r} does not match pi05 ({len(expected)} tensors expected): "
                f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''} ({len(missing)}), "
                f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} ({len(unexpected)})"
            )
        wanted = {**expected, **{k: v for k, v in ignorable.items() if k in stored}}
        bad = []
        for name, shape in wanted.items():
            got = tuple(f.get_slice(stored[name]).get_shape())
            if got != shape:
                bad.append(f"{stored[name]}: {list(got)} (expected {list(shape)})")
        if bad:
            raise WeightsError(f"{str(file)!r} has tensors of the wrong shape: {'; '.join(bad[:5])}")
        state = {
            name: f.get_tensor(stored[name]).to(device=device, dtype=_target_dtype(name, dtype))
            for name in progress(expected, desc="loading Pi0.5", unit="tensor")
        }
    return _place(build_model(cfg), state)


def tiny_model(cfg: Pi05Config, *, device: torch.device, dtype: torch.dtype) -> Pi05Model:
    """The tiny variant: deterministic random weights (cached), the same module tree and code path."""

    def build() -> dict[str, torch.Tensor]:
        model = Pi05Model(cfg)
        for module in model.modules():
            if isinstance(module, GemmaRMSNorm):
                torch.nn.init.normal_(module.weight, std=0.1)  # nonzero so the offsets from 1 matter
        return model.state_dict()

    state = tiny_state_dict("pi05", cfg.digest(), build)
    # Built in place on the CPU: small, and it skips the meta device's one-off import cost.
    model = Pi05Model(cfg)
    model.load_state_dict(state, strict=True)
    for name, p in model.named_parameters():
        p.data = p.data.to(device=device, dtype=_target_dtype(name, dtype))
    return model.eval().requires_grad_(False)
