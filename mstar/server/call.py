"""What every model route does first: auth, the route check, the body, uploads, admission.

Authentication is the app-wide :func:`auth_guard`. Then each route that runs
the model opens its request with ``async with open_call(request, surface) as call``,
which

* answers 503 while the model loads or the server drains for shutdown, and 404
  when the model lacks the OpenAI
  ``surface`` (``"chat"``, ``"speech"``, ``"images"``, ``"image_edits"``;
  None for the native ``/generate``), before a possibly large body is read;
* opens the request's :class:`~mstar.server.media_io.UploadScope`
  (``call.uploads``), whose files are deleted when the block ends;
* reads the body (:meth:`RouteCall.json`, :meth:`RouteCall.form`), translates
  an OpenAI request off the event loop (:meth:`RouteCall.translate`), and
  starts requests (:meth:`RouteCall.start`: an admission slot, left at once if
  the client hangs up while queued, then the engine).

Each call carries a :class:`~mstar.server.metrics.CallRecord` (``call.record``) that
its events feed, and its events are listed in ``ServerState.inflight`` while they
run, so a draining server can end them.
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
from litestar import Request
from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from mstar.errors import AuthenticationError
from mstar.server.adapters import OpenAIAdapter, SubmitArgs
from mstar.server.fields import refuse_query
from mstar.server.jsonio import read_json
from mstar.server.media_io import UploadScope
from mstar.server.metrics import CallRecord
from mstar.server.multipart import Form, media_type, read_form
from mstar.server.state import ServerState, server_state
from mstar.server.streaming import AsyncEvents, collect, submit, unless_disconnected
from mstar.types import Event, GenerateResult

__all__ = ["RouteCall", "auth_guard", "check_api_key", "open_call"]

R = TypeVar("R")


def auth_guard(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    """Bearer-token check on every route but those marked ``opt={"public": True}`` (/health), and
    ``/metrics`` (``opt={"metrics": True}``) when the server runs with ``public_metrics``."""
    if handler.opt.get("public"):
        return
    if handler.opt.get("metrics") and server_state(connection).config.public_metrics:
        return
    check_api_key(connection)


def check_api_key(connection: ASGIConnection[Any, Any, Any, Any]) -> None:
    """Raise :class:`AuthenticationError` unless the connection carries the server's bearer token (if
    it has one). The WebSocket speech stream calls it itself, to report a refusal as an error event."""
    key = server_state(connection).config.api_key
    if not key:
        return
    header = connection.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationError("missing API key: send 'Authorization: Bearer <key>'")
    if not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise AuthenticationError("invalid API key")


@dataclass(slots=True)
class RouteCall:
    """One HTTP request on its way to the engine (see :func:`open_call`)."""

    request: Request[Any, Any, Any]
    state: ServerState
    uploads: UploadScope
    record: CallRecord
    surface: str | None = None

    @property
    def content_type(self) -> str:
        return media_type(self.request)

    async def json(self) -> dict[str, Any]:
        """The body as a JSON object."""
        return await read_json(self.request)

    async def form(self) -> Form:
        """The body as a form (see :mod:`mstar.server.multipart`)."""
        return await read_form(self.request)

    def adapter(self, model: str) -> OpenAIAdapter:
        """The adapter for this call's surface, after checking the request's ``model`` field."""
        return self.state.adapter(model, self.surface)

    async def translate(self, method: Callable[[R, UploadScope], SubmitArgs], req: R) -> SubmitArgs:
        """Run an adapter's ``*_to_request`` on a worker thread: it may decode and save media."""
        return await anyio.to_thread.run_sync(method, req, self.uploads)

    async def start(self, args: SubmitArgs, **extra: Any) -> AsyncEvents:
        """Take an admission slot and queue the request; the slot is freed when the events close."""
        engine = self.state.holder.engine
        admission = self.state.admission
        if admission.free:
            await admission.acquire()  # no wait, nothing to watch
        else:
            await unless_disconnected(admission.acquire(), self.request.receive)
        try:
            stream = await submit(engine, **args.engine_kwargs(), **extra)
        except BaseException:
            admission.release()
            raise
        inflight = self.state.inflight

        def closed() -> None:
            inflight.discard(events)
            admission.release()

        events = AsyncEvents(stream, on_close=closed, observer=self.record)
        inflight.add(events)
        self.record.opened = True
        if self.state.aborting is not None:  # the drain's grace ended while this request was submitted
            events.abort(self.state.aborting())
        return events

    async def collect(self, events: AsyncEvents) -> list[Event]:
        """Every event of ``events`` (closing them); a client that disconnects first cancels the request."""
        return await collect(events, self.request.receive)

    async def result(self, events: AsyncEvents) -> GenerateResult:
        """:meth:`collect`, gathered into one result."""
        return GenerateResult.from_events(events.request_id, await self.collect(events))


@asynccontextmanager
async def open_call(request: Request[Any, Any, Any], surface: str | None = None) -> AsyncIterator[RouteCall]:
    """Check the route applies to the served model, then open the request's upload scope."""
    state = server_state(request)
    record = CallRecord.attach(request, state.model)
    if state.draining:
        raise state.draining_error()
    if surface is None:
        state.holder.engine  # 503 before reading a large body for nothing  # noqa: B018
    else:
        state.adapter(surface=surface)  # 404 (or 503) before reading the body
    refuse_query(request.query_params, request.url.path)  # model routes read their fields from the body only
    with state.uploads() as uploads:
        yield RouteCall(request, state, uploads, record, surface)
