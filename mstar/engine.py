"""The in-process Engine: one model, one scheduler loop, many caller threads."""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import logging
import queue
import threading
import uuid
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from mstar._sugar import ClosingStream, GenerateSugar
from mstar.describe import EngineState, ModelDescription, build_description
from mstar.errors import (
    ConflictError,
    EmptyInputError,
    InvalidParameterError,
    InvalidRequestError,
    UnknownParameterError,
    UnsupportedModalityError,
)
from mstar.media import MediaArg, normalize_media, with_limits
from mstar.media_limits import DEFAULT_LIMITS, MediaLimits
from mstar.messages import inline_media, place_media
from mstar.models.base import ModelRunner
from mstar.models.params import Param
from mstar.protocol import check_request_id, check_seed, check_timeout, parse_modalities
from mstar.registry import ModelInfo, get_model_info, load_runner_class
from mstar.request import Request, RequestInputs
from mstar.scheduler import Scheduler
from mstar.settings import RunnerSettings
from mstar.speech.chunked import ChunkedSpeech, chunk_request_id, chunk_seed
from mstar.speech.chunking import DEFAULT_CHUNK_CHARS, MIN_CHUNK_CHARS, chunk_text
from mstar.types import Event, Finished, GenerateResult

__all__ = ["Engine", "EventStream"]

log = logging.getLogger("mstar.engine")

#: Every Engine not yet closed; :func:`_close_live_engines` closes them at interpreter exit.
_LIVE: weakref.WeakSet[Engine] = weakref.WeakSet()


@atexit.register
def _close_live_engines() -> None:
    """Close engines left open before the interpreter tears down.

    A scheduler thread still inside a torch op while the interpreter finalises makes
    the C++ runtime abort the process (``terminate called without an active
    exception``); closing first lets the loop finish its step and stop.
    """
    for engine in list(_LIVE):
        try:
            engine.close()
        except Exception:  # exiting anyway: one engine's failure must not keep the others open
            log.exception("closing %r at exit failed", engine)


def derive_seed(request_id: str) -> int:
    """The seed of a request that names none: stable for a given request id."""
    return int.from_bytes(hashlib.sha256(request_id.encode()).digest()[:4], "little") & 0x7FFFFFFF


class EventStream(ClosingStream):
    """Iterator over one request's events. Closing it early cancels the request."""

    def __init__(self, engine: Engine, req: Request | ChunkedSpeech) -> None:
        self._engine = engine
        self._req = req
        self._finished = False

    @property
    def request_id(self) -> str:
        """The id of the request these events belong to (for :meth:`Engine.cancel`)."""
        return self._req.request_id

    def __repr__(self) -> str:
        return f"EventStream(request_id={self._req.request_id!r}, {'finished' if self._finished else 'open'})"

    def __iter__(self) -> EventStream:
        return self

    def __next__(self) -> Event:
        if self._finished:
            raise StopIteration
        item = self._req.events.get()
        if isinstance(item, BaseException):
            self._finished = True
            raise item
        if isinstance(item, Finished):
            self._finished = True
        return item

    def next_event(self, timeout: float | None = None) -> Event | None:
        """Like ``next()``, but gives up after ``timeout`` seconds and returns None."""
        if self._finished:
            raise StopIteration
        try:
            item = self._req.events.get(timeout=timeout)
        except queue.Empty:
            return None
        if isinstance(item, BaseException):
            self._finished = True
            raise item
        if isinstance(item, Finished):
            self._finished = True
        return item

    def listen(self, callback: Callable[[], None] | None) -> None:
        """Have ``callback()`` called from the emitting thread whenever an event is queued (and at
        once if one is waiting), so an event loop can read with ``next_event(0)`` without a thread
        per stream; None removes it. See :meth:`mstar.request.EventQueue.listen`."""
        self._req.events.listen(callback)

    def close(self) -> None:
        """Stop reading; cancels the request if it is still running."""
        if not self._finished:
            self._finished = True
            self._engine.cancel(self._req.request_id)



