"""``POST /v1/audio/speech`` (audio bytes or SSE events) and ``GET /v1/audio/voices``."""

from __future__ import annotations

import base64
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import anyio
from litestar import Request, get, post

from mstar.errors import ModelError, RequestTimeoutError
from mstar.server.audio_encode import StreamingEncoder, TimeStretcher, ensure_encodable, mime_type
from mstar.server.context import StreamResponse, prime, read_body, server_state
from mstar.server.errors import sse_error
from mstar.server.openai_schema import SpeechRequest, parse_json_object, parse_speech
from mstar.server.routes.openai_chat import sse
from mstar.server.streaming import AsyncEvents
from mstar.types import AudioChunk, Finished

__all__ = ["ROUTES"]

log = logging.getLogger("mstar.server")


class _Encoder:
    """Time-stretch (when speed != 1) then encode, set up on the first audio chunk."""

    def __init__(self, req: SpeechRequest) -> None:
        self.req = req
        self.encoder: StreamingEncoder | None = None
        self.stretch: TimeStretcher | None = None
        self.sample_rate: int | None = None

    def feed(self, chunk: AudioChunk) -> bytes:
        if self.encoder is None:
            self.sample_rate = chunk.sample_rate
            self.encoder = StreamingEncoder(self.req.response_format, chunk.sample_rate, chunk.num_channels)
            if self.req.speed != 1.0:
                self.stretch = TimeStretcher(self.req.speed, chunk.sample_rate, chunk.num_channels)
        elif chunk.sample_rate != self.sample_rate:
            raise ModelError("the model changed its audio sample rate mid-stream")
        pcm = self.stretch.feed(chunk.pcm) if self.stretch is not None else chunk.pcm
        return self.encoder.feed(pcm)

    def close(self) -> bytes:
        if self.encoder is None:
            raise ModelError("the model produced no audio")
        tail = self.stretch.close() if self.stretch is not None else b""
        return self.encoder.feed(tail) + self.encoder.close()


@post("/v1/audio/speech", status_code=200)
async def speech(request: Request[Any, Any, Any]) -> Any:
    state = server_state(request)
    state.adapter(surface="speech")  # 404 before reading the body
    req = parse_speech(parse_json_object(await read_body(request)))
    adapter = state.adapter(req.model, "speech")
    ensure_encodable(req.response_format)  # a format this FFmpeg cannot encode fails now, as a 400
    with state.uploads() as media:
        args = await anyio.to_thread.run_sync(adapter.speech_to_request, req, media)
        events = await state.start(args, receive=request.receive)
    headers = {"X-Request-Id": events.request_id, "Cache-Control": "no-cache"}
    if req.stream_format == "sse":
        return StreamResponse(await prime(_sse(req, events)), media_type="text/event-stream", headers=headers)
    # Raw bytes: hold the status line until the first audio, so early failures are real HTTP errors.
    return StreamResponse(await prime(_bytes(req, events)), media_type=mime_type(req.response_format), headers=headers)


async def _audio_bytes(req: SpeechRequest, events: AsyncEvents) -> AsyncIterator[tuple[bytes, Finished | None]]:
    enc = _Encoder(req)
    async for ev in events:
        if isinstance(ev, AudioChunk) and ev.pcm:
            # Compressing and time-stretching cost CPU: keep them off the event loop.
            heavy = req.response_format not in ("wav", "pcm") or req.speed != 1.0
            data = await anyio.to_thread.run_sync(enc.feed, ev) if heavy else enc.feed(ev)
            if data:
                yield data, None
        elif isinstance(ev, Finished):
            if ev.finish_reason == "timeout":
                raise RequestTimeoutError("speech generation ran past its deadline")
            yield await anyio.to_thread.run_sync(enc.close), ev


async def _bytes(req: SpeechRequest, events: AsyncEvents) -> AsyncGenerator[bytes, None]:
    try:
        async for data, _ in _audio_bytes(req, events):
            if data:
                yield data
    except Exception as exc:
        # Raw audio has no way to carry an error once bytes went out: cut the response short.
        log.warning("speech request %s failed mid-stream: %s", events.request_id, exc)
        raise
    finally:
        events.close()


async def _sse(req: SpeechRequest, events: AsyncEvents) -> AsyncGenerator[bytes, None]:
    try:
        async for data, fin in _audio_bytes(req, events):
            if data:
                yield sse({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode("ascii")})
            if fin is not None:
                usage = {"input_tokens": fin.usage.input_tokens, "output_tokens": fin.usage.output_tokens,
                         "total_tokens": fin.usage.input_tokens + fin.usage.output_tokens}
                yield sse({"type": "speech.audio.done", "usage": usage})
    except Exception as exc:
        log.warning("speech request %s failed mid-stream: %s", events.request_id, exc)
        yield sse_error(exc)
    finally:
        events.close()


@get("/v1/audio/voices")
async def voices(request: Request[Any, Any, Any]) -> dict[str, Any]:
    """The voices of the served model (404 when it does not speak)."""
    state = server_state(request)
    adapter = state.adapter()
    names = adapter.voice_list()
    if not names:
        raise adapter.no_surface("voices")
    return {
        "object": "list",
        "model": state.model,
        "default": adapter.default_voice_name(),
        "voices": names,
        "data": [{"id": v, "object": "voice", "name": v} for v in names],
    }


ROUTES = [speech, voices]
