"""Graceful shutdown for ``mstar-server``: drain, then stop.

uvicorn, left to itself, stops listening the moment SIGTERM arrives, so a load balancer never
sees ``/ready`` turn 503, running streams are waited on for as long as they take, and the
signal is raised again on the way out (the process dies of it instead of exiting 0).
:class:`DrainingServer` replaces its signal handling:

1. the first SIGTERM (or SIGINT) starts :func:`drain`: the server keeps listening but admits
   nothing (``/ready`` 503 ``draining``, model requests 503 :class:`~mstar.errors.DrainingError`
   with Retry-After, queued requests refused the same way);
2. running requests get ``grace_s`` seconds to finish;
3. those still running then end with ``DrainingError``: an in-band error event when streaming,
   a 503 error body otherwise (:meth:`mstar.server.streaming.AsyncEvents.abort`);
4. uvicorn then shuts down as usual (connections closed, the app's shutdown closes the engine and
   removes the uploads) and the process exits 0.

A second signal ends the grace period at once; a third stops without waiting at all.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn

from mstar.errors import DrainingError

if TYPE_CHECKING:
    from mstar.server.state import ServerState

__all__ = ["DrainingServer", "drain"]

log = logging.getLogger("mstar.server")

_POLL_S = 0.05
# After the grace, how long the ended requests get to write their error and close.
_FLUSH_S = 3.0


async def drain(state: ServerState, grace_s: float, hurry: asyncio.Event | None = None) -> int:
    """Stop admitting, wait up to ``grace_s`` seconds (or until ``hurry`` is set) for the running
    requests, then end the rest with :class:`DrainingError`. Returns how many were ended that way."""
    loop = asyncio.get_running_loop()
    state.begin_drain()
    log.info("draining: no new requests; %d running get up to %.3g s to finish", state.admission.running, grace_s)
    deadline = loop.time() + grace_s
    while state.admission.running and loop.time() < deadline and not (hurry is not None and hurry.is_set()):
        await asyncio.sleep(_POLL_S)

    def stopped() -> DrainingError:
        return DrainingError(f"the server shut down before this request finished (grace period {grace_s:.3g} s)",
                             retry_after=state.config.retry_after_s)

    ended = state.abort_inflight(stopped)
    if ended:
        log.warning("draining: ended %d request(s) still running after the grace period", ended)
    deadline = loop.time() + _FLUSH_S
    while state.admission.running and loop.time() < deadline:
        await asyncio.sleep(_POLL_S)
    if state.admission.running:
        log.warning("draining: %d request(s) (WebSocket sessions) still hold a slot; uvicorn closes them",
                    state.admission.running)
    return ended


class DrainingServer(uvicorn.Server):
    """A ``uvicorn.Server`` that drains the app (see the module docstring) before it stops.

    ``state`` is the app's ``app.state["mstar"]``; the grace period is its
    ``config.shutdown_grace_s`` (``--shutdown-grace-s``).

    >>> app = create_app(engine, shutdown_grace_s=10)
    >>> DrainingServer(uvicorn.Config(app, port=8000), state=app.state["mstar"]).run()
    """

    def __init__(self, config: uvicorn.Config, *, state: ServerState) -> None:
        if state.config.shutdown_grace_s < 0:
            raise ValueError("the shutdown grace period must be >= 0 seconds")
        super().__init__(config)
        self.state = state
        self.grace_s = state.config.shutdown_grace_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._hurry: asyncio.Event | None = None
        self._task: asyncio.Task[int] | None = None
        self._signals = 0  # exit signals received so far

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self._hurry = asyncio.Event()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """The signal handler (main thread): the first signal drains, the second ends the grace
        period, the third stops without waiting."""
        loop, hurry = self._loop, self._hurry
        if loop is None or hurry is None:  # not serving yet: uvicorn's own way
            super().handle_exit(sig, frame)
            return
        self._signals += 1
        name = signal.Signals(sig).name
        if self._signals == 1:
            log.info("received %s: draining for up to %.3g s", name, self.grace_s)
            loop.call_soon_threadsafe(self._start_drain)
        elif self._signals == 2:
            log.info("received %s again: ending the grace period now", name)
            loop.call_soon_threadsafe(hurry.set)
        else:
            log.warning("received %s a third time: stopping without waiting", name)
            self.should_exit = True
            self.force_exit = True

    def _start_drain(self) -> None:
        if self._task is not None:
            return
        assert self._hurry is not None
        self._task = asyncio.ensure_future(drain(self.state, self.grace_s, self._hurry))
        self._task.add_done_callback(self._drained)

    def _drained(self, task: asyncio.Task[int]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("draining failed; stopping now", exc_info=task.exception())
        self.should_exit = True
