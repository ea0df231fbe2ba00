"""``/v1/audio/speech/stream``: text in as it is written, speech out as each sentence completes.

A WebSocket for voice agents that speak an LLM's reply while it is still being generated. The
message shapes follow vLLM-Omni's streaming speech WebSocket (``session.config``,
``input.text``, ``input.done``, ``session.close``; ``audio.start``, binary audio frames,
``audio.done``, ``session.done``, ``error``), with mstar's additions: ``session.done``
carries the utterance's ``usage``, and ``error`` carries our error ``code``, HTTP-equivalent
``status`` and ``param``.

Client to server (JSON text frames):

* ``{"type": "session.config", ...}`` first: ``voice``, ``response_format`` (``"pcm"``, the
  default, or ``"wav"``: each sentence a WAV stream of its own), ``seed``, ``temperature``,
  ``top_p``, ``max_new_tokens`` (per sentence), ``model`` (checked if given) and the served
  model's own parameters; ``stream_audio`` may be given but must be true. Another
  ``session.config`` between utterances replaces it.
* ``{"type": "input.text", "text": "..."}``: text deltas, any size down to a character. The
  text is cut into sentences as it arrives (:class:`mstar.speech.chunking.SentenceBuffer`,
  the cutter long texts use on ``/v1/audio/speech``) and each sentence is queued the moment
  it is complete, so several sentences run side by side.
* ``{"type": "input.done"}``: the utterance is complete: its unfinished tail is spoken too,
  then ``session.done``. The connection stays open for the next utterance.
* ``{"type": "session.close"}``: cancel whatever still runs and close.

Server to client, per sentence and strictly in order: ``{"type": "audio.start",
"sentence_index", "sentence_text", "format", "sample_rate", "num_channels"}``, binary frames
of audio (int16 little-endian PCM, or WAV), ``{"type": "audio.done", "sentence_index",
"total_bytes"}``; per utterance ``{"type": "session.done", "utterance_index",
"total_sentences", "usage"}``; ``{"type": "error", "message", "code", "status", "param"}``.

Auth, limits and cancellation are the HTTP routes': the bearer token (an error event, then
close 1008), one admission slot per running sentence (a full server: ``queue_full``, then
close 1013), at most ``MAX_MESSAGE_CHARS`` per message and ``MAX_UTTERANCE_CHARS`` per
utterance (``payload_too_large``, then close 1009); a client that disconnects cancels every
sentence it started. A malformed message is answered with an error event and ignored once the
session is configured (before that, the connection closes).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from litestar import WebSocket, websocket
from litestar.exceptions import WebSocketDisconnect

from mstar.errors import (
    InvalidParameterError,
    InvalidRequestError,
    MStarError,
    PayloadTooLargeError,
    RateLimitError,
    RequestTimeoutError,
)
from mstar.server.adapters import SubmitArgs
from mstar.server.audio_encode import StreamingEncoder
from mstar.server.call import check_api_key
from mstar.server.errors import as_mstar_error
from mstar.server.jsonio import loads_strict
from mstar.server.media_io import UploadScope
from mstar.server.openai_schema import parse_speech
from mstar.server.state import ServerState, server_state
from mstar.server.streaming import AsyncEvents, submit
from mstar.speech.chunked import chunk_seed
from mstar.speech.chunking import DEFAULT_CHUNK_CHARS, SentenceBuffer
from mstar.types import AudioChunk, Finished, Usage

__all__ = ["MAX_MESSAGE_CHARS", "MAX_UTTERANCE_CHARS", "ROUTES", "speech_stream"]

log = logging.getLogger("mstar.server")

#: The longest text frame accepted (characters).
MAX_MESSAGE_CHARS = 64 * 1024
#: The most text one utterance (everything between two ``input.done``) may hold.
MAX_UTTERANCE_CHARS = 10_000
#: Seconds to wait for ``session.config``, and for any message once configured.
CONFIG_TIMEOUT_S = 10.0
IDLE_TIMEOUT_S = 120.0
#: Sentences of one session running or waiting at once; beyond it the session stops reading
#: (backpressure) until one is spoken.
MAX_PENDING_SENTENCES = 16
STREAM_FORMATS = ("pcm", "wav")
# vLLM-Omni's session.config names for fields that mstar spells otherwise.
_RENAMED = {"max_new_tokens": "max_output_tokens"}

# WebSocket close codes (RFC 6455): normal, policy (auth), too big, internal, try again later.
_CLOSE_NORMAL, _CLOSE_POLICY, _CLOSE_TOO_BIG, _CLOSE_ERROR, _CLOSE_RETRY = 1000, 1008, 1009, 1011, 1013


class _Closed(Exception):
    """The client went away, or closed the session."""


@dataclass(slots=True)
class _Config:
    """A validated ``session.config``: what every sentence is submitted with."""

    response_format: str
    model_kwargs: dict[str, Any]
    seed: int | None


@dataclass(slots=True)
class _Sentence:
    index: int  # within the utterance
    text: str
    started: asyncio.Task[AsyncEvents]


@dataclass(slots=True)
class _Flush:
    """``input.done``: once every sentence before it is spoken, ``session.done``."""

    utterance: int
    sentences: int


@dataclass
class _Session:
    socket: WebSocket[Any, Any, Any]
    state: ServerState
    config: _Config | None = None
    buffer: SentenceBuffer = field(default_factory=lambda: SentenceBuffer(DEFAULT_CHUNK_CHARS))
    outbox: asyncio.Queue[_Sentence | _Flush] = field(default_factory=asyncio.Queue)
    pending: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(MAX_PENDING_SENTENCES))
    utterance: int = 0
    sentences: int = 0  # sentences queued in this utterance
    session_sentences: int = 0  # over the whole session: the seed of each is derived from it
    utterance_chars: int = 0
    in_flight: int = 0  # sentences queued and not yet spoken: the client may be silent meanwhile
    open_events: set[AsyncEvents] = field(default_factory=set)
    send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    # ------------------------------------------------------------------ receiving
    async def receive_loop(self) -> None:
        while True:
            raw = await self._receive(CONFIG_TIMEOUT_S if self.config is None else IDLE_TIMEOUT_S)
            try:
                msg = _parse_message(raw)
                kind = msg.get("type")
                if kind == "session.config":
                    self._configure(msg)
                elif self.config is None:
                    raise InvalidRequestError(f"the first message must be session.config, got {kind!r}", param="type")
                elif kind == "input.text":
                    await self._text(msg)
                elif kind == "input.done":
                    await self._input_done()
                elif kind == "session.close":
                    return
                else:
                    raise InvalidRequestError(
                        f"unknown message type {kind!r}; send session.config, input.text, input.done or session.close",
                        param="type",
                    )
            except (PayloadTooLargeError, RateLimitError):
                raise
            except MStarError as exc:
                if self.config is None:
                    raise  # a session that never started is closed
                await self.send_error(exc)

    async def _receive(self, timeout: float) -> str:
        while True:
            try:
                event = await asyncio.wait_for(self.socket.receive(), timeout)
                break
            except TimeoutError:
                if self.in_flight or not self.outbox.empty():
                    continue  # the client waits for audio, not the other way round
                what = "session.config" if self.config is None else "a message"
                raise RequestTimeoutError(f"no {what} arrived within {timeout:g} seconds") from None
        if event["type"] == "websocket.disconnect":
            raise _Closed()
        text = event.get("text")
        if not isinstance(text, str):
            raise InvalidRequestError("messages must be JSON text frames, not binary ones")
        if len(text) > MAX_MESSAGE_CHARS:
            raise PayloadTooLargeError(f"a message is {len(text)} characters long; at most {MAX_MESSAGE_CHARS} are accepted")
        return text

    def _configure(self, msg: dict[str, Any]) -> None:
        if self.sentences or self.buffer.pending.strip():
            raise InvalidRequestError("session.config cannot change an utterance in progress; send input.done first")
        self.config = _parse_config(msg, self.state)
        # Sentences are cut as long texts are on /v1/audio/speech: at most the engine's chunk size.
        self.buffer = SentenceBuffer(self.state.holder.engine.speech_chunk_chars or DEFAULT_CHUNK_CHARS)

    async def _text(self, msg: dict[str, Any]) -> None:
        text = msg.get("text")
        if not isinstance(text, str):
            raise InvalidParameterError("input.text needs a 'text' string", param="text")
        self.utterance_chars += len(text)
        if self.utterance_chars > MAX_UTTERANCE_CHARS:
            raise PayloadTooLargeError(
                f"the utterance holds more than {MAX_UTTERANCE_CHARS} characters; send input.done to speak it first"
            )
        for sentence in self.buffer.feed(text):
            await self._queue(sentence)

    async def _input_done(self) -> None:
        tail = self.buffer.flush()
        if tail is not None:
            await self._queue(tail)
        await self.outbox.put(_Flush(self.utterance, self.sentences))
        self.utterance += 1
        self.sentences = 0
        self.utterance_chars = 0

    async def _queue(self, text: str) -> None:
        """Start speaking ``text`` now; its audio is sent once every sentence before it is."""
        await self.pending.acquire()  # backpressure: the client's frames wait in the socket
        assert self.config is not None
        kwargs = dict(self.config.model_kwargs)
        if self.config.seed is not None:
            kwargs["seed"] = chunk_seed(self.config.seed, self.session_sentences)
        args = SubmitArgs(text=text, output_modalities=("audio",), model_kwargs=kwargs)
        started = asyncio.ensure_future(self._start(args))
        self.in_flight += 1
        await self.outbox.put(_Sentence(self.sentences, text, started))
        self.sentences += 1
        self.session_sentences += 1

    async def _start(self, args: SubmitArgs) -> AsyncEvents:
        admission = self.state.admission
        await admission.acquire()  # a full server refuses with RateLimitError (429)
        try:
            stream = await submit(self.state.holder.engine, **args.engine_kwargs())
        except BaseException:
            admission.release()
            raise
        events = AsyncEvents(stream, on_close=admission.release)
        self.open_events.add(events)
        return events

    # ------------------------------------------------------------------ sending
    async def send_loop(self) -> None:
        usage = Usage()
        while True:
            item = await self.outbox.get()
            if isinstance(item, _Flush):
                await self.send_json({
                    "type": "session.done",
                    "utterance_index": item.utterance,
                    "total_sentences": item.sentences,
                    "usage": usage.to_openai(chat=False),
                })
                usage = Usage()
                continue
            try:
                done = await self._speak(item)
            finally:
                self.in_flight -= 1
                self.pending.release()
            usage = Usage(usage.input_tokens + done.input_tokens, usage.output_tokens + done.output_tokens, usage.steps + done.steps)

    async def _speak(self, sentence: _Sentence) -> Usage:
        assert self.config is not None
        events = await sentence.started
        fmt = self.config.response_format
        encoder: StreamingEncoder | None = None
        sent = 0
        try:
            async for ev in events:
                if isinstance(ev, AudioChunk) and ev.pcm:
                    if encoder is None:
                        encoder = StreamingEncoder(fmt, ev.sample_rate, ev.num_channels)
                        await self._audio_start(sentence, ev)
                    data = encoder.feed(ev.pcm)
                    if data:
                        sent += len(data)
                        await self.send_bytes(data)
                elif isinstance(ev, Finished):
                    if ev.finish_reason == "timeout":
                        raise RequestTimeoutError(f"sentence {sentence.index} ran past its deadline")
                    if encoder is None:
                        raise MStarError(f"the model produced no audio for sentence {sentence.index}")
                    tail = encoder.close()
                    if tail:
                        sent += len(tail)
                        await self.send_bytes(tail)
                    await self.send_json({"type": "audio.done", "sentence_index": sentence.index, "total_bytes": sent})
                    return ev.usage
        finally:
            events.close()
            self.open_events.discard(events)
        raise MStarError(f"sentence {sentence.index} ended without finishing")

    async def _audio_start(self, sentence: _Sentence, first: AudioChunk) -> None:
        assert self.config is not None
        await self.send_json({
            "type": "audio.start",
            "sentence_index": sentence.index,
            "sentence_text": sentence.text,
            "format": self.config.response_format,
            "sample_rate": first.sample_rate,
            "num_channels": first.num_channels,
        })

    async def send_json(self, doc: dict[str, Any]) -> None:
        async with self.send_lock:
            try:
                await self.socket.send_text(json.dumps(doc, separators=(",", ":")))
            except (WebSocketDisconnect, OSError, RuntimeError) as exc:  # the client went away
                raise _Closed() from exc

    async def send_bytes(self, data: bytes) -> None:
        async with self.send_lock:
            try:
                await self.socket.send_bytes(data)
            except (WebSocketDisconnect, OSError, RuntimeError) as exc:
                raise _Closed() from exc

    async def send_error(self, exc: BaseException) -> None:
        err = as_mstar_error(exc)
        await self.send_json({
            "type": "error",
            "message": err.message,
            "code": str(err.code),
            "status": err.status_code,
            "param": getattr(err, "param", None),
        })

    # ------------------------------------------------------------------ ending
    async def cancel_all(self) -> None:
        """Cancel every sentence still starting, queued or speaking (the client is gone or closed)."""
        while not self.outbox.empty():
            item = self.outbox.get_nowait()
            if isinstance(item, _Sentence):
                item.started.cancel()
                with contextlib.suppress(BaseException):
                    events = await item.started
                    events.close()
        for events in list(self.open_events):
            events.close()
        self.open_events.clear()


def _parse_message(raw: str) -> dict[str, Any]:
    # The one strict decoder of every JSON body: depth-limited, no NaN/Infinity, no lone surrogates.
    msg = loads_strict(raw, "a message")
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise InvalidRequestError("a message must be a JSON object with a 'type' string", param="type")
    return msg


def _parse_config(msg: dict[str, Any], state: ServerState) -> _Config:
    """Check a ``session.config`` as ``/v1/audio/speech`` checks its body (same fields, same errors)."""
    body = {k: v for k, v in msg.items() if k != "type"}
    stream_audio = body.pop("stream_audio", True)
    if stream_audio is not True:
        raise InvalidParameterError("stream_audio must be true: this stream always sends audio as it is made", param="stream_audio")
    for theirs, ours in _RENAMED.items():
        if theirs in body:
            body.setdefault(ours, body.pop(theirs))
    if "input" in body:
        raise InvalidParameterError("session.config takes no 'input': send the text as input.text messages", param="input")
    body.setdefault("model", state.model)
    body.setdefault("response_format", "pcm")
    req = parse_speech({**body, "input": "-"})
    if req.response_format not in STREAM_FORMATS:
        raise InvalidParameterError(
            f"response_format must be one of {', '.join(STREAM_FORMATS)} on the stream, got {req.response_format!r}",
            param="response_format",
        )
    if req.speed != 1.0:
        raise InvalidParameterError("speed is not supported on the stream; use /v1/audio/speech", param="speed")
    adapter = state.adapter(req.model, "speech")
    with UploadScope(state.config.resolve_upload_dir(), state.media_policy) as uploads:
        args = adapter.speech_to_request(req, uploads)
    kwargs = dict(args.model_kwargs)
    seed = kwargs.pop("seed", None)
    return _Config(response_format=req.response_format, model_kwargs=kwargs, seed=None if seed is None else int(seed))


def _close_code(exc: BaseException) -> int:
    status = as_mstar_error(exc).status_code
    if status in (401, 403):
        return _CLOSE_POLICY
    if status == 413:
        return _CLOSE_TOO_BIG
    if status in (429, 503):
        return _CLOSE_RETRY
    return _CLOSE_ERROR if status >= 500 else _CLOSE_POLICY


@websocket("/v1/audio/speech/stream", opt={"public": True})  # auth is checked inside, to answer with an error event
async def speech_stream(socket: WebSocket[Any, Any, Any]) -> None:
    """Speak text sent in pieces, a sentence at a time, as soon as each sentence is complete."""
    await socket.accept()
    session = _Session(socket, server_state(socket))
    code = _CLOSE_NORMAL
    tasks: list[asyncio.Task[None]] = []
    try:
        check_api_key(socket)
        session.state.adapter(surface="speech")  # 404 for a model that does not speak, 503 while loading
        tasks = [asyncio.ensure_future(session.receive_loop()), asyncio.ensure_future(session.send_loop())]
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()  # re-raise what ended the session
    except _Closed:
        pass
    except Exception as exc:
        code = _close_code(exc)
        if as_mstar_error(exc).status_code >= 500:
            log.warning("speech stream failed: %s", exc)
        with contextlib.suppress(Exception):
            await session.send_error(exc)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        await session.cancel_all()
        with contextlib.suppress(Exception):
            await socket.close(code=code)


ROUTES = [speech_stream]
