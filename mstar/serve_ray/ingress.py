"""The ingress deployment: today's server app (``mstar.server.create_app``) over a :class:`RemoteEngine`.

Ray Serve's HTTP proxy hands each HTTP request to this deployment, which runs the Litestar app
unchanged: the same routes, auth, admission (sized for all replicas, so a full system answers
429 with Retry-After before any header), error shape and streaming. The app's engine is a
:class:`~mstar.serve_ray.remote_engine.RemoteEngine` that sends each request to a replica.

A thin ASGI wrapper around the app binds the RemoteEngine to the event loop the app runs on,
and names the replica that served a request in an ``X-MStar-Replica`` response header.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any, cast

from mstar.serve_ray.remote_engine import RemoteEngine

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle

    from mstar.server.state import ServerConfig

__all__ = ["REPLICA_HEADER", "MStarIngress", "ReplicaHeader"]

#: The response header naming the replica (its Ray Serve replica id) that ran the request.
REPLICA_HEADER = "X-MStar-Replica"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class ReplicaHeader:
    """ASGI wrapper: binds ``engine`` to the serving loop and adds :data:`REPLICA_HEADER` to answers
    that carry an ``X-Request-Id`` the engine knows."""

    def __init__(self, app: ASGIApp, engine: RemoteEngine) -> None:
        self.app = app
        self.engine = engine

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.engine.bind_loop(asyncio.get_running_loop())
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_tagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or [])
                rid = next((bytes(v) for k, v in headers if bytes(k).lower() == b"x-request-id"), None)
                replica = self.engine.replica_of(rid.decode("latin-1")) if rid else None
                if replica is not None:
                    message = {**message, "headers": [*headers, (REPLICA_HEADER.lower().encode(), replica.encode())]}
            await send(message)

        await self.app(scope, receive, send_tagged)


class MStarIngress:
    """The ingress deployment's class (made a deployment by :func:`mstar.serve_ray.build_app`).

    ``replicas`` is the handle of the replica deployment; ``config`` the server settings
    (:class:`~mstar.server.state.ServerConfig`, admission sized for every replica).
    """

    def __init__(self, replicas: DeploymentHandle, model: str, config: ServerConfig) -> None:
        from mstar.server import create_app

        self.engine = RemoteEngine(model, replicas, retry_after=config.retry_after_s)
        # The server takes any object with the Engine's surface; RemoteEngine is one (see its docstring).
        self._app = create_app(cast(Any, self.engine), config=config)

    def __serve_build_asgi_app__(self) -> ASGIApp:  # Ray Serve asks for the app after __init__
        return ReplicaHeader(cast(ASGIApp, self._app), self.engine)

    async def report(self, doc: dict[str, Any]) -> None:
        """A replica's periodic report (see :meth:`mstar.serve_ray.replica.EngineReplica.report`)."""
        self.engine.record_report(doc)

    async def admission(self) -> dict[str, int]:
        """The server's admission counts: running, waiting, and their limits."""
        state = self._app.state["mstar"]
        stats: dict[str, int] = state.admission.stats()
        return stats

    async def stats(self) -> dict[str, Any]:
        """:meth:`RemoteEngine.stats`: the replicas' engine stats, summed and per replica."""
        return self.engine.stats()