class Engine(GenerateSugar[EventStream]):
    """Runs one model family in this process.

    >>> import mstar
    >>> mstar.Engine("orpheus", weights="tiny").tts("Hello", voice="tara").to_wav("out.wav")

    ``weights`` is a local checkpoint directory, a hub id, or ``"tiny"`` for
    the small random-weight variant (default: the published checkpoint).
    Several threads may call :meth:`generate` at once; requests share one
    scheduler loop that batches them. ``stream``, ``chat``, ``tts``,
    ``generate_image`` and ``edit_image`` are sugar over :meth:`generate`.

    Sizing (see :mod:`mstar.settings`; ``None`` keeps the family's default):
    ``max_batch_size`` requests run at once (for autoregressive families, the
    KV cache slots), ``max_seq_len`` positions each, ``prefill_chunk`` prompt
    tokens are prefilled per step, ``cuda_graphs`` turns on static-shape
    decode, ``kv_cache_tokens`` sizes the paged KV pool all requests share
    (in blocks of ``kv_block_size`` positions), and ``batch_invariant`` (CPU,
    default on) trades batched CPU speed for seeded results that do not depend
    on the batch. ``max_queue`` requests may wait beyond those; ``request_timeout``
    is the default per-request deadline in seconds. ``media_limits``
    (:class:`~mstar.media_limits.MediaLimits`) caps what each media input may
    decode to (pixels, seconds, frames, bytes); over a cap is a 413
    :class:`~mstar.errors.MediaTooLargeError`.

    ``tensor_parallel_size=N`` (default 1) shards the autoregressive backbone over N ranks on
    this machine: this process is rank 0 and N - 1 worker processes are started (gloo on CPU,
    NCCL with one GPU per rank on CUDA; see docs/scaling.md). A worker that dies fails the
    requests of its step with :class:`~mstar.errors.WorkerFailedError` and :meth:`health`
    reports the engine unhealthy. Scripts that build such an Engine at import time need the
    usual ``if __name__ == "__main__":`` guard (workers are spawned, which re-imports the script).

    A text-to-speech model (Orpheus) speaks a text longer than ``speech_chunk_chars``
    as sentence-aligned chunks run side by side and heard in order as one request
    (:mod:`mstar.speech.chunked`); ``None`` or 0 speaks every text as one prompt.
    """

    def __init__(
        self,
        model: str,
        *,
        weights: str | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        max_batch_size: int | None = None,
        max_seq_len: int | None = None,
        prefill_chunk: int | None = None,
        cuda_graphs: bool | None = None,
        kv_cache_tokens: int | None = None,
        kv_block_size: int | None = None,
        batch_invariant: bool | None = None,
        tensor_parallel_size: int = 1,
        max_queue: int = 1024,
        request_timeout: float | None = 600.0,
        speech_chunk_chars: int | None = DEFAULT_CHUNK_CHARS,
        media_limits: MediaLimits | None = None,
    ) -> None:
        self.info: ModelInfo = get_model_info(model)
        self.device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = _parse_dtype(dtype, self.device)
        self.settings = RunnerSettings(
            device=self.device,
            dtype=self.dtype,
            max_batch_size=max_batch_size,
            max_seq_len=max_seq_len,
            prefill_chunk=prefill_chunk,
            cuda_graphs=cuda_graphs,
            kv_cache_tokens=kv_cache_tokens,
            kv_block_size=kv_block_size,
            batch_invariant=batch_invariant,
            tensor_parallel_size=tensor_parallel_size,
        )
        self.request_timeout = request_timeout
        self.media_limits = media_limits or DEFAULT_LIMITS
        self.speech_chunk_chars = _parse_chunk_chars(speech_chunk_chars)
        self._speech: dict[str, ChunkedSpeech] = {}  # long texts in flight, by parent request id
        self._speech_lock = threading.Lock()
        #: Where the weights come from: the ``weights`` argument, else the family's published checkpoint.
        self.weights: str = weights if weights is not None else self.info.hub_id
        runner_cls = load_runner_class(model)
        if tensor_parallel_size > 1 and not getattr(runner_cls, "supports_tensor_parallel", False):
            raise InvalidParameterError(
                f"{self.info.name} does not support tensor parallelism (supported: orpheus, qwen3_omni, bagel)",
                param="tensor_parallel_size",
            )
        self.runner: ModelRunner[Any, Any] = runner_cls(weights=self.weights, settings=self.settings)
        self.scheduler = Scheduler(self.runner, max_active=self.runner.sizing.max_batch_size, max_waiting=max_queue)
        self._closed = False
        _LIVE.add(self)

    # ------------------------------------------------------------------ public API
    @property
    def model(self) -> str:
        """The model family's registry name (``"orpheus"``, ``"pi05"`` ...)."""
        return self.info.name

    @property
    def voices(self) -> tuple[str, ...]:
        """The speaker names ``voice=`` accepts (empty for a model that does not speak)."""
        return self.info.voices

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran (explicitly, by a ``with`` block, or at interpreter exit)."""
        return self._closed

    def health(self) -> str | None:
        """None while the engine can serve; otherwise why it cannot (closed, or a part of it failed,
        such as a tensor-parallel worker). The server's ``/ready`` answers 503 with this reason."""
        if self._closed:
            return "the engine is closed"
        return self.runner.health()

    @property
    def params(self) -> Mapping[str, Param]:
        """The model's declared ``model_kwargs`` rules by name (type, default, range; ``coerce`` checks one)."""
        return self.runner.params

    def accepted_kwargs(self) -> list[str]:
        """The model_kwargs keys this model accepts (names only; :meth:`describe` has types and ranges)."""
        return sorted({*self.runner.params, "seed", "timeout"})

    def describe(self) -> ModelDescription:
        """What this engine takes and gives: modalities, default outputs, voices, and every
        ``model_kwargs`` key with its type, default, range and meaning, plus the engine's own
        state (weights, device, dtype, sizing). ``print()`` it for a table."""
        sizing = dataclasses.asdict(self.runner.sizing)
        state = EngineState(weights=self.weights, device=str(self.device), dtype=_dtype_name(self.dtype), sizing=sizing)
        desc = build_description(self.info, self.runner.params, state)
        # The engine's own deadline is the default of ``timeout``.
        params = tuple(
            dataclasses.replace(p, default=self.request_timeout) if p.name == "timeout" else p for p in desc.params
        )
        return dataclasses.replace(desc, params=params)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "ready"
        return (
            f"Engine({self.info.name!r}, weights={self.weights!r}, device={str(self.device)!r}, "
            f"dtype={_dtype_name(self.dtype)}, {state})"
        )

    def generate(
        self,
        *,
        text: str | None = None,
        images: MediaArg | list[MediaArg] | None = None,
        audio: MediaArg | list[MediaArg] | None = None,
        video: MediaArg | list[MediaArg] | None = None,
        messages: list[dict[str, Any]] | None = None,
        output_modalities: Sequence[str] | str | None = None,
        input_modalities: Sequence[str] | str | None = None,
        stream: bool = False,
        request_id: str | None = None,
        **model_kwargs: Any,
    ) -> GenerateResult | EventStream:
        """Run one request. Returns a :class:`GenerateResult`, or with ``stream=True``
        an :class:`EventStream` of typed events ending with ``Finished``.

        ``output_modalities`` defaults to what the family always produces
        (``ModelInfo.default_outputs``: audio for Orpheus, action for Pi0.5, latent for
        V-JEPA 2, text for the chat models). ``model_kwargs`` are the model's
        parameters (:meth:`describe` lists them with types, defaults and ranges) plus
        ``seed`` and ``timeout``. Bad input raises a subclass of
        :class:`mstar.errors.InvalidRequestError` before anything runs.
        """
        if output_modalities is None:
            output_modalities = self.info.default_outputs
        chunks = self._speech_chunks(text, messages, output_modalities, (images, audio, video))
        if chunks is not None:
            events = self._start_speech(
                chunks, output_modalities=output_modalities, input_modalities=input_modalities,
                request_id=request_id, model_kwargs=model_kwargs,
            )
        else:
            req = self._build_request(
                text=text,
                images=images,
                audio=audio,
                video=video,
                messages=messages,
                output_modalities=output_modalities,
                input_modalities=input_modalities,
                request_id=request_id,
                model_kwargs=model_kwargs,
            )
            if req.request_id in self._speech:
                raise ConflictError(f"request_id {req.request_id!r} is already in flight")
            self.scheduler.submit(req)
            events = EventStream(self, req)
        if stream:
            return events
        collected: list[Event] = []
        try:
            for ev in events:
                collected.append(ev)
        finally:
            events.close()
        return GenerateResult.from_events(events.request_id, collected)

    def cancel(self, request_id: str) -> bool:
        """Cancel an in-flight request. Returns True if it was running or queued.

        An id not (yet) in flight is remembered for a while (``EARLY_CANCEL_TTL_S``, at most
        ``EARLY_CANCEL_MAX`` of them) in case its request races in; an id that breaks the
        request-id rule (:func:`mstar.protocol.check_request_id`) is refused.
        """
        if not request_id:
            raise InvalidRequestError("cancel needs a request_id", param="request_id")
        speech = self._speech.get(request_id)
        if speech is not None:  # a long text: every chunk goes
            return speech.cancel(self.scheduler.cancel)
        return self.scheduler.cancel(check_request_id(request_id))

    def stats(self) -> dict[str, Any]:
        """Scheduler and runner accounting: in-flight counts, cancel latencies, and the runner's
        :class:`~mstar.stats.RunnerStats` (KV slots and bytes, batched calls per component)."""
        return self.scheduler.stats()

    def close(self) -> None:
        """Stop the scheduler (requests still running fail with ServiceError) and free the model.

        Idempotent. An engine left open is closed at interpreter exit, so exiting never aborts.
        """
        if not self._closed:
            self._closed = True
            _LIVE.discard(self)
            self.scheduler.close()
            self.runner.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ internals
    def _speech_chunks(
        self, text: str | None, messages: Any, output_modalities: Sequence[str] | str, media: tuple[Any, ...]
    ) -> list[str] | None:
        """The chunks of a text to speak that is long enough to cut, else None (one request, as ever)."""
        limit = self.speech_chunk_chars
        if not limit or not self.runner.speaks_text or not isinstance(text, str) or len(text) <= limit:
            return None
        if messages is not None or any(m is not None for m in media):
            return None
        if parse_modalities(output_modalities, "output_modalities") != ("audio",):
            return None
        chunks = chunk_text(text, limit)
        return chunks if len(chunks) > 1 else None

    def _start_speech(
        self,
        chunks: list[str],
        *,
        output_modalities: Sequence[str] | str,
        input_modalities: Sequence[str] | str | None,
        request_id: str | None,
        model_kwargs: dict[str, Any],
    ) -> EventStream:
        """Queue one request per chunk, all at once, behind one parent (see :mod:`mstar.speech.chunked`)."""
        rid = check_request_id(request_id or uuid.uuid4().hex)
        seed_arg = model_kwargs.get("seed")
        seed = _parse_seed(seed_arg) if seed_arg is not None else derive_seed(rid)
        # Every chunk is built (and so checked) before any is queued: bad input queues nothing.
        children = [
            self._build_request(
                text=chunk, images=None, audio=None, video=None, messages=None,
                output_modalities=output_modalities, input_modalities=input_modalities,
                request_id=chunk_request_id(rid, i), model_kwargs={**model_kwargs, "seed": chunk_seed(seed, i)},
            )
            for i, chunk in enumerate(chunks)
        ]
        speech = ChunkedSpeech(rid, children, seed=seed, on_done=self._speech_done)
        with self._speech_lock:
            if rid in self._speech or self.scheduler.is_inflight(rid):
                raise ConflictError(f"request_id {rid!r} is already in flight")
            self._speech[rid] = speech
        try:
            speech.start(self.scheduler.submit)
        except BaseException:
            self._speech_done(speech)
            raise
        return EventStream(self, speech)

    def _speech_done(self, speech: ChunkedSpeech) -> None:
        with self._speech_lock:
            if self._speech.get(speech.request_id) is speech:
                del self._speech[speech.request_id]

    def _build_request(
        self,
        *,
        text: str | None,
        images: Any,
        audio: Any,
        video: Any,
        messages: list[dict[str, Any]] | None,
        output_modalities: Sequence[str] | str,
        input_modalities: Sequence[str] | str | None,
        request_id: str | None,
        model_kwargs: dict[str, Any],
    ) -> Request:
        if text is not None and not isinstance(text, str):
            raise InvalidRequestError(f"text must be a string, got {type(text).__name__}", param="text")
        if messages is not None and not isinstance(messages, list):
            raise InvalidRequestError("messages must be a list of {role, content} objects", param="messages")
        _check_utf8(text, messages)
        # OpenAI content parts (image_url, input_audio, ...) become placeholders with their media in order.
        messages, media = place_media(
            messages,
            {m: normalize_media(arg, m) for m, arg in (("image", images), ("audio", audio), ("video", video))},
            inline_media,
        )
        media = {m: with_limits(items, self.media_limits) for m, items in media.items()}
        inputs = RequestInputs(
            text=text, messages=messages, images=media["image"], audio=media["audio"], video=media["video"]
        )
        outs = parse_modalities(output_modalities, "output_modalities") or self.info.default_outputs
        cannot = [m for m in outs if m not in self.info.output_modalities]
        if cannot:
            raise UnsupportedModalityError(
                f"model {self.info.name!r} cannot produce {', '.join(cannot)}; it produces: "
                f"{', '.join(self.info.output_modalities)}",
                param="output_modalities",
            )
        present = inputs.modalities()
        if not present or (present == ("text",) and not (text or "").strip() and not messages):
            raise EmptyInputError("the request has no input: give text, messages or media", param="text")
        declared = parse_modalities(input_modalities, "input_modalities")
        if declared is not None:
            missing = [m for m in declared if m not in present]
            if missing:
                raise InvalidRequestError(
                    f"input_modalities names {', '.join(missing)} but no such input was given", param="input_modalities"
                )
        self.info.check_inputs(present)
        kwargs = {k: v for k, v in model_kwargs.items() if v is not None}
        unknown = set(kwargs) - set(self.accepted_kwargs())
        if unknown:
            raise UnknownParameterError(unknown, self.accepted_kwargs())
        seed_arg = kwargs.pop("seed", None)
        timeout_arg = kwargs.pop("timeout", None)
        rid = check_request_id(request_id or uuid.uuid4().hex)
        seed = _parse_seed(seed_arg) if seed_arg is not None else derive_seed(rid)
        timeout = _parse_timeout(timeout_arg, self.request_timeout)
        params = self.runner.validate(inputs, outs, kwargs)
        prepared = self.runner.prepare(inputs, outs, params)
        return Request(
            rid,
            inputs,
            input_modalities=present,
            output_modalities=outs,
            params=params,
            prepared=prepared,
            seed=seed,
            timeout=timeout,
            device=self.device,
        )


