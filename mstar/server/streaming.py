"""Engine events in the event loop, and streamed responses.

Engine calls block (media decoding in ``validate``), so :func:`submit` builds
and queues a request on a worker thread. Its events then reach the event loop
without a thread of their own: :class:`AsyncEvents` registers a wake-up
callback on the request's queue (:meth:`mstar.engine.EventStream.listen`);
the scheduler thread, after queueing an event, schedules the wake-up with
``loop.call_soon_threadsafe`` (only when the reader waits), and the loop then
drains the queue without blocking. Closing :class:`AsyncEvents` cancels the
request in the engine, which ends it within one model step; :meth:`AsyncEvents.abort`
does the same and makes the reader raise an error (a server shutting down ends its
requests that way). An ``observer`` (the metrics' call record) sees every event read.

:func:`unless_disconnected` awaits something (an admission slot, every event
of a request) while watching for the client going away; :func:`stream_response`
turns a route's byte generator into a streamed response whose errors before
the first chunk are proper HTTP errors, and which always closes its events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import anyio
from litestar.response import Stream

from mstar.types import Event

if TYPE_CHECKING:
    from mstar.engine import Engine, EventStream

__all__ = [
    "AsyncEvents",
    "ClientDisconnected",
    "EventObserver",
    "StreamResponse",
    "collect",
    "stream_response",
    "submit",
    "unless_disconnected",
]

log = logging.getLogger("mstar.server")

T = TypeVar("T")
Receive = Callable[[], Awaitable[Any]]


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


class EventObserver(Protocol):
    """Sees what a route reads from :class:`AsyncEvents` (see :class:`mstar.server.metrics.CallRecord`)."""

    def event(self, ev: Event) -> None: ...

    def failed(self, exc: BaseException) -> None: ...

    def cut_short(self, exc: BaseException) -> None: ...


class AsyncEvents:
    """Async iterator over an :class:`EventStream`; :meth:`close` cancels the request."""

    def __init__(self, stream: EventStream, on_close: Callable[[], None] | None = None,
                 observer: EventObserver | None = None) -> None:
        self._stream = stream
        self._on_close = on_close
        self._observer = observer
        self._aborted: BaseException | None = None
        self.request_id = stream.request_id
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        # Set by the reader before it looks at the queue; the producer wakes the loop only then.
        self._armed = True
        stream.listen(self._notify)

    def _notify(self) -> None:
        """Called on the scheduler thread after each event is queued."""
        if self._armed:
            self._armed = False
            try:
                self._loop.call_soon_threadsafe(self._wakeup.set)
            except RuntimeError:  # the loop is closed (server shutting down)
                pass

    def __aiter__(self) -> AsyncEvents:
        return self

    async def __anext__(self) -> Event:
        while True:
            self._wakeup.clear()
            self._armed = True  # before polling: an event queued after the poll wakes us
            try:
                if self._aborted is not None:
                    raise self._aborted
                ev = self._stream.next_event(0)  # never blocks; a failed request raises its typed error
            except StopIteration:
                raise StopAsyncIteration from None
            except BaseException as exc:
                if self._observer is not None:
                    self._observer.failed(exc)
                raise
            if ev is not None:
                if self._observer is not None:
                    self._observer.event(ev)
                return ev
            await self._wakeup.wait()

    def cut_short(self, exc: BaseException) -> None:
        """The route's response was cut off by ``exc`` after it began (tells the observer)."""
        if self._observer is not None:
            self._observer.cut_short(exc)

    def abort(self, exc: BaseException) -> None:
        """Cancel the request in the engine and make the reader raise ``exc`` instead of reading on
        (call on the event loop). The route's own error handling then answers: an error response, or
        an in-band error event once streaming began."""
        if self._aborted is None:
            self._aborted = exc
            self._stream.close()
            self._wakeup.set()

    def close(self) -> None:
        """Stop listening, cancel the request if it still runs, run ``on_close`` once (synchronous)."""
        self._stream.listen(None)
        self._stream.close()
        callback, self._on_close = self._on_close, None
        if callback is not None:
            callback()


async def unless_disconnected(awaitable: Awaitable[T], receive: Receive) -> T:
    """Await ``awaitable`` unless the client disconnects first: then cancel it and raise
    :class:`ClientDisconnected` (answered 499).

    ``receive`` is the ASGI receive of a request whose body was already read,
    so its next message is ``http.disconnect`` when the client goes away.
    """

    async def watch() -> None:
        while (await receive()).get("type") != "http.disconnect":
            pass

    task = asyncio.ensure_future(awaitable)
    watch_task = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch_task.cancel()
        if not task.done():
            task.cancel()
    if task.done() and not task.cancelled():
        return task.result()  # or re-raise its error
    raise ClientDisconnected()


async def collect(events: AsyncEvents, receive: Receive) -> list[Event]:
    """Gather every event, then close ``events``; a client that disconnects first cancels the request."""

    async def gather() -> list[Event]:
        return [ev async for ev in events]

    try:
        return await unless_disconnected(gather(), receive)
    finally:
        events.close()  # cancels the request if it still runs; frees its admission slot


class StreamResponse(Stream):
    """A streaming response whose own media type wins (Litestar otherwise prefers the handler's JSON default)."""

    def to_asgi_response(self, *args: Any, media_type: Any = None, **kwargs: Any) -> Any:
        return super().to_asgi_response(*args, media_type=None, **kwargs)


async def stream_response(
    events: AsyncEvents,
    body: AsyncGenerator[bytes, None],
    *,
    media_type: str,
    headers: Mapping[str, str] | None = None,
    what: str = "",
    on_error: Callable[[Exception], bytes] | None = None,
) -> StreamResponse:
    """Stream ``body`` (the route's encoding of ``events``), closing ``events`` when it ends.

    ``body`` runs to its first chunk before the status line goes out, so an error
    before it is a proper HTTP error (a body that must answer 200 whatever
    happens yields ``b""`` first). A later error is logged and, with
    ``on_error``, ends the stream with the chunk it makes; without, the
    response is cut short.
    """

    async def guarded() -> AsyncGenerator[bytes, None]:
        begun = False  # a chunk went to the response: its status line is out
        try:
            async for chunk in body:
                yield chunk
                begun = True
        except Exception as exc:
            log.warning("%srequest %s failed mid-stream: %s", f"{what} " if what else "", events.request_id, exc)
            if on_error is None:
                if begun:
                    events.cut_short(exc)
                raise
            yield on_error(exc)
        finally:
            events.close()
            with contextlib.suppress(Exception):
                await body.aclose()

    return StreamResponse(await _prime(guarded()), media_type=media_type, headers=dict(headers or {}))


async def _prime(agen: AsyncGenerator[bytes, None]) -> AsyncIterator[bytes]:
    """Run a response generator to its first chunk; once started, its ``finally`` is guaranteed
    to run (on completion, on client disconnect, or when it is garbage-collected)."""
    try:
        first = await agen.__anext__()
    except StopAsyncIteration:
        first = b""

    async def chained() -> AsyncIterator[bytes]:
        try:
            if first:
                yield first
            async for chunk in agen:
                yield chunk
        finally:
            with contextlib.suppress(Exception):
                await agen.aclose()

    return chained()
