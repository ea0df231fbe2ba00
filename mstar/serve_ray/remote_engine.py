"""The ingress's stand-in for an :class:`mstar.Engine`: the same surface, run by Ray Serve replicas.

The server (``mstar.server.create_app``) is given a :class:`RemoteEngine` instead of an Engine
and serves it unchanged. It uses, and this class implements: ``info``, ``model``, ``voices``,
``closed``, ``generate(stream=True)`` (called on a worker thread, like ``Engine.generate``),
the stream it returns (``request_id``, ``listen``, ``next_event``, ``close``), ``cancel``,
``health``, ``describe``, ``accepted_kwargs``, ``speech_chunk_chars``, ``stats`` and ``close``.

Each request is one streaming call to the replica deployment (``handle.options(stream=True)``);
its reply lines (:mod:`mstar.serve_ray.wire`) become the stream's events. The ingress keeps,
per request id, the response generator serving it, so ``cancel(id)`` (``/cancel``) and closing
the stream (the client went away) cancel that call: Ray raises ``asyncio.CancelledError`` in the
replica, which cancels the request on its engine within one model step.

What the ingress knows of each replica (health, stats, description) comes from the reports
the replicas send (:meth:`RemoteEngine.record_report`), so ``health()``, ``describe()`` and
``stats()`` never block the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from mstar._sugar import ClosingStream, GenerateSugar
from mstar.describe import ModelDescription, describe_model
from mstar.errors import (
    ConflictError,
    InvalidRequestError,
    MStarError,
    NotReadyError,
    RateLimitError,
    ReplicaFailedError,
    ServiceError,
)
from mstar.protocol import check_request_id
from mstar.registry import ModelInfo, get_model_info, load_runner_class
from mstar.request import EventQueue
from mstar.scheduler import EarlyCancels
from mstar.serve_ray.wire import CANCEL_FIRST, error_from_wire, parse_line, request_to_wire
from mstar.types import ErrorChunk, Event, Finished, GenerateResult, event_from_wire

if TYPE_CHECKING:
    from collections.abc import Mapping

    from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

    from mstar.models.params import Param

__all__ = ["RemoteEngine", "RemoteEventStream", "ReplicaReport"]

log = logging.getLogger("mstar.serve_ray")

#: A replica that has not reported for this long is taken for gone (reports come every 0.5 s).
REPORT_STALE_S = 5.0
# The keys of Engine.stats() that readers (the server's /metrics) expect even while no replica reports.
_ZERO_STATS: dict[str, Any] = {
    "inflight": 0, "waiting": 0, "active": 0, "steps": 0, "early_cancels": 0, "cancel_latencies": [],
    "kv_slots_used": 0, "kv_slots_total": 0, "kv_bytes": 0, "kv_blocks_used": 0, "kv_blocks_total": 0,
    "kv_blocks_free": 0, "prefix_hit_tokens": 0, "prefix_queried_tokens": 0, "preemptions": 0,
    "forwards": {}, "rows": {}, "last_rows": {},
}
# A report this old belongs to a replica that is gone for good.
_FORGET_AFTER_S = 60.0
# request id -> replica, kept for requests that ended too (the JSON answer's headers go out after the end).
_RECENT_KEPT = 4096


@dataclass(slots=True)
class ReplicaReport:
    """The latest word from one replica (see :meth:`mstar.serve_ray.replica.EngineReplica.report`)."""

    replica: str
    actor: str
    health: str | None
    stats: dict[str, Any]
    describe: dict[str, Any]
    accepted_kwargs: list[str]
    speech_chunk_chars: int | None
    received: float

    @classmethod
    def from_dict(cls, doc: dict[str, Any], received: float) -> ReplicaReport:
        return cls(
            replica=str(doc["replica"]), actor=str(doc.get("actor") or ""), health=doc.get("health"),
            stats=dict(doc.get("stats") or {}), describe=dict(doc.get("describe") or {}),
            accepted_kwargs=list(doc.get("accepted_kwargs") or []), speech_chunk_chars=doc.get("speech_chunk_chars"),
            received=received,
        )

    def fresh(self, now: float) -> bool:
        return now - self.received < REPORT_STALE_S


class RemoteEventStream(ClosingStream):
    """The events of one request running on a replica; the same interface as :class:`mstar.engine.EventStream`."""

    def __init__(self, engine: RemoteEngine, request_id: str, reply: DeploymentResponseGenerator[str]) -> None:
        self._engine = engine
        self._reply = reply
        self.request_id = request_id
        #: The replica running the request (its Serve replica id), once it accepted it.
        self.replica: str | None = None
        self._events = EventQueue()
        self._finished = False
        self._cancelled = False
        self._pump: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"RemoteEventStream(request_id={self.request_id!r}, replica={self.replica!r})"

    # ---- the EventStream interface
    def __iter__(self) -> RemoteEventStream:
        return self

    def __next__(self) -> Event:
        event = self.next_event(None)
        assert event is not None
        return event

    def next_event(self, timeout: float | None = None) -> Event | None:
        """The next event, None after ``timeout`` seconds without one; raises the request's typed error."""
        import queue

        if self._finished:
            raise StopIteration
        try:
            item = self._events.get(timeout=timeout) if timeout != 0 else self._events.get_nowait()
        except queue.Empty:
            return None
        if isinstance(item, BaseException):
            self._finished = True
            raise item
        if isinstance(item, Finished):
            self._finished = True
        return item

    def listen(self, callback: Any) -> None:
        """Call ``callback()`` (from the event loop) whenever an event is queued (see ``EventStream.listen``)."""
        self._events.listen(callback)

    def close(self) -> None:
        """Stop reading; cancels the request on its replica if it still runs."""
        if not self._finished:
            self._finished = True
            self._engine.cancel(self.request_id, remember=False)

    # ---- driven by the RemoteEngine, on the ingress event loop
    def cancel_call(self) -> None:
        """Cancel the Ray call: the replica gets ``asyncio.CancelledError`` and cancels the request."""
        if not self._cancelled:
            self._cancelled = True
            self._reply.cancel()

    @property
    def cancelled(self) -> bool:
        """True once the ingress cancelled the call."""
        return self._cancelled

    def end(self, event: Finished) -> None:
        """End the stream with ``event`` without a reply to read (a request cancelled before it ran)."""
        self._events.put(event)

    def start(self) -> None:
        self._pump = asyncio.get_running_loop().create_task(self._read_reply())

    async def _read_reply(self) -> None:
        from ray.exceptions import RayActorError, TaskCancelledError
        from ray.serve.exceptions import RequestCancelledError

        try:
            async for line in self._reply:
                doc = parse_line(line)
                if "error" in doc:
                    self._events.put(error_from_wire(doc["error"]))
                    return
                event = event_from_wire(doc)
                if isinstance(event, ErrorChunk):  # never sent as an event; refuse rather than pass it on
                    raise ValueError("an error arrived as an event line")
                self._events.put(event)
                if isinstance(event, Finished):
                    return
            self._events.put(ReplicaFailedError(f"replica {self.replica} ended request {self.request_id!r} "
                                                "without finishing it"))
        except (RequestCancelledError, TaskCancelledError, asyncio.CancelledError):
            if self._cancelled:
                # The replica stopped it; its own Finished cannot cross a cancelled call, so the reader
                # (if any: /cancel while a client reads) gets the end a cancelled request has.
                self._events.put(Finished("cancelled", request_id=self.request_id))
            else:
                self._events.put(ServiceError(f"request {self.request_id!r} was cancelled by the ingress shutting down"))
        except Exception as exc:
            self._events.put(self._engine.failure(exc, self.replica, self.request_id))
            if isinstance(exc, RayActorError) and self.replica is not None:
                self._engine.forget_replica(self.replica)
        finally:
            self._engine.request_ended(self.request_id)


