"""What every route needs: the server state, and starting a request on the engine."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from litestar import Request
from litestar.connection import ASGIConnection
from litestar.exceptions import HTTPException
from litestar.handlers.base import BaseRouteHandler
from litestar.response import Stream

from mstar.errors import AuthenticationError, InvalidRequestError, MStarError, NotFoundError, UnknownModelError
from mstar.server.adapters import OpenAIAdapter, SubmitArgs, get_adapter_class
from mstar.server.media_io import MediaPolicy, UploadScope
from mstar.server.state import Admission, EngineHolder, ServerConfig
from mstar.server.streaming import AsyncEvents, ClientDisconnected, submit

__all__ = ["ServerState", "StreamResponse", "auth_guard", "prime", "read_body", "server_state"]


@dataclass(slots=True)
class ServerState:
    holder: EngineHolder
    config: ServerConfig
    admission: Admission
    media_policy: MediaPolicy
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def model(self) -> str:
        return self.holder.info.name

    def uploads(self) -> UploadScope:
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

    def check_model(self, name: str) -> None:
        if name not in (self.model, self.holder.info.hub_id):
            raise UnknownModelError(name, [self.model])

    # ---- running
    async def start(self, args: SubmitArgs, *, receive: Callable[[], Awaitable[Any]] | None = None, **extra: Any) -> AsyncEvents:
        """Take an admission slot and queue the request; the slot is freed when the events close.

        With ``receive`` (the ASGI receive of a request whose body was read), a client
        that hangs up while waiting for a slot leaves the queue at once.
        """
        engine = self.holder.engine
        if receive is None:
            await self.admission.acquire()
        else:
            await _acquire_unless_disconnected(self.admission, receive)
        try:
            stream = await submit(engine, **args.engine_kwargs(), **extra)
        except BaseException:
            self.admission.release()
            raise
        return AsyncEvents(stream, on_close=self.admission.release)


async def _acquire_unless_disconnected(admission: Admission, receive: Callable[[], Awaitable[Any]]) -> None:
    if admission.running < admission.max_concurrent and not admission.waiting:
        await admission.acquire()  # a free slot: no wait, nothing to watch
        return

    async def watch() -> None:
        while (await receive()).get("type") != "http.disconnect":
            pass

    acquire_task = asyncio.ensure_future(admission.acquire())
    watch_task = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({acquire_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch_task.cancel()
        if not acquire_task.done():
            acquire_task.cancel()
    if acquire_task.done() and not acquire_task.cancelled():
        acquire_task.result()  # re-raise a RateLimitError
        return
    raise ClientDisconnected()


def server_state(request: ASGIConnection[Any, Any, Any, Any]) -> ServerState:
    state: ServerState = request.app.state["mstar"]
    return state


def auth_guard(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    """Bearer-token check on every route but those marked ``opt={"public": True}`` (/health)."""
    key = server_state(connection).config.api_key
    if not key or handler.opt.get("public"):
        return
    header = connection.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationError("missing API key: send 'Authorization: Bearer <key>'")
    if not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise AuthenticationError("invalid API key")


async def prime(agen: AsyncGenerator[bytes, None]) -> AsyncIterator[bytes]:
    """Run a response generator to its first chunk before the status line goes out.

    Errors before that chunk become proper HTTP errors; once started, the
    generator's ``finally`` is guaranteed to run (on completion, on client
    disconnect, or when it is garbage-collected).
    """
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


async def read_body(request: Request[Any, Any, Any]) -> bytes:
    try:
        return await request.body()
    except (HTTPException, MStarError):
        raise  # e.g. 413 for a body over the limit, 408 for a body too slow: mapped by the error handlers
    except Exception as exc:
        raise InvalidRequestError(f"could not read the request body: {exc}") from exc


class StreamResponse(Stream):
    """A streaming response whose own media type wins (Litestar otherwise prefers the handler's JSON default)."""

    def to_asgi_response(self, *args: Any, media_type: Any = None, **kwargs: Any) -> Any:
        return super().to_asgi_response(*args, media_type=None, **kwargs)
