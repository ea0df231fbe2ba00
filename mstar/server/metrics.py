"""The server's Prometheus metrics: their definitions and the helpers that observe them.

Every app has its own :class:`ServerMetrics` with its own ``CollectorRegistry``, so several
servers in one process never share or clash over a series. ``prometheus-client`` is optional
(the ``server`` extra has it): without it :func:`build_metrics` returns None, nothing is
recorded, and ``GET /metrics`` answers 404 naming the package.

A model request's life is one :class:`CallRecord`, attached to the request's ASGI scope by
:func:`~mstar.server.call.open_call` and fed every event by
:class:`~mstar.server.streaming.AsyncEvents`: the first text, audio and image event each observe
their time-to-first histogram at once, audio seconds count as they arrive. Every HTTP request
(model route or not) is counted once when it ends, by :meth:`ServerMetrics.finish_request`:
called by the app's ``after_response`` hook for answers the route made, and by the exception
handler for errors. Queue depths, KV use and prefix-cache hits are read at scrape time
(:class:`_StatsCollector`) from :class:`~mstar.server.state.Admission` and ``Engine.stats()``.

The metric names, types and labels are listed in docs/server.md ("Metrics").
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, MutableMapping
from typing import TYPE_CHECKING, Any, Protocol, cast

from mstar.errors import MStarError
from mstar.types import AudioChunk, Event, Finished, ImageChunk, TextChunk

if TYPE_CHECKING:
    from litestar.connection import ASGIConnection
    from litestar.types import Message, Scope
    from prometheus_client.metrics_core import Metric

    from mstar.engine import Engine

__all__ = [
    "CallRecord",
    "ServedState",
    "ServerMetrics",
    "build_metrics",
    "call_record",
    "finish_request",
    "remember_status",
    "route_label",
]

log = logging.getLogger("mstar.server")

_RECORD_KEY = "mstar.call_record"
_STATUS_KEY = "mstar.status"
_COUNTED_KEY = "mstar.counted"

# Seconds: a first token on a loaded GPU is tens of milliseconds, a tiny model on a busy CPU seconds.
_FIRST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
# Audio seconds per wall second: below 1 the listener waits, above 1 there is headroom.
_RTF_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)


class _Queue(Protocol):
    @property
    def running(self) -> int: ...
    @property
    def waiting(self) -> int: ...


class _Holder(Protocol):
    @property
    def ready(self) -> bool: ...
    @property
    def engine(self) -> Engine: ...


class ServedState(Protocol):
    """What the metrics read at scrape time: :class:`mstar.server.state.ServerState`."""

    @property
    def model(self) -> str: ...
    @property
    def draining(self) -> bool: ...
    @property
    def admission(self) -> _Queue: ...
    @property
    def holder(self) -> _Holder: ...


def build_metrics(state: ServedState) -> ServerMetrics | None:
    """The metrics of the server of ``state``; None when ``prometheus-client`` is not installed."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        log.info("prometheus-client is not installed: /metrics answers 404 (pip install prometheus-client)")
        return None
    return ServerMetrics(state)


def _scope_state(connection: ASGIConnection[Any, Any, Any, Any]) -> MutableMapping[str, Any]:
    """The per-request ``scope["state"]`` dict (uvicorn gives each request its own copy)."""
    scope = cast("dict[str, Any]", connection.scope)
    state = scope.get("state")
    if state is None:
        state = scope["state"] = {}
    return cast("MutableMapping[str, Any]", state)


def route_label(connection: ASGIConnection[Any, Any, Any, Any]) -> str:
    """The route's path template (``/cancel/{request_id}``), never the raw path: labels stay few.
    A path that matched no route is ``"unmatched"``."""
    template = connection.scope.get("path_template")  # type: ignore[misc]
    return template if isinstance(template, str) else "unmatched"


def call_record(connection: ASGIConnection[Any, Any, Any, Any]) -> CallRecord | None:
    """The request's :class:`CallRecord`, if it is a model request."""
    record = _scope_state(connection).get(_RECORD_KEY)
    return record if isinstance(record, CallRecord) else None


