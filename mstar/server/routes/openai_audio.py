"""``POST /v1/audio/speech`` (audio bytes or SSE events) and ``GET /v1/audio/voices``."""

from __future__ import annotations

import base64
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import anyio
from litestar import Request, Response, get, post

from mstar.errors import ModelError, RequestTimeoutError
from mstar.server.audio_encode import StreamingEncoder, TimeStretcher, ensure_encodable, mime_type
from mstar.server.call import RouteCall, open_call
from mstar.server.openai_schema import SpeechRequest, parse_speech
from mstar.server.sse import sse, sse_error
from mstar.server.state import server_state
from mstar.server.streaming import AsyncEvents, stream_response, unless_disconnected
from mstar.types import AudioChunk, Finished

__all__ = ["ROUTES"]


class _Encoder:
    """Time-stretch (when speed != 1) then encode, set up on the first audio chunk."""

    def __init__(self, req: SpeechRequest, *, complete: bool = False) -> None:
        self.req = req
        self.complete = complete  # one whole file: a WAV header with the real sizes
        self.encoder: StreamingEncoder | None = None
        self.stretch: TimeStretcher | None = None
        self.sample_rate: int | None = None

    def feed(self, chunk: AudioChunk) -> bytes:
        if self.encoder is None:
            self.sample_rate = chunk.sample_rate
            self.encoder = StreamingEncoder(self.req.response_format, chunk.sample_rate, chunk.num_channels,
                                            complete=self.complete)
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
    async with open_call(request, "speech") as call:
        req = parse_speech(await call.json())
        adapter = call.adapter(req.model)
        ensure_encodable(req.response_format)  # a format this FFmpeg cannot encode fails now, as a 400
        events = await call.start(await call.translate(adapter.speech_to_request, req))
    headers = {"X-Request-Id": events.request_id, "Cache-Control": "no-cache"}
    if req.stream_format == "sse":
        return await stream_response(events, _sse(req, events), media_type="text/event-stream", headers=headers,
                                     what="speech", on_error=sse_error)
    if req.response_format == "wav":
        # A WAV file's header carries its sizes, known only at the end: the whole file is sent at once
        # (stream with "pcm" or stream_format "sse", whose deltas keep the open-ended header).
        return Response(await _whole(req, call, events), media_type=mime_type("wav"), headers=headers)
    # Raw bytes: the status line waits for the first audio, so early failures are real HTTP errors;
    # raw audio has no way to carry an error once bytes went out, so a later one cuts the response short.
    return await stream_response(events, _bytes(req, events), media_type=mime_type(req.response_format), headers=headers,
                                 what="speech")


async def _whole(req: SpeechRequest, call: RouteCall, events: AsyncEvents) -> bytes:
    """The complete file, sizes in its header; a client that disconnects first cancels the request."""

    async def gather() -> bytes:
        return b"".join([data async for data in _bytes(req, events, complete=True)])

    try:
        return await unless_disconnected(gather(), call.request.receive)
    finally:
        events.close()


async def _audio_bytes(
    req: SpeechRequest, events: AsyncEvents, *, complete: bool = False
) -> AsyncIterator[tuple[bytes, Finished | None]]:
    enc = _Encoder(req, complete=complete)
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


async def _bytes(req: SpeechRequest, events: AsyncEvents, *, complete: bool = False) -> AsyncGenerator[bytes, None]:
    async for data, _ in _audio_bytes(req, events, complete=complete):
        if data:
            yield data


async def _sse(req: SpeechRequest, events: AsyncEvents) -> AsyncGenerator[bytes, None]:
    async for data, fin in _audio_bytes(req, events):
        if data:
            yield sse({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode("ascii")})
        if fin is not None:
            yield sse({"type": "speech.audio.done", "usage": fin.usage.to_openai(chat=False)})


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
