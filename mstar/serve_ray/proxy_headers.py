"""One ``X-Request-Id`` per answer through Ray Serve's HTTP proxy.

Ray's proxy appends its own ``X-Request-ID`` (its tracing id) to every response, after the one
the mstar server sets to the request's id, and HTTP clients join the two into ``"ours, Ray's"``:
``MStarClient`` could then not cancel a stream by the id it was told. Ray lets the proxy be given
extra ASGI middlewares through the environment variable :data:`PROXY_CALLBACK_ENV`, read where
the proxy starts; :func:`proxy_middlewares` is that callback, and its middleware keeps the first
``X-Request-Id`` (the server's) and drops Ray's copy.

:func:`mstar.serve_ray.run` sets the variable for the Ray cluster it starts itself; on a cluster
started with ``ray start``, set it there (see docs/scaling.md).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

__all__ = ["PROXY_CALLBACK", "PROXY_CALLBACK_ENV", "OneRequestId", "proxy_middlewares"]

#: The environment variable Ray Serve's proxy reads its middleware callback from.
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
#: Its value for mstar.
PROXY_CALLBACK = "mstar.serve_ray.proxy_headers:proxy_middlewares"

Message = MutableMapping[str, Any]
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class OneRequestId:
    """ASGI middleware: a response keeps only its first ``X-Request-Id`` header."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_one(message: Message) -> None:
            if message["type"] == "http.response.start":
                kept, seen = [], False
                for name, value in message.get("headers") or []:
                    if bytes(name).lower() == b"x-request-id":
                        if seen:
                            continue
                        seen = True
                    kept.append((name, value))
                message = {**message, "headers": kept}
            await send(message)

        await self.app(scope, receive, send_one)


def proxy_middlewares() -> list[Any]:
    """The Starlette middlewares for Ray Serve's proxy (the :data:`PROXY_CALLBACK_ENV` callback)."""
    from starlette.middleware import Middleware

    return [Middleware(OneRequestId)]
