"""mstar: serve composite multimodal models in a notebook and behind an HTTP API.

``import mstar`` stays light (no torch): :class:`Engine` is imported on first
use, and :class:`MStarClient` needs only requests and numpy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mstar import errors
from mstar.describe import ModelDescription, ParamSpec, describe_model
from mstar.registry import ModelInfo, list_models
from mstar.types import (
    AudioBuffer,
    AudioChunk,
    ErrorChunk,
    Event,
    Finished,
    GenerateResult,
    ImageChunk,
    Progress,
    TensorChunk,
    TextChunk,
    Usage,
)

if TYPE_CHECKING:
    from mstar.client import MStarClient
    from mstar.engine import Engine

__version__ = "0.1.0"

__all__ = [
    "AudioBuffer",
    "AudioChunk",
    "Engine",
    "ErrorChunk",
    "Event",
    "Finished",
    "GenerateResult",
    "ImageChunk",
    "MStarClient",
    "ModelDescription",
    "ModelInfo",
    "ParamSpec",
    "Progress",
    "TensorChunk",
    "TextChunk",
    "Usage",
    "describe_model",
    "errors",
    "list_models",
]


def __getattr__(name: str) -> Any:
    # Lazy: importing torch costs seconds, and the client must never need it.
    if name == "Engine":
        from mstar.engine import Engine

        return Engine
    if name == "MStarClient":
        from mstar.client import MStarClient

        return MStarClient
    raise AttributeError(f"module 'mstar' has no attribute {name!r}")
