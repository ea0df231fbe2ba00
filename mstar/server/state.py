"""The server's shared state: settings, the (possibly still loading) engine, admission control."""

from __future__ import annotations

import asyncio
import logging
import tempfile
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mstar.errors import NotReadyError, RateLimitError
from mstar.registry import ModelInfo, get_model_info

if TYPE_CHECKING:
    from mstar.engine import Engine

__all__ = ["Admission", "EngineHolder", "ServerConfig"]

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

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> None:
        if self.running < self.max_concurrent and not self._waiters:
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
            if fut.done() and not fut.cancelled():
                self.release()  # we were handed a slot we will not use: pass it on
            else:
                try:
                    self._waiters.remove(fut)
                except ValueError:
                    pass
            raise

    def release(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self.running -= 1

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        await self.acquire()
        try:
            yield
        finally:
            self.release()

    def stats(self) -> dict[str, int]:
        return {"running": self.running, "waiting": self.waiting, "max_concurrent": self.max_concurrent, "max_queue": self.max_queue}
