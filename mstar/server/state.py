"""The server's one state object, :class:`ServerState`, and what it is made of.

``app.state["mstar"]`` holds a :class:`ServerState`: the settings
(:class:`ServerConfig`, the CLI flags), the engine (:class:`EngineHolder`,
possibly still loading), admission control (:class:`Admission`), the media
policy, the metrics (:mod:`mstar.server.metrics`), the requests in flight and
whether the server drains for shutdown (:mod:`mstar.server.drain`), and the
served model's OpenAI adapter lookup. Routes reach it with :func:`server_state`.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mstar.errors import DrainingError, NotFoundError, NotReadyError, RateLimitError, UnknownModelError
from mstar.registry import ModelInfo, get_model_info
from mstar.server.adapters import OpenAIAdapter, get_adapter_class
from mstar.server.media_io import MediaPolicy, UploadScope
from mstar.server.metrics import ServerMetrics, build_metrics

if TYPE_CHECKING:
    from litestar.connection import ASGIConnection

    from mstar.engine import Engine
    from mstar.server.streaming import AsyncEvents

__all__ = ["Admission", "EngineHolder", "ServerConfig", "ServerState", "server_state"]

log = logging.getLogger("mstar.server")


@dataclass(slots=True)
class ServerConfig:
    """Server settings (the CLI flags)."""

    upload_dir: Path | None = None  # default: a fresh temporary directory
    max_upload_mb: float = 25.0
    max_concurrent: int = 16
    max_queue: int = 64
    allow_remote_media: bool = False
    remote_timeout: float = 10.0
    api_key: str | None = None
    retry_after_s: float = 1.0
    body_timeout: float | None = 30.0  # seconds to receive a whole request body; slower clients get 408
    shutdown_grace_s: float = 30.0  # on SIGTERM, seconds running requests get to finish (mstar-server)
    public_metrics: bool = False  # /metrics without the API key (for a scraper that cannot send one)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    def resolve_upload_dir(self) -> Path:
        if self.upload_dir is None:
            self.upload_dir = Path(tempfile.mkdtemp(prefix="mstar-uploads-"))
        self.upload_dir.mkdir(parents=True, exist_ok=True)
        return self.upload_dir


class EngineHolder:
    """Holds the engine; it may be set later (loading in a background thread).

    Until it is set, :attr:`engine` raises :class:`NotReadyError` (503).
    """

    def __init__(self, engine: Engine | None = None, *, model: str | None = None) -> None:
        if engine is None and model is None:
            raise ValueError("give an engine or the name of the model being loaded")
        self._engine = engine
        self.info: ModelInfo = engine.info if engine is not None else get_model_info(model or "")
        self.load_error: BaseException | None = None
        self.owned = False  # close the engine on shutdown (it was built by the server)
        self._thread: threading.Thread | None = None

    @property
    def ready(self) -> bool:
        return self._engine is not None

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            if self.load_error is not None:
                raise NotReadyError(f"model {self.info.name!r} failed to load: {self.load_error}")
            raise NotReadyError(f"model {self.info.name!r} is still loading; retry shortly")
        return self._engine

    def set_engine(self, engine: Engine) -> None:
        if engine.info.name != self.info.name:
            raise ValueError(f"engine serves {engine.info.name!r}, the server was set up for {self.info.name!r}")
        self._engine = engine

    def load_in_background(self, factory: Callable[[], Engine]) -> threading.Thread:
        """Build the engine on a thread; the server answers 503 on model routes meanwhile."""

        def run() -> None:
            try:
                self.set_engine(factory())
                self.owned = True
                log.info("model %s loaded", self.info.name)
            except BaseException as exc:
                self.load_error = exc
                log.exception("loading model %s failed", self.info.name)

        self._thread = threading.Thread(target=run, name="mstar-load", daemon=True)
        self._thread.start()
        return self._thread

    def close(self) -> None:
        if self._thread is not None:
            self._thread.join(timeout=0.1)
        if self.owned and self._engine is not None:
            self._engine.close()


class Admission:
    """Bounds the requests running at once and the requests waiting for a slot.

    Beyond ``max_concurrent`` running and ``max_queue`` waiting, a request is
    refused with :class:`RateLimitError` (429 with Retry-After). Used from the
    event loop only; :meth:`release` is synchronous so it is safe in a
    ``finally`` of a cancelled task.
    """

    def __init__(self, max_concurrent: int, max_queue: int, retry_after: float = 1.0) -> None:
        if max_concurrent < 1 or max_queue < 0:
            raise ValueError("max_concurrent must be >= 1 and max_queue >= 0")
        self.max_concurrent = max_concurrent
        self.max_queue = max_queue
        self.retry_after = retry_after
        self.running = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._closed: Callable[[], BaseException] | None = None

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @property
    def free(self) -> bool:
        """True when :meth:`acquire` would not wait."""
        return self.running < self.max_concurrent and not self._waiters

    async def acquire(self) -> None:
        if self._closed is not None:
            raise self._closed()
        if self.free:
            self.running += 1
            return
        if len(self._waiters) >= self.max_queue:
            raise RateLimitError(
                f"server is busy: {self.running} requests running and {len(self._waiters)} queued; retry later",
                retry_after=self.retry_after,
            )
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut  # resolved by release(): the slot is handed over, ``running`` unchanged
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.release()  # we were handed a slot we will not use: pass it on
            else:
                try:
                    self._waiters.remove(fut)
                except ValueError:
                    pass
            raise

    def close(self, refusal: Callable[[], BaseException]) -> None:
        """Admit nothing more: every waiting request and every later :meth:`acquire` raises
        ``refusal()``; running requests keep their slots until they :meth:`release` them."""
        self._closed = refusal
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(refusal())

    def release(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self.running -= 1

    def stats(self) -> dict[str, int]:
        return {"running": self.running, "waiting": self.waiting, "max_concurrent": self.max_concurrent, "max_queue": self.max_queue}


@dataclass(slots=True)
class ServerState:
    """Everything the routes share: ``app.state["mstar"]``."""

    holder: EngineHolder
    config: ServerConfig
    admission: Admission
    media_policy: MediaPolicy
    created: int = field(default_factory=lambda: int(time.time()))
    metrics: ServerMetrics | None = None  # None without prometheus-client
    inflight: set[AsyncEvents] = field(default_factory=set)  # the HTTP model requests the engine runs
    draining: bool = False
    aborting: Callable[[], BaseException] | None = None  # set once the drain's grace is over

    @classmethod
    def build(cls, holder: EngineHolder, config: ServerConfig) -> ServerState:
        state = cls(
            holder=holder,
            config=config,
            admission=Admission(config.max_concurrent, config.max_queue, config.retry_after_s),
            media_policy=MediaPolicy(
                max_bytes=config.max_upload_bytes,
                allow_remote=config.allow_remote_media,
                remote_timeout=config.remote_timeout,
            ),
        )
        state.metrics = build_metrics(state)
        return state

    @property
    def model(self) -> str:
        return self.holder.info.name

    # ---- shutdown (see mstar.server.drain)
    def draining_error(self) -> DrainingError:
        """What a request that arrives while the server drains is told (503 with Retry-After)."""
        return DrainingError("the server is shutting down and takes no new requests; retry on another instance",
                             retry_after=self.config.retry_after_s)

    def begin_drain(self) -> None:
        """Stop admitting: ``/ready`` answers 503 ``draining``, new and queued requests get 503."""
        self.draining = True
        self.admission.close(self.draining_error)

    def abort_inflight(self, exc: Callable[[], BaseException]) -> int:
        """End every model request still running with ``exc()`` (an error line or response); how many."""
        self.aborting = exc  # a request still on its way into the engine is ended as it arrives
        running = list(self.inflight)
        for events in running:
            events.abort(exc())
        return len(running)

    def uploads(self) -> UploadScope:
        """A fresh scope for one request's media (deleted when it closes)."""
        return UploadScope(self.config.resolve_upload_dir(), self.media_policy)

    # ---- the OpenAI surface
    def adapter(self, model_field: str | None = None, surface: str | None = None) -> OpenAIAdapter:
        """The served model's adapter, checking the request's ``model`` and the surface (404 if none)."""
        cls = get_adapter_class(self.model)
        if cls is None:
            raise NotFoundError(
                f"model {self.model!r} has no OpenAI-compatible surface (its outputs have no OpenAI shape); "
                "use POST /generate or the Python SDK"
            )
        if model_field is not None:
            self.check_model(model_field)
        adapter = cls(self.holder.engine)
        if surface is not None and surface not in adapter.surfaces():
            raise adapter.no_surface(surface.replace("_", " "))
        return adapter

    def has_openai_surface(self) -> bool:
        return get_adapter_class(self.model) is not None

    def serves(self, name: str) -> bool:
        """True when ``name`` is the served model's name or hub id."""
        return name in (self.model, self.holder.info.hub_id)

    def check_model(self, name: str) -> None:
        if not self.serves(name):
            raise UnknownModelError(name, [self.model])


def server_state(connection: ASGIConnection[Any, Any, Any, Any]) -> ServerState:
    state: ServerState = connection.app.state["mstar"]
    return state
