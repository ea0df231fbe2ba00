"""What crosses a DeploymentHandle between the ingress and a replica: plain JSON-able values only.

A request goes to a replica as the ``Engine.generate`` keyword arguments, with every media
argument read into ``(filename, bytes)`` pairs on the ingress (its upload directory is not
on the replica's machine). A reply comes back as JSON lines: first :func:`accepted_line` (the
replica took the request) or :func:`error_line` (it refused it), then each event's wire form
(:meth:`mstar.types.Finished.to_wire` and friends, the NDJSON the server writes), ending with
``Finished`` or an error line. Exceptions never cross as Python objects: an error is its
``status``/``code``/``message`` and is rebuilt on the other side by
:func:`mstar.errors.error_for_status`, so the route sees the class the Engine raised.
"""

from __future__ import annotations

import json
from typing import Any

from mstar.errors import MStarError, RateLimitError, error_for_status
from mstar.media import normalize_media
from mstar.types import ErrorChunk, WireEvent, event_from_wire

__all__ = [
    "CANCEL_FIRST",
    "MEDIA_ARGS",
    "accepted_line",
    "error_from_wire",
    "error_line",
    "error_to_wire",
    "event_line",
    "parse_line",
    "request_to_wire",
]

#: Set in a request's wire kwargs when its cancel arrived before it did (the replica applies it first).
CANCEL_FIRST = "_cancel_first"

#: The ``generate`` arguments that carry media.
MEDIA_ARGS = ("images", "audio", "video")


def request_to_wire(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``generate`` kwargs with media read into ``(filename, bytes)`` pairs (blocking: call off the loop).

    Raises the Engine's own :class:`~mstar.errors.MediaError` for a path that is not a file, so a
    bad argument fails here as it would in-process.
    """
    out = dict(kwargs)
    for name in MEDIA_ARGS:
        arg = out.get(name)
        if arg is None:
            continue
        modality = {"images": "image", "audio": "audio", "video": "video"}[name]
        out[name] = [(item.name, item.data) for item in normalize_media(arg, modality)]
    return out


def error_to_wire(exc: BaseException) -> dict[str, Any]:
    """The wire form of an error (an :class:`ErrorChunk`'s), with ``retry_after`` when it has one."""
    from mstar.server.errors import error_chunk

    wire = error_chunk(exc).to_wire()
    retry = getattr(exc, "retry_after", None)
    if retry is not None:
        wire["metadata"]["retry_after"] = float(retry)
    return wire


def error_from_wire(wire: dict[str, Any]) -> MStarError:
    """The typed exception an :func:`error_to_wire` document describes."""
    chunk = event_from_wire(wire)
    if not isinstance(chunk, ErrorChunk):
        raise ValueError(f"not an error line: {wire.get('modality')!r}")
    retry = (wire.get("metadata") or {}).get("retry_after")
    exc = error_for_status(chunk.status, chunk.message, code=chunk.code, param=chunk.param,
                           retry_after=None if retry is None else float(retry))
    if isinstance(exc, RateLimitError) and exc.retry_after is None:
        exc.retry_after = 1.0
    return exc


def accepted_line(request_id: str, replica: str) -> str:
    """The first line of a reply: the replica queued ``request_id`` on its engine."""
    return json.dumps({"accepted": request_id, "replica": replica})


def error_line(exc: BaseException) -> str:
    """An error line: the request was refused (first line) or failed (later)."""
    return json.dumps({"error": error_to_wire(exc)})


def event_line(event: WireEvent) -> str:
    """One event as its wire JSON."""
    return json.dumps(event.to_wire(), separators=(",", ":"))


def parse_line(line: str) -> dict[str, Any]:
    """A reply line as a JSON object (a ``ValueError`` for anything else)."""
    doc = json.loads(line)
    if not isinstance(doc, dict):
        raise ValueError(f"a replica reply line must be a JSON object, got {type(doc).__name__}")
    return doc
