"""``POST /v1/chat/completions``: text chat, streamed (SSE) or not, with optional audio output."""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import AsyncGenerator
from typing import Any

import anyio
from litestar import Request, post

from mstar.errors import RequestTimeoutError
from mstar.server.audio_encode import encode_pcm16
from mstar.server.context import StreamResponse, prime, read_body, server_state
from mstar.server.errors import sse_error
from mstar.server.openai_schema import ChatRequest, parse_chat, parse_json_object
from mstar.server.streaming import AsyncEvents, collect_or_cancel
from mstar.types import AudioChunk, Finished, GenerateResult, TextChunk, Usage

__all__ = ["ROUTES", "openai_finish_reason", "openai_usage", "sse"]

log = logging.getLogger("mstar.server")

_AUDIO_TTL_S = 3600
_FORMAT = {"pcm16": "pcm"}


def openai_finish_reason(reason: str) -> str:
    # OpenAI knows stop and length; a cancelled request stopped on purpose.
    return "length" if reason == "length" else "stop"


def openai_usage(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.input_tokens + usage.output_tokens,
    }


def sse(doc: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(doc, separators=(',', ':'))}\n\n".encode()


def _check_finish(fin: Finished | None) -> None:
    if fin is not None and fin.finish_reason == "timeout":
        raise RequestTimeoutError("the request ran past its deadline")


@post("/v1/chat/completions", status_code=200)
async def chat_completions(request: Request[Any, Any, Any]) -> Any:
    state = server_state(request)
    state.adapter(surface="chat")  # 404 for models without this surface, before anything else
    req = parse_chat(parse_json_object(await read_body(request)))
    adapter = state.adapter(req.model, "chat")
    with state.uploads() as media:
        args = await anyio.to_thread.run_sync(adapter.chat_to_request, req, media)
        events = await state.start(args, receive=request.receive)
    meta = {"id": f"chatcmpl-{events.request_id}", "created": int(time.time()), "model": state.model}
    if req.stream:
        return StreamResponse(await prime(_stream(req, events, meta)), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    collected = await collect_or_cancel(events, request.receive)
    _check_finish(events.finished)
    result = GenerateResult.from_events(events.request_id, collected)
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
        "usage": openai_usage(result.usage),
        "seed": result.seed,
        "system_fingerprint": None,
    }


async def _stream(req: ChatRequest, events: AsyncEvents, meta: dict[str, Any]) -> AsyncGenerator[bytes, None]:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        return sse({**meta, "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]})

    audio_id = f"audio_{events.request_id}"
    with_audio = "audio" in req.modalities
    try:
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
                _check_finish(ev)
                yield chunk({}, openai_finish_reason(ev.finish_reason))
                if req.include_usage:
                    yield sse({**meta, "object": "chat.completion.chunk", "choices": [], "usage": openai_usage(ev.usage), "seed": ev.seed})
        yield b"data: [DONE]\n\n"
    except Exception as exc:
        log.warning("chat request %s failed mid-stream: %s", events.request_id, exc)
        yield sse_error(exc)
    finally:
        events.close()


ROUTES = [chat_completions]
