"""A deadline on receiving a request's body.

uvicorn bounds neither the time a client takes to send its body nor the gaps
between its chunks, so a client that sends its headers and then trickles or
stalls would hold a connection (and the handler awaiting the body) forever.
This ASGI middleware gives every HTTP request ``timeout`` seconds from its
arrival to deliver the whole body; past that, reading the body raises
:class:`~mstar.server.errors.BodyTimeoutError` (408) and the connection closes.
Reads after the body is complete (disconnect watching) are not bounded.
"""

from __future__ import annotations

import asyncio
from typing import Any

from mstar.server.errors import BodyTimeoutError

__all__ = ["BodyTimeoutMiddleware"]


class BodyTimeoutMiddleware:
    """Bound the time to receive a request body (``timeout`` seconds; ``None`` or ``<= 0`` disables it)."""

    def __init__(self, app: Any, timeout: float | None) -> None:
        self.app = app
        self.timeout = timeout

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not self.timeout or self.timeout <= 0:
            await self.app(scope, receive, send)
            return
        timeout = float(self.timeout)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        body_done = False

        async def timed_receive() -> Any:
            nonlocal body_done
            if body_done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.001))
            except TimeoutError:
                raise BodyTimeoutError(
                    f"the request body did not arrive within {timeout:g} s; send it in one go "
                    "(the server's --body-timeout sets this limit)"
                ) from None
            if message.get("type") != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        await self.app(scope, timed_receive, send)
