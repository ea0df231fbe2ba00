"""Server-sent events framing for the OpenAI routes: one ``data: <json>`` event per chunk."""

from __future__ import annotations

import json
from typing import Any

from mstar.server.errors import error_body

__all__ = ["SSE_DONE", "sse", "sse_error"]

#: The last event of a chat completion stream.
SSE_DONE = b"data: [DONE]\n\n"


def sse(doc: dict[str, Any]) -> bytes:
    """One event carrying ``doc`` as compact JSON."""
    return f"data: {json.dumps(doc, separators=(',', ':'))}\n\n".encode()


def sse_error(exc: BaseException) -> bytes:
    """A mid-stream error event, in the same shape as every other error."""
    return sse(error_body(exc))