def remember_status(message: Message, scope: Scope) -> None:
    """``before_send`` hook: keep the response's status where :meth:`ServerMetrics.finish_request` reads it."""
    if message["type"] == "http.response.start":
        state = scope.get("state")
        if isinstance(state, dict):
            state[_STATUS_KEY] = message["status"]


def finish_request(connection: ASGIConnection[Any, Any, Any, Any], status: int | None = None, code: str | None = None) -> None:
    """Count a request that ended (see :meth:`ServerMetrics.finish_request`); nothing without metrics."""
    state = connection.app.state.get("mstar")
    metrics = getattr(state, "metrics", None)
    if isinstance(metrics, ServerMetrics):
        metrics.finish_request(connection, status, code)


class CallRecord:
    """What one model request did: when its first text, audio and image came, how much it produced,
    how it ended. Fed by :class:`~mstar.server.streaming.AsyncEvents` (its ``observer``)."""

    __slots__ = ("_metrics", "_scope_state", "audio_seconds", "error_code", "finish_reason", "first", "labels",
                 "opened", "output_tokens", "start")

    def __init__(self, metrics: ServerMetrics | None, route: str, model: str,
                 scope_state: MutableMapping[str, Any] | None = None) -> None:
        self._metrics = metrics
        self._scope_state: MutableMapping[str, Any] = scope_state if scope_state is not None else {}
        self.labels = (route, model)
        self.start = time.monotonic()
        self.first: dict[str, float] = {}  # modality -> seconds from the request's arrival
        self.opened = False  # the engine took the request (events exist)
        self.output_tokens = 0
        self.audio_seconds = 0.0
        self.finish_reason: str | None = None
        self.error_code: str | None = None

    @classmethod
    def attach(cls, connection: ASGIConnection[Any, Any, Any, Any], model: str) -> CallRecord:
        """A new record for this request, kept in its scope for the hooks that end it."""
        state = connection.app.state.get("mstar")
        metrics = getattr(state, "metrics", None)
        scope_state = _scope_state(connection)
        record = cls(metrics if isinstance(metrics, ServerMetrics) else None, route_label(connection), model, scope_state)
        scope_state[_RECORD_KEY] = record
        return record

    def event(self, ev: Event) -> None:
        """One event of the request, as the route reads it."""
        kind = _first_kind(ev)
        if kind is not None and kind not in self.first:
            self.first[kind] = elapsed = time.monotonic() - self.start
            if self._metrics is not None:
                self._metrics.first_output(kind, self.labels, elapsed)
        if isinstance(ev, AudioChunk) and ev.pcm:
            self.audio_seconds += ev.duration
            if self._metrics is not None:
                self._metrics.audio_seconds.labels(*self.labels).inc(ev.duration)
        elif isinstance(ev, Finished):
            self.finish_reason = ev.finish_reason
            self.output_tokens = ev.usage.output_tokens
            if self._metrics is not None:
                self._metrics.generation_done(self)

    def failed(self, exc: BaseException) -> None:
        """The request's events ended with ``exc`` (a model error, a drain, a closed engine)."""
        self.error_code = exc.code if isinstance(exc, MStarError) else "internal_error"

    def cut_short(self, exc: BaseException) -> None:
        """The response was cut off by ``exc`` after it began, with no way to report it in-band (raw
        audio bytes): neither the exception handler nor the after-response hook will see the request
        end, so it is counted here."""
        self.failed(exc)
        if self._metrics is not None:
            self._metrics.count(self._scope_state, self.labels, self)

    def outcome(self) -> str:
        """The ``finish_reason`` label: the model's reason, ``"error"``, ``"disconnected"`` (the events
        were closed before their end: the client went away) or ``"none"`` (the model never ran it)."""
        if self.error_code is not None:
            return "error"
        if self.finish_reason is not None:
            return self.finish_reason
        return "disconnected" if self.opened else "none"


