"""The model registry: which families mstar serves and what each can do.

Torch-free: ``mstar.list_models()`` and the client may read it without
loading any model code. Each family adds exactly one entry here; the runner
class is imported only when an Engine is built.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mstar.errors import UnknownModelError

if TYPE_CHECKING:
    from mstar.models.base import ModelRunner

__all__ = ["ModelInfo", "get_model_info", "list_models", "load_runner_class", "register_model"]


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What a model family is and what it can do."""

    name: str
    description: str
    hub_id: str
    input_modalities: tuple[str, ...]
    output_modalities: tuple[str, ...]
    runner: str  # "package.module:ClassName", imported lazily

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "description": self.description,
            "hub_id": self.hub_id,
            "input_modalities": list(self.input_modalities),
            "output_modalities": list(self.output_modalities),
        }


_MODELS: dict[str, ModelInfo] = {
    info.name: info
    for info in (
        ModelInfo(
            name="orpheus",
            description="Orpheus 3B text-to-speech: Llama-3.2-3B emitting SNAC 24 kHz codec tokens",
            hub_id="canopylabs/orpheus-3b-0.1-ft",
            input_modalities=("text",),
            output_modalities=("audio",),
            runner="mstar.models.orpheus.runner:OrpheusRunner",
        ),
    )
}


def register_model(info: ModelInfo) -> None:
    """Add (or replace) a model family: for plugins and tests."""
    _MODELS[info.name] = info


def list_models() -> list[ModelInfo]:
    """Every model family this install can serve, with its capabilities."""
    return list(_MODELS.values())


def get_model_info(name: str) -> ModelInfo:
    try:
        return _MODELS[name]
    except KeyError:
        raise UnknownModelError(name, _MODELS) from None


def load_runner_class(name: str) -> type[ModelRunner]:
    module_name, _, cls_name = get_model_info(name).runner.partition(":")
    return getattr(importlib.import_module(module_name), cls_name)  # type: ignore[no-any-return]
