"""Where weights come from: a local directory, a hub id, or the tiny random variant.

Tiny variants are built from a fixed seed on first use and cached as
safetensors under ``$MSTAR_CACHE`` (default ``~/.cache/mstar``), so every
later Engine loads the very same tensors, offline.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Container
from pathlib import Path
from typing import Any

import torch

from mstar.errors import WeightsError
from mstar.progress import hub_tqdm_class

__all__ = [
    "CLI_WEIGHTS_HINT",
    "TINY",
    "WEIGHTS_HINT",
    "cache_root",
    "component_override",
    "hub_offline",
    "resolve_checkpoint_dir",
    "tiny_checkpoint_path",
    "tiny_state_dict",
]

TINY = "tiny"
#: What a weights error suggests, in the Engine's spelling; ``mstar-server`` swaps in :data:`CLI_WEIGHTS_HINT`.
WEIGHTS_HINT = "Pass a local checkpoint directory, a hub id, or weights='tiny' for the small random variant."
CLI_WEIGHTS_HINT = "Pass --weights /path/to/checkpoint, --weights <hub id>, or --weights tiny for the small random variant."


def cache_root() -> Path:
    root = Path(os.environ.get("MSTAR_CACHE") or Path.home() / ".cache" / "mstar")
    root.mkdir(parents=True, exist_ok=True)
    return root


def component_override(component: str) -> str | None:
    """A user-set source for one component's weights: ``$MSTAR_<COMPONENT>_WEIGHTS`` (e.g.
    ``MSTAR_SNAC_WEIGHTS``), a directory or hub id that wins over the checkpoint's own copy."""
    return os.environ.get(f"MSTAR_{component.upper()}_WEIGHTS") or None


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` asks for the local hub cache only (no downloads)."""
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")


def _config_digest(config: Any) -> str:
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def tiny_checkpoint_path(name: str, config: Any) -> Path:
    """Where :func:`tiny_state_dict` caches ``name``/``config`` (tensor-parallel workers read their slices there)."""
    return cache_root() / "tiny" / f"{name}-{_config_digest(config)}.safetensors"


def tiny_state_dict(
    name: str,
    config: Any,
    build: Callable[[], dict[str, torch.Tensor]],
    *,
    seed: int = 0,
    exclude: Container[str] = (),
) -> dict[str, torch.Tensor]:
    """Load the cached tiny checkpoint for ``name``/``config``, building it on first use.

    ``build`` creates the state dict; it runs under ``torch.manual_seed(seed)``
    on the CPU so the tensors are the same on every machine. Names in ``exclude`` are left out
    and never read from the cached file (tensor-parallel rank 0 reads its slices of them later).
    """
    from safetensors.torch import load_file, save_file

    path = tiny_checkpoint_path(name, config)
    if path.exists():
        try:
            return _read_except(path, exclude) if exclude else load_file(str(path))
        except Exception:
            path.unlink(missing_ok=True)  # a torn write from an interrupted run: rebuild
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state = {k: v.detach().to("cpu").contiguous() for k, v in build().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    save_file(state, str(tmp))
    os.replace(tmp, path)
    return {k: v for k, v in state.items() if k not in exclude} if exclude else state


def _read_except(path: Path, exclude: Container[str]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        return {k: f.get_tensor(k) for k in f.keys() if k not in exclude}  # noqa: SIM118 - no iteration


def resolve_checkpoint_dir(weights: str | os.PathLike[str], *, allow_patterns: list[str] | None = None) -> Path:
    """A local directory as is; otherwise a hub id, fetched (or found in the local hub cache)."""
    path = Path(weights).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise WeightsError(f"weights path {str(path)!r} is a file; pass the checkpoint directory")
    if _looks_like_path(str(weights)):
        raise WeightsError(f"weights directory {str(path)!r} does not exist. {WEIGHTS_HINT}")
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                str(weights),
                allow_patterns=allow_patterns,
                local_files_only=hub_offline(),
                tqdm_class=hub_tqdm_class(),
            )
        )
    except Exception as exc:
        raise WeightsError(
            f"could not find weights {str(weights)!r}: not a local directory, and the hub download failed "
            f"({type(exc).__name__}: {exc}). {WEIGHTS_HINT}"
        ) from exc


def _looks_like_path(weights: str) -> bool:
    """A filesystem path rather than a hub id (``org/name``): absolute, or starting with ``.`` or ``~``."""
    return Path(weights).is_absolute() or weights.startswith((".", "~")) or "\\" in weights