def _first_kind(ev: Event) -> str | None:
    if isinstance(ev, TextChunk):
        return "token" if ev.text else None
    if isinstance(ev, AudioChunk):
        return "audio" if ev.pcm else None
    if isinstance(ev, ImageChunk):
        return "image"
    return None


class ServerMetrics:
    """The metric objects of one app, in their own registry (:attr:`registry`)."""

    def __init__(self, state: ServedState) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        both = ("route", "model")
        self.requests = Counter("mstar_requests_total", "HTTP requests by route, model, status and finish reason",
                                ("route", "model", "status", "finish_reason"), registry=r)
        self.errors = Counter("mstar_request_errors_total", "requests that ended in an error, by its mstar error code "
                              "(HTTP errors and in-band error events alike)", ("route", "model", "code"), registry=r)
        self.rate_limited = Counter("mstar_rate_limited_total", "requests refused with 429 (queue full)", both, registry=r)
        self.timeouts = Counter("mstar_request_timeouts_total", "requests that ran past their deadline (finish_reason "
                                "timeout, 504) or sent their body too slowly (408)", both, registry=r)
        self.cancellations = Counter("mstar_request_cancellations_total", "requests that ended with finish_reason "
                                     "cancelled (POST /cancel, Engine.cancel)", both, registry=r)
        self.disconnects = Counter("mstar_client_disconnects_total", "clients that went away before their response "
                                   "was complete (the request is cancelled in the engine)", both, registry=r)
        self.output_tokens = Counter("mstar_output_tokens_total", "output tokens of finished requests (usage)", both,
                                     registry=r)
        self.audio_seconds = Counter("mstar_output_audio_seconds_total", "seconds of audio sent to clients", both,
                                     registry=r)
        self.first = {
            kind: Histogram(f"mstar_time_to_first_{kind}_seconds", f"seconds from the request's arrival to its first "
                            f"{kind} event", both, buckets=_FIRST_BUCKETS, registry=r)
            for kind in ("token", "audio", "image")
        }
        self.duration = Histogram("mstar_request_duration_seconds", "seconds from a model request's arrival to the end "
                                  "of its response", both, buckets=_DURATION_BUCKETS, registry=r)
        self.rtf = Histogram("mstar_real_time_factor", "audio seconds produced per wall second, per request with audio",
                             both, buckets=_RTF_BUCKETS, registry=r)
        r.register(_StatsCollector(state))

    def render(self) -> tuple[bytes, str]:
        """The text exposition of every metric, and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def first_output(self, kind: str, labels: tuple[str, str], seconds: float) -> None:
        self.first[kind].labels(*labels).observe(seconds)

    def generation_done(self, record: CallRecord) -> None:
        """The request's ``Finished`` event: its tokens, and its real-time factor when it spoke."""
        self.output_tokens.labels(*record.labels).inc(record.output_tokens)
        wall = time.monotonic() - record.start
        if record.audio_seconds > 0 and wall > 0:
            self.rtf.labels(*record.labels).observe(record.audio_seconds / wall)

    def finish_request(self, connection: ASGIConnection[Any, Any, Any, Any], status: int | None = None,
                       code: str | None = None) -> None:
        """Count one HTTP request that ended, once (later calls for it do nothing).

        ``status`` defaults to the one the response started with; ``code`` is the mstar error code
        of an HTTP error. A model request also observes its duration and its outcome counters.
        """
        record = call_record(connection)
        labels = record.labels if record is not None else (route_label(connection), self._model(connection))
        self.count(_scope_state(connection), labels, record, status, code)

    def count(self, scope_state: MutableMapping[str, Any], labels: tuple[str, str], record: CallRecord | None,
              status: int | None = None, code: str | None = None) -> None:
        """:meth:`finish_request` for a request known by its scope state and labels."""
        if scope_state.get(_COUNTED_KEY):
            return
        scope_state[_COUNTED_KEY] = True
        if status is None:
            status = int(scope_state.get(_STATUS_KEY) or 200)
        reason = record.outcome() if record is not None else "none"
        self.requests.labels(*labels, str(status), reason).inc()
        if code is not None or (record is not None and record.error_code is not None):
            self.errors.labels(*labels, code or (record.error_code if record else None) or "error").inc()
        if status == 429:
            self.rate_limited.labels(*labels).inc()
        if status in (408, 504) or reason == "timeout":
            self.timeouts.labels(*labels).inc()
        if reason == "cancelled":
            self.cancellations.labels(*labels).inc()
        if status == 499 or reason == "disconnected":
            self.disconnects.labels(*labels).inc()
        if record is not None and record.opened:
            self.duration.labels(*labels).observe(time.monotonic() - record.start)

    @staticmethod
    def _model(connection: ASGIConnection[Any, Any, Any, Any]) -> str:
        state = connection.app.state.get("mstar")
        return str(getattr(state, "model", ""))


