"""Engine events reach the event loop through a wake-up hook, with no thread per stream."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from mstar.engine import EventStream
from mstar.errors import ModelError
from mstar.request import Request, RequestInputs
from mstar.server.streaming import AsyncEvents
from mstar.types import Event, Finished, TextChunk


class _Engine:
    """Stands in for the Engine: EventStream only calls ``cancel``."""

    def __init__(self) -> None:
        self.cancelled: list[str] = []

    def cancel(self, request_id: str) -> bool:
        self.cancelled.append(request_id)
        return True


def _request(rid: str) -> Request:
    return Request(rid, RequestInputs(text="x"), input_modalities=("text",), output_modalities=("text",), params={}, seed=0)


async def _drain(events: AsyncEvents) -> list[Event]:
    return [ev async for ev in events]


def test_many_streams_are_fed_from_the_scheduler_thread_without_threads_of_their_own() -> None:
    engine = _Engine()
    reqs = [_request(f"r{i}") for i in range(40)]

    async def main() -> list[list[Event]]:
        before = threading.active_count()
        streams = [AsyncEvents(EventStream(engine, r)) for r in reqs]  # type: ignore[arg-type]
        assert threading.active_count() == before, "an AsyncEvents must not start a thread"

        def produce() -> None:  # the scheduler: one thread emitting for every request
            for i in range(5):
                for r in reqs:
                    r.emit(TextChunk(str(i)))
                time.sleep(0.002)
            for r in reqs:
                r.finish("stop")

        producer = threading.Thread(target=produce)
        producer.start()
        try:
            return await asyncio.wait_for(asyncio.gather(*(_drain(s) for s in streams)), 10)
        finally:
            producer.join()

    results = asyncio.run(main())
    for got in results:
        assert "".join(ev.text for ev in got if isinstance(ev, TextChunk)) == "01234"
        assert isinstance(got[-1], Finished)
    assert engine.cancelled == []


def test_events_queued_before_listening_are_delivered() -> None:
    req = _request("early")
    req.emit(TextChunk("a"))
    req.finish("stop")

    async def main() -> list[Event]:
        return await asyncio.wait_for(_drain(AsyncEvents(EventStream(_Engine(), req))), 5)  # type: ignore[arg-type]

    got = asyncio.run(main())
    assert isinstance(got[0], TextChunk) and isinstance(got[-1], Finished)


def test_a_failed_request_raises_its_typed_error_then_ends() -> None:
    req = _request("doomed")

    async def main() -> None:
        events = AsyncEvents(EventStream(_Engine(), req))  # type: ignore[arg-type]
        threading.Timer(0.05, req.fail, args=(RuntimeError("boom"),)).start()
        with pytest.raises(ModelError, match="boom"):
            await asyncio.wait_for(events.__anext__(), 5)
        with pytest.raises(StopAsyncIteration):
            await events.__anext__()

    asyncio.run(main())


def test_close_cancels_and_runs_on_close_once() -> None:
    engine = _Engine()
    req = _request("left")
    closed: list[int] = []

    async def main() -> None:
        events = AsyncEvents(EventStream(engine, req), on_close=lambda: closed.append(1))  # type: ignore[arg-type]
        events.close()
        events.close()
        req.emit(TextChunk("late"))  # the runner's last step after the cancel: nobody is woken for it
        with pytest.raises(StopAsyncIteration):
            await events.__anext__()

    asyncio.run(main())
    assert engine.cancelled == ["left"] and closed == [1]