class RemoteEngine(GenerateSugar[RemoteEventStream]):
    """Engine interface over the replica deployment ``replicas`` (a DeploymentHandle).

    Built by the ingress deployment; :meth:`bind_loop` must be given the event loop the
    server runs on before the first request (the ingress's ASGI wrapper does it).
    """

    def __init__(self, model: str, replicas: DeploymentHandle, *, retry_after: float = 1.0) -> None:
        self.info: ModelInfo = get_model_info(model)
        self._handle = replicas.options(stream=True)
        self._retry_after = retry_after
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._streams: dict[str, RemoteEventStream] = {}
        self._recent: OrderedDict[str, str] = OrderedDict()
        self._reports: dict[str, ReplicaReport] = {}
        self._early_cancels = EarlyCancels()
        self._closed = False

    # ---- what the server reads
    @property
    def model(self) -> str:
        return self.info.name

    @property
    def voices(self) -> tuple[str, ...]:
        return self.info.voices

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def speech_chunk_chars(self) -> int | None:
        report = self._any_report()
        return report.speech_chunk_chars if report is not None else None

    def health(self) -> str | None:
        """None while at least one replica is up and healthy; otherwise why none is."""
        if self._closed:
            return "the engine is closed"
        now = time.monotonic()
        with self._lock:
            reports = list(self._reports.values())
        if any(r.fresh(now) and r.health is None for r in reports):
            return None
        if not reports:
            return "no replica has reported ready yet"
        states = "; ".join(f"{r.replica}: {r.health or 'no report for %.0f s' % (now - r.received)}" for r in reports)
        return f"no replica is ready ({states})"

    @property
    def params(self) -> Mapping[str, Param]:
        """The family's declared ``model_kwargs`` rules (the runner class's, read without weights):
        the OpenAI adapters check pass-through values with them before a request leaves the ingress."""
        return load_runner_class(self.info.name).params

    def accepted_kwargs(self) -> list[str]:
        report = self._any_report()
        if report is None:
            raise NotReadyError(f"model {self.info.name!r}: no replica is ready yet; retry shortly")
        return list(report.accepted_kwargs)

    def describe(self) -> ModelDescription:
        """A replica's own description (weights, device, sizing), or the registry's before any reported."""
        report = self._any_report()
        return ModelDescription.from_dict(report.describe) if report is not None else describe_model(self.info.name)

    def stats(self) -> dict[str, Any]:
        """The replicas' engine stats summed (the keys of ``Engine.stats()``), plus ``replicas``: each
        live replica's own stats, by replica id."""
        now = time.monotonic()
        with self._lock:
            live = {r.replica: r for r in self._reports.values() if r.fresh(now)}
            inflight = len(self._streams)
        total: dict[str, Any] = {key: type(value)() for key, value in _ZERO_STATS.items()}
        for report in live.values():
            _add_stats(total, report.stats)
        total["replicas"] = {rid: {**r.stats, "actor": r.actor, "health": r.health} for rid, r in live.items()}
        total["ingress_inflight"] = inflight
        return total

    def replica_of(self, request_id: str) -> str | None:
        """The replica that runs (or ran, recently) ``request_id``."""
        with self._lock:
            stream = self._streams.get(request_id)
            if stream is not None and stream.replica is not None:
                return stream.replica
            return self._recent.get(request_id)

    # ---- requests
    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """The event loop the server runs on: replica calls and stream reading happen there."""
        self._loop = loop

    def generate(self, *, stream: bool = False, request_id: str | None = None,
                 **kwargs: Any) -> GenerateResult | RemoteEventStream:
        """Run one request on a replica (``Engine.generate``'s arguments). Blocks until a replica
        accepted it, so bad input raises its typed error here; call it off the event loop."""
        loop = self._loop
        if loop is None:
            raise NotReadyError("the ingress has not started serving yet")
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            raise RuntimeError("RemoteEngine.generate blocks: call it on a worker thread, not the event loop")
        if self._closed:
            raise ServiceError("the engine is closed")
        rid = check_request_id(request_id if request_id is not None else uuid.uuid4().hex)
        wire = request_to_wire(kwargs)
        wire["request_id"] = rid
        events = asyncio.run_coroutine_threadsafe(self._open(rid, wire), loop).result()
        if stream:
            return events
        collected: list[Event] = []
        try:
            for event in events:
                collected.append(event)
        finally:
            events.close()
        return GenerateResult.from_events(rid, collected)

    async def _open(self, rid: str, wire: dict[str, Any]) -> RemoteEventStream:
        """Send the request to a replica and wait for its first line (accepted, or the typed refusal)."""
        with self._lock:
            # A cancel that raced ahead goes with the request: the replica's engine applies it on
            # arrival, and the request ends as ``cancelled`` the way it would in-process.
            wire[CANCEL_FIRST] = self._early_cancels.take(rid)
        for attempt in (1, 2):
            reply = cast("DeploymentResponseGenerator[str]", self._handle.generate.remote(wire))  # stream=True
            stream = RemoteEventStream(self, rid, reply)
            with self._lock:
                if rid in self._streams:
                    reply.cancel()
                    raise ConflictError(f"request_id {rid!r} is already in flight")
                self._streams[rid] = stream
            try:
                first = parse_line(await reply.__anext__())
            except BaseException as exc:
                self.request_ended(rid)
                if stream.cancelled:  # /cancel came while the request was on its way: it never ran
                    stream.end(Finished("cancelled", request_id=rid))
                    return stream
                failure = self.failure(exc, None, rid)
                # Nothing ran yet, so a replica that died under it is retried once on another.
                if attempt == 1 and isinstance(failure, ReplicaFailedError):
                    continue
                raise failure from None
            if "error" in first:
                self.request_ended(rid)
                raise error_from_wire(first["error"])
            stream.replica = str(first.get("replica"))
            with self._lock:
                self._recent[rid] = stream.replica
                while len(self._recent) > _RECENT_KEPT:
                    self._recent.popitem(last=False)
            stream.start()
            return stream
        raise AssertionError("unreachable")

    def cancel(self, request_id: str, *, remember: bool = True) -> bool:
        """Cancel an in-flight request on whichever replica runs it. True if it was in flight; an id
        not (yet) in flight is remembered for a while, as the Engine does (unless ``remember=False``:
        a stream closing after its request ended)."""
        if not request_id:
            raise InvalidRequestError("cancel needs a request_id", param="request_id")
        check_request_id(request_id)
        with self._lock:
            stream = self._streams.get(request_id)
            if stream is None:
                if remember:
                    self._early_cancels.add(request_id)
                return False
        loop = self._loop
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        if on_loop or loop is None:
            stream.cancel_call()
        else:
            loop.call_soon_threadsafe(stream.cancel_call)
        return True

    def close(self) -> None:
        """Cancel every request in flight; later requests are refused."""
        self._closed = True
        with self._lock:
            ids = list(self._streams)
        for rid in ids:
            self.cancel(rid)

    # ---- bookkeeping (the ingress and the streams call these)
    def record_report(self, doc: dict[str, Any]) -> None:
        report = ReplicaReport.from_dict(doc, time.monotonic())
        with self._lock:
            self._reports[report.replica] = report
            # Replicas replaced or scaled away stop reporting: forget them once long stale.
            for gone in [r for r, rep in self._reports.items() if report.received - rep.received > _FORGET_AFTER_S]:
                del self._reports[gone]

    def forget_replica(self, replica: str) -> None:
        """A replica died: stop counting it until it (or its replacement) reports."""
        with self._lock:
            self._reports.pop(replica, None)

    def request_ended(self, request_id: str) -> None:
        with self._lock:
            self._streams.pop(request_id, None)

    def failure(self, exc: BaseException, replica: str | None, request_id: str) -> MStarError:
        """The typed error a failed replica call becomes."""
        from ray.exceptions import ActorUnavailableError, RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

        if isinstance(exc, MStarError):
            return exc
        if isinstance(exc, BackPressureError):
            return RateLimitError(f"every replica is busy and their queue is full; retry later ({exc})",
                                  retry_after=self._retry_after)
        where = f"replica {replica}" if replica else "the replica it was sent to"
        if isinstance(exc, (RayActorError, ActorUnavailableError, ReplicaUnavailableError)):
            return ReplicaFailedError(f"{where} failed while running request {request_id!r}: {type(exc).__name__}")
        if isinstance(exc, DeploymentUnavailableError):
            return NotReadyError(f"the replica deployment is unavailable: {exc}")
        log.error("request %s: unexpected failure from %s", request_id, where, exc_info=exc)
        return ReplicaFailedError(f"{where} could not run request {request_id!r}: {type(exc).__name__}")

    def _any_report(self) -> ReplicaReport | None:
        now = time.monotonic()
        with self._lock:
            reports = sorted(self._reports.values(), key=lambda r: (not r.fresh(now), r.health is not None))
        return reports[0] if reports else None


def _add_stats(total: dict[str, Any], stats: dict[str, Any]) -> None:
    """Add one replica's engine stats into ``total``: numbers summed, per-component dicts merged, lists joined."""
    for key, value in stats.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            total[key] = total.get(key, 0) + value
        elif isinstance(value, dict):
            merged = total.setdefault(key, {})
            for name, n in value.items():
                if isinstance(n, (int, float)):
                    merged[name] = merged.get(name, 0) + n
        elif isinstance(value, list):
            total.setdefault(key, []).extend(value)
