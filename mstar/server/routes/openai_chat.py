"""``POST /v1/chat/completions``: text chat, streamed (SSE) or not, with optional audio output."""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncGenerator
from typing import Any

from litestar import Request, post

from mstar.errors import RequestTimeoutError
from mstar.server.audio_encode import encode_pcm16
from mstar.server.call import open_call
from mstar.server.openai_schema import ChatRequest, parse_chat
from mstar.server.sse import SSE_DONE, sse, sse_error
from mstar.server.streaming import AsyncEvents, stream_response
from mstar.types import AudioChunk, Finished, TextChunk

__all__ = ["ROUTES"]

_AUDIO_TTL_S = 3600
_FORMAT = {"pcm16": "pcm"}


def openai_finish_reason(reason: str) -> str:
    # OpenAI knows stop and length; a cancelled request stopped on purpose.
    return "length" if reason == "length" else "stop"


def _check_finish(reason: str) -> None:
    if reason == "timeout":
        raise RequestTimeoutError("the request ran past its deadline")


@post("/v1/chat/completions", status_code=200)
async def chat_completions(request: Request[Any, Any, Any]) -> Any:
    async with open_call(request, "chat") as call:
        req = parse_chat(await call.json())
        events = await call.start(await call.translate(call.adapter(req.model).chat_to_request, req))
    meta = {"id": f"chatcmpl-{events.request_id}", "created": int(time.time()), "model": call.state.model}
    if req.stream:
        return await stream_response(
            events, _stream(req, events, meta), media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
            what="chat", on_error=sse_error,
        )
    result = await call.result(events)
    _check_finish(result.finish_reason)
    message: dict[str, Any] = {"role": "assistant", "content": result.text}
    if "audio" in req.modalities:
        audio = result.audio
        fmt = _FORMAT.get(req.audio_format, req.audio_format)
        data = encode_pcm16(audio.pcm, audio.sample_rate, fmt, audio.num_channels) if audio is not None else b""
        # As OpenAI does: with audio output the text is the audio's transcript.
        message["content"] = None
        message["audio"] = {
            "id": f"audio_{events.request_id}",
            "data": base64.b64encode(data).decode("ascii"),
            "expires_at": int(time.time()) + _AUDIO_TTL_S,
            "transcript": result.text,
        }
    return {
        **meta,
        "object": "chat.completion",
        "choices": [{"index": 0, "message": message, "finish_reason": openai_finish_reason(result.finish_reason), "logprobs": None}],
        "usage": result.usage.to_openai(),
        "seed": result.seed,
        "system_fingerprint": None,
    }


async def _stream(req: ChatRequest, events: AsyncEvents, meta: dict[str, Any]) -> AsyncGenerator[bytes, None]:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        return sse({**meta, "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]})

    audio_id = f"audio_{events.request_id}"
    with_audio = "audio" in req.modalities
    yield chunk({"role": "assistant", "content": ""})
    async for ev in events:
        if isinstance(ev, TextChunk) and ev.text:
            if with_audio:
                yield chunk({"audio": {"id": audio_id, "transcript": ev.text}})
            else:
                yield chunk({"content": ev.text})
        elif isinstance(ev, AudioChunk) and with_audio and ev.pcm:
            data = base64.b64encode(ev.pcm).decode("ascii")
            yield chunk({"audio": {"id": audio_id, "data": data, "expires_at": int(time.time()) + _AUDIO_TTL_S}})
        elif isinstance(ev, Finished):
            _check_finish(ev.finish_reason)
            yield chunk({}, openai_finish_reason(ev.finish_reason))
            if req.include_usage:
                yield sse({**meta, "object": "chat.completion.chunk", "choices": [], "usage": ev.usage.to_openai(), "seed": ev.seed})
    yield SSE_DONE


ROUTES = [chat_completions]
