"""One request's life inside the Engine: inputs, settings, generator and output queue."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from mstar.errors import ModelError, MStarError
from mstar.media import MediaItem
from mstar.types import Event, Finished, FinishReason, Usage

__all__ = ["EventQueue", "Request", "RequestInputs"]


@dataclass(slots=True)
class RequestInputs:
    """What the caller sent, normalised.

    ``messages`` (optional) are chat messages ``{"role", "content"}`` where
    content is a string or a list of parts ``{"type": "text", "text"}`` /
    ``{"type": "image" | "audio" | "video"}``; media parts refer, in order, to
    the items of ``images`` / ``audio`` / ``video``.
    """

    text: str | None = None
    messages: list[dict[str, Any]] | None = None
    images: list[MediaItem] = field(default_factory=list)
    audio: list[MediaItem] = field(default_factory=list)
    video: list[MediaItem] = field(default_factory=list)

    def modalities(self) -> tuple[str, ...]:
        found = []
        if self.text or self.messages:
            found.append("text")
        for name, items in (("image", self.images), ("audio", self.audio), ("video", self.video)):
            if items:
                found.append(name)
        return tuple(found)


class EventQueue(queue.Queue[Event | BaseException]):
    """A request's output queue, with an optional wake-up hook for event-loop consumers.

    :meth:`listen` registers ``callback()``, called on the emitting thread after
    every put (outside the queue's lock) and once at registration if an item is
    already waiting, so a consumer can drain with ``get_nowait`` instead of
    blocking a thread per request. The callback must be quick and not block
    (e.g. ``loop.call_soon_threadsafe``); an exception it raises is ignored,
    since the item is queued regardless.
    """

    def __init__(self) -> None:
        super().__init__()
        self._listener: Callable[[], None] | None = None

    def listen(self, callback: Callable[[], None] | None) -> None:
        """Set (or with None, remove) the wake-up callback."""
        with self.mutex:
            self._listener = callback
            pending = bool(self.queue)
        if callback is not None and pending:
            callback()

    def put(self, item: Event | BaseException, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        listener = self._listener
        if listener is not None:
            try:
                listener()
            except Exception:
                pass


class Request:
    """A request as the scheduler and the model runner see it.

    ``params`` holds the user's validated model kwargs only; the runner's own
    data lives apart from them, in ``prepared`` (made by ``runner.prepare`` in
    the caller's thread) and ``state`` (set by ``runner.admit``), each typed by
    the runner (see :class:`mstar.models.base.ModelRunner`). The runner reports
    output through :meth:`emit`, :meth:`finish` and :meth:`fail`. The consumer
    reads ``events``: typed events, then exactly one ``Finished`` or one exception.
    """

    __slots__ = (
        "request_id",
        "inputs",
        "input_modalities",
        "output_modalities",
        "params",
        "prepared",
        "seed",
        "generator",
        "events",
        "state",
        "steps",
        "input_tokens",
        "output_tokens",
        "created_at",
        "deadline",
        "finish_reason",
        "cancel_requested_at",
        "cancel_requested_step",
        "stopped_at",
        "_cancel",
        "_done",
    )

    def __init__(
        self,
        request_id: str,
        inputs: RequestInputs,
        *,
        input_modalities: tuple[str, ...],
        output_modalities: tuple[str, ...],
        params: dict[str, Any],
        seed: int,
        prepared: object = None,
        timeout: float | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.request_id = request_id
        self.inputs = inputs
        self.input_modalities = input_modalities
        self.output_modalities = output_modalities
        self.params = params
        self.prepared = prepared
        self.seed = seed
        gen_device = torch.device(device)
        self.generator = torch.Generator(device=gen_device if gen_device.type == "cuda" else "cpu")
        self.generator.manual_seed(seed)
        self.events = EventQueue()
        self.state: object = None
        self.steps = 0
        self.input_tokens = 0
        self.output_tokens = 0
        self.created_at = time.monotonic()
        self.deadline = self.created_at + timeout if timeout else None
        self.finish_reason: FinishReason | None = None
        self.cancel_requested_at: float | None = None
        self.cancel_requested_step: int | None = None
        self.stopped_at: float | None = None
        self._cancel = threading.Event()
        self._done = False

    # ---- state
    @property
    def done(self) -> bool:
        return self._done

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def request_cancel(self) -> None:
        if not self._cancel.is_set():
            self.cancel_requested_at = time.monotonic()
            self.cancel_requested_step = self.steps
            self._cancel.set()

    def wants(self, modality: str) -> bool:
        return modality in self.output_modalities

    # ---- output (called by the runner, on the scheduler thread)
    def emit(self, event: Event) -> None:
        if not self._done:
            self.events.put(event)

    def finish(self, reason: FinishReason) -> None:
        """End the request normally (stop, length) or by cancel/timeout."""
        if self._done:
            return
        self._done = True
        self.finish_reason = reason
        self.stopped_at = time.monotonic()
        usage = Usage(self.input_tokens, self.output_tokens, self.steps)
        self.events.put(Finished(reason, usage, self.seed, self.request_id))

    def fail(self, exc: BaseException) -> None:
        """End the request with an error; the consumer sees it raised."""
        if self._done:
            return
        self._done = True
        self.finish_reason = "error"
        self.stopped_at = time.monotonic()
        if not isinstance(exc, MStarError):
            wrapped = ModelError(f"model failed while running request {self.request_id}: {type(exc).__name__}: {exc}")
            wrapped.__cause__ = exc
            exc = wrapped
        self.events.put(exc)