def _check_utf8(text: str | None, messages: list[dict[str, Any]] | None) -> None:
    """Refuse text that cannot be encoded as UTF-8 (lone surrogates), before any tokenizer sees it."""
    pieces: list[Any] = [text]
    for msg in messages or []:
        content = msg.get("content") if isinstance(msg, dict) else None
        pieces.extend(content if isinstance(content, list) else [content])
    for piece in pieces:
        value = piece.get("text") if isinstance(piece, dict) else piece
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise InvalidRequestError(
                    f"text is not valid Unicode (a lone surrogate at position {exc.start})", param="text"
                ) from None


def _parse_chunk_chars(value: int | None) -> int | None:
    if value is None or value == 0:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < MIN_CHUNK_CHARS:
        raise InvalidParameterError(
            f"speech_chunk_chars must be an integer >= {MIN_CHUNK_CHARS}, or 0/None to speak every text whole; got {value!r}",
            param="speech_chunk_chars",
        )
    return value


def _parse_seed(value: Any) -> int:
    return check_seed(value)  # the rule the server and the client share (mstar/protocol.py)


def _parse_timeout(value: Any, default: float | None) -> float | None:
    return default if value is None else check_timeout(value)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _parse_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    try:
        return names[str(dtype).lower()]
    except KeyError:
        raise InvalidParameterError(f"dtype must be one of {', '.join(names)}; got {dtype!r}", param="dtype") from None