class _StatsCollector:
    """Gauges and counters read at scrape time: admission, the scheduler and the runner's KV."""

    def __init__(self, state: ServedState) -> None:
        self._state = state

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        state = self._state
        model = state.model

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=["model"])
            g.add_metric([model], value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=["model"])
            c.add_metric([model], value)
            return c

        adm = state.admission
        yield gauge("mstar_server_requests_running", "requests holding an admission slot (--max-concurrent)", adm.running)
        yield gauge("mstar_server_requests_waiting", "requests queued for an admission slot (--max-queue)", adm.waiting)
        yield gauge("mstar_server_draining", "1 while the server drains for shutdown, else 0", float(state.draining))
        holder = state.holder
        yield gauge("mstar_model_ready", "1 once the model is loaded, else 0", float(holder.ready))
        if not holder.ready or holder.engine.closed:
            return
        stats = holder.engine.stats()
        yield gauge("mstar_engine_requests_waiting", "requests queued in the scheduler, not yet admitted to the model",
                    stats["waiting"])
        yield gauge("mstar_engine_requests_running", "requests the scheduler is stepping", stats["active"])
        yield counter("mstar_engine_steps", "scheduler steps run", stats["steps"])
        yield gauge("mstar_kv_slots_used", "KV cache slots (requests) in use", stats["kv_slots_used"])
        yield gauge("mstar_kv_slots_total", "KV cache slots", stats["kv_slots_total"])
        yield gauge("mstar_kv_blocks_used", "paged KV blocks held by requests", stats["kv_blocks_used"])
        yield gauge("mstar_kv_blocks_total", "paged KV blocks usable by requests", stats["kv_blocks_total"])
        yield gauge("mstar_kv_cache_bytes", "bytes of KV cache memory", stats["kv_bytes"])
        used, total = ((stats["kv_blocks_used"], stats["kv_blocks_total"]) if stats["kv_blocks_total"]
                       else (stats["kv_slots_used"], stats["kv_slots_total"]))
        if total:
            yield gauge("mstar_kv_cache_usage_ratio", "fraction of the KV cache in use (blocks, or slots when the "
                        "cache is not paged)", used / total)
        yield counter("mstar_prefix_cache_hit_tokens", "prompt tokens found in the prefix cache",
                      stats["prefix_hit_tokens"])
        yield counter("mstar_prefix_cache_queried_tokens", "prompt tokens looked up in the prefix cache",
                      stats["prefix_queried_tokens"])
        yield counter("mstar_preemptions", "requests paused to free KV blocks", stats["preemptions"])
        calls = CounterMetricFamily("mstar_component_calls", "batched calls per model component", labels=["model", "component"])
        rows = CounterMetricFamily("mstar_component_rows", "rows (requests, windows, CFG branches) processed per component",
                                   labels=["model", "component"])
        for component, n in sorted(stats["forwards"].items()):
            calls.add_metric([model, component], n)
            rows.add_metric([model, component], stats["rows"].get(component, 0))
        yield calls
        yield rows
