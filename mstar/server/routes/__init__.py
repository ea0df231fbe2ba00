"""Route handlers: thin (parse, call the engine, shape the answer)."""

from __future__ import annotations

from mstar.server.routes import (
    describe,
    metrics,
    native,
    openai_audio,
    openai_chat,
    openai_images,
    openai_models,
    speech_ws,
)

__all__ = ["ALL_ROUTES"]

ALL_ROUTES = [*native.ROUTES, *openai_models.ROUTES, *openai_chat.ROUTES, *openai_audio.ROUTES, *openai_images.ROUTES,
              *speech_ws.ROUTES, *describe.ROUTES, *metrics.ROUTES]
