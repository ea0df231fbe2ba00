"""Bridging the Engine's blocking event streams into the event loop.

Engine calls block (media decoding in ``validate``, waiting for events), so
they run on threads: :func:`submit` builds and queues the request on a worker
thread, and :class:`AsyncEvents` pumps one request's events from a thread
into an ``asyncio.Queue``. Closing it cancels the request in the engine, which
ends it within one model step. :func:`collect_or_cancel` gathers a
non-streaming request while watching for the client going away.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio

from mstar.types import Event, Finished

if TYPE_CHECKING:
    from mstar.engine import Engine, EventStream

__all__ = ["AsyncEvents", "ClientDisconnected", "collect_or_cancel", "submit"]

_END = object()
# How often the pump thread looks up from the engine's queue to see whether it was closed.
_POLL_S = 0.1


class ClientDisconnected(Exception):
    """The client went away before the response was ready."""


async def submit(engine: Engine, **kwargs: Any) -> EventStream:
    """Validate and queue a request off the event loop; raises typed errors (4xx) before anything runs."""
    kwargs["stream"] = True

    def run() -> EventStream:
        out = engine.generate(**kwargs)
        assert not isinstance(out, list)
        return out  # type: ignore[return-value]

    return await anyio.to_thread.run_sync(run)


class AsyncEvents:
    """Async iterator over an :class:`EventStream`; :meth:`close` cancels the request."""

    def __init__(self, stream: EventStream, on_close: Callable[[], None] | None = None) -> None:
        self.stream = stream
        self._on_close = on_close
        self.request_id = stream.request_id
        self.finished: Finished | None = None
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, name=f"mstar-pump-{self.request_id[:8]}", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop is gone (server shutting down)
            self._stop.set()

    def _pump(self) -> None:
        while not self._stop.is_set():
            try:
                ev = self.stream.next_event(_POLL_S)
            except StopIteration:
                break
            except BaseException as exc:  # the request failed: hand the typed error to the consumer
                self._put(exc)
                return
            if ev is None:
                continue
            self._put(ev)
            if isinstance(ev, Finished):
                break
        self._put(_END)

    def __aiter__(self) -> AsyncEvents:
        return self

    async def __anext__(self) -> Event:
        item = await self._queue.get()
        if item is _END:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        if isinstance(item, Finished):
            self.finished = item
        return item  # type: ignore[no-any-return]

    def close(self) -> None:
        """Stop pumping, cancel the request if it still runs, run ``on_close`` once (synchronous)."""
        self._stop.set()
        self.stream.close()
        callback, self._on_close = self._on_close, None
        if callback is not None:
            callback()


async def collect_or_cancel(
    events: AsyncEvents, receive: Callable[[], Awaitable[Any]]
) -> list[Event]:
    """Gather every event, then close ``events``; if the client disconnects first,
    cancel the request and raise :class:`ClientDisconnected` (answered 499).

    ``receive`` is the ASGI receive of a request whose body was already read,
    so its next message is ``http.disconnect`` when the client goes away.
    """

    async def gather() -> list[Event]:
        return [ev async for ev in events]

    async def watch() -> None:
        while True:
            message = await receive()
            if message.get("type") == "http.disconnect":
                return

    gather_task = asyncio.ensure_future(gather())
    watch_task = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({gather_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch_task.cancel()
        if not gather_task.done():
            gather_task.cancel()
        events.close()  # cancels the request if it still runs; frees its admission slot
    if gather_task.done() and not gather_task.cancelled():
        return gather_task.result()
    raise ClientDisconnected()
