"""Per-model OpenAI adapters: one module per model, one line per model in ``ADAPTER_REGISTRY``.

Models absent from the registry (robot actions, world-model latents, ...) have
no OpenAI surface: every ``/v1`` route but ``/v1/models`` answers 404 for them.
"""

from __future__ import annotations

import importlib

from mstar.server.adapters.base import OpenAIAdapter, SubmitArgs
from mstar.server.openai_schema import ChatRequest, ImageEditRequest, ImageRequest, SpeechRequest

__all__ = [
    "ADAPTER_REGISTRY",
    "ChatRequest",
    "ImageEditRequest",
    "ImageRequest",
    "OpenAIAdapter",
    "SpeechRequest",
    "SubmitArgs",
    "get_adapter_class",
    "register_adapter",
]

#: model family -> "module:Class", imported on first use.
ADAPTER_REGISTRY: dict[str, str | type[OpenAIAdapter]] = {
    "orpheus": "mstar.server.adapters.orpheus:OrpheusAdapter",
    "qwen3_omni": "mstar.server.adapters.qwen3_omni:Qwen3OmniAdapter",
    "bagel": "mstar.server.adapters.bagel:BagelAdapter",
}


def register_adapter(model: str, adapter: str | type[OpenAIAdapter]) -> None:
    """Add (or replace) the adapter of a model family: for plugins and tests."""
    ADAPTER_REGISTRY[model] = adapter


def get_adapter_class(model: str) -> type[OpenAIAdapter] | None:
    """The adapter class of ``model``, or None when the model has no OpenAI surface."""
    entry = ADAPTER_REGISTRY.get(model)
    if entry is None or isinstance(entry, type):
        return entry
    module_name, _, cls_name = entry.partition(":")
    cls: type[OpenAIAdapter] = getattr(importlib.import_module(module_name), cls_name)
    ADAPTER_REGISTRY[model] = cls
    return cls
