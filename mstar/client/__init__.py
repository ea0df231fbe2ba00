"""The mstar Python SDK: talk to a running mstar server over HTTP.

Needs only ``requests`` (and ``numpy`` for audio and tensor helpers); it never
imports torch or transformers. Results and events are the very types the
in-process :class:`mstar.Engine` returns, re-exported here for convenience.
"""

from __future__ import annotations

from mstar.types import (
    AudioBuffer,
    AudioChunk,
    Event,
    Finished,
    GenerateResult,
    ImageChunk,
    Progress,
    TensorChunk,
    TextChunk,
    Usage,
)

from .client import DEFAULT_TIMEOUT, MStarClient
from .stream import ClientEventStream

__all__ = [
    "DEFAULT_TIMEOUT",
    "AudioBuffer",
    "AudioChunk",
    "ClientEventStream",
    "Event",
    "Finished",
    "GenerateResult",
    "ImageChunk",
    "MStarClient",
    "Progress",
    "TensorChunk",
    "TextChunk",
    "Usage",
]
