"""Decoding the NDJSON event stream of ``POST /generate`` incrementally.

Each line is ``{"modality", "data" (base64), "metadata"}`` and turns into the
very event type the Engine yields (:mod:`mstar.types`). Anything that is not
the protocol (bad JSON, an unknown modality, a truncated body) raises
:class:`~mstar.errors.ProtocolError` naming the line; an in-band ``"error"``
line raises the typed exception of its ``code`` (or, for a code this side
does not know, of its status). Nothing is ever decoded as
text by default.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import json
from collections.abc import Iterable, Iterator
from typing import Any

import requests

from mstar._sugar import ClosingStream
from mstar.errors import ProtocolError, error_for_status
from mstar.types import ErrorChunk, Event, Finished, TextChunk, event_from_wire

from .transport import transport_error

__all__ = ["ClientEventStream", "WireDecoder", "split_lines"]

# A line longer than this is not an event of ours: stop before eating all memory.
MAX_LINE_BYTES = 256 * 1024 * 1024


def split_lines(chunks: Iterable[bytes], *, max_line: int = MAX_LINE_BYTES) -> Iterator[bytes]:
    """Split a byte stream into lines as the bytes arrive (a final unterminated line counts)."""
    buf = bytearray()  # amortised appends: a multi-megabyte image line arrives in many small reads
    for chunk in chunks:
        if not chunk:
            continue
        search_from = len(buf)
        buf += chunk
        while (nl := buf.find(b"\n", search_from)) >= 0:
            yield bytes(buf[:nl])
            del buf[: nl + 1]
            search_from = 0
        if len(buf) > max_line:
            raise ProtocolError(f"a stream line exceeds {max_line} bytes without a newline")
    if buf:
        yield bytes(buf)


def _snippet(line: bytes) -> str:
    text = line[:120].decode("utf-8", "replace")
    return text + ("…" if len(line) > 120 else "")


class WireDecoder:
    """Turns wire lines into typed events, one line at a time.

    Text lines carry the raw bytes of one token, which may end inside a
    multibyte UTF-8 character; an incremental decoder keeps the incomplete
    bytes until the next text line completes them, so only whole characters
    are ever emitted.
    """

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._line_no = 0
        self.finished: Finished | None = None

    def feed(self, line: bytes) -> list[Event]:
        """Decode one line (without its newline); returns 0, 1 or 2 events."""
        self._line_no += 1
        line = line.strip()
        if not line:  # blank lines (keep-alives) carry nothing
            return []
        if self.finished is not None:
            raise ProtocolError(f"stream line {self._line_no} arrived after the 'done' line: {_snippet(line)!r}")
        try:
            obj: Any = json.loads(line)
        except ValueError as exc:
            raise ProtocolError(f"stream line {self._line_no} is not JSON ({exc}): {_snippet(line)!r}") from exc
        if isinstance(obj, dict) and obj.get("modality") == "text":
            return self._text(obj)
        try:
            event = event_from_wire(obj)
        except ValueError as exc:
            raise ProtocolError(f"stream line {self._line_no}: {exc}") from exc
        if isinstance(event, ErrorChunk):
            raise error_for_status(event.status, event.message, code=event.code, param=event.param)
        out: list[Event] = []
        if isinstance(event, Finished):
            tail = self._utf8.decode(b"", final=True)
            if tail:  # a token cut inside a character: show it as U+FFFD rather than lose it
                out.append(TextChunk(tail))
            self.finished = event
        out.append(event)
        return out

    def _text(self, obj: dict[str, Any]) -> list[Event]:
        data = obj.get("data", "") or ""
        meta = obj.get("metadata") or {}
        if not isinstance(data, str) or not isinstance(meta, dict):
            raise ProtocolError(f"stream line {self._line_no}: 'data' must be a base64 string and 'metadata' an object")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ProtocolError(f"stream line {self._line_no}: text line has invalid base64 data") from exc
        text = self._utf8.decode(raw)
        return [TextChunk(text, metadata=meta)] if text else []


class ClientEventStream(ClosingStream):
    """Iterator over the events of one streamed request, ending with ``Finished``.

    Closing it (``close()``, leaving a ``with`` block, or breaking out of a
    loop and dropping it) closes the HTTP response, so the server sees the
    disconnect and cancels the request.
    """

    def __init__(self, response: requests.Response, request_id: str) -> None:
        self.request_id = request_id
        self.response = response
        self._decoder = WireDecoder()
        self._lines = split_lines(response.iter_content(chunk_size=None))
        self._ready: list[Event] = []
        self._closed = False

    @property
    def closed(self) -> bool:
        """True once the stream was read to its end or closed (its connection is released)."""
        return self._closed

    def __iter__(self) -> ClientEventStream:
        return self

    def __next__(self) -> Event:
        try:
            return self._next()
        except BaseException:
            self.close()
            raise

    def _next(self) -> Event:
        while not self._ready:
            if self._closed or self._decoder.finished is not None:
                self.close()
                raise StopIteration
            try:
                line = next(self._lines)
            except StopIteration:
                raise ProtocolError(
                    f"the stream of request {self.request_id!r} ended without a 'done' line (server closed the connection)"
                ) from None
            except requests.exceptions.RequestException as exc:
                raise transport_error(exc, self.response.url) from exc
            self._ready.extend(self._decoder.feed(line))
        event = self._ready.pop(0)
        if isinstance(event, Finished):
            self.close()  # the body is complete: free the connection now
        return event

    def close(self) -> None:
        """Stop reading and close the connection (the server then cancels the request)."""
        if not self._closed:
            self._closed = True
            self.response.close()

