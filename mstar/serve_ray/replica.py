"""One replica: a Ray Serve deployment holding one :class:`mstar.Engine`.

The ingress calls :meth:`EngineReplica.generate` through a streaming DeploymentHandle; the
reply is JSON lines (:mod:`mstar.serve_ray.wire`). The request runs on this replica's engine
exactly as it would in-process, read with the server's own :class:`~mstar.server.streaming.AsyncEvents`.
When the ingress cancels the call (the client went away, or ``/cancel``), Ray raises
``asyncio.CancelledError`` inside :meth:`generate`; its ``finally`` closes the events, which
cancels the request in the engine, and the scheduler stops it within one model step.

Every ``report_interval`` seconds the replica tells the ingress who it is, whether its engine
is healthy, and its engine's stats (:meth:`mstar.serve_ray.ingress.MStarIngress.report`):
``/ready``, ``Engine.stats()`` and the ``X-MStar-Replica`` header come from those reports.
Ray's own health check calls :meth:`check_health`; an unhealthy engine makes Ray replace the replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any

from mstar.serve_ray.wire import CANCEL_FIRST, accepted_line, error_line, event_line

if TYPE_CHECKING:
    from mstar.engine import Engine

__all__ = ["REPORT_INTERVAL_S", "EngineReplica"]

log = logging.getLogger("mstar.serve_ray")

#: How often a replica reports to the ingress (seconds).
REPORT_INTERVAL_S = 0.5
# The stats' cancel-latency list can hold thousands of pairs; a report carries the latest only.
_LATENCIES_KEPT = 100


class EngineReplica:
    """The replica deployment's class (made a deployment by :func:`mstar.serve_ray.build_app`).

    ``engine_kwargs`` are :class:`mstar.Engine` keyword arguments (``weights``, ``device``,
    ``max_batch_size`` ...; ``tensor_parallel_size`` when the Engine takes it). ``ingress`` is
    the name of the ingress deployment of the same application, which receives the reports.
    """

    # Ray Serve awaits an async constructor on the replica's event loop (mypy wants __init__ sync).
    async def __init__(self, model: str, engine_kwargs: dict[str, Any], ingress: str | None = None,  # type: ignore[misc]
                       report_interval: float = REPORT_INTERVAL_S) -> None:
        import ray
        from ray import serve

        from mstar.engine import Engine

        # Building the engine loads weights: off the replica's event loop, which must keep answering Ray.
        self.engine: Engine = await asyncio.to_thread(lambda: Engine(model, **engine_kwargs))
        context = serve.get_replica_context()
        self.replica_id: str = context.replica_id.unique_id
        #: The Ray actor behind this replica (``ray.get_actor(name, namespace="serve")``).
        self.actor_name: str = ray.get_runtime_context().get_actor_name() or ""
        self._ingress = serve.get_deployment_handle(ingress, app_name=context.app_name) if ingress else None
        self._interval = report_interval
        self._reporter = asyncio.get_running_loop().create_task(self._report_loop()) if self._ingress else None

    async def generate(self, kwargs: dict[str, Any]) -> AsyncGenerator[str, None]:
        """Run one request; yields its accepted line, its events and ``Finished`` (or an error line)."""
        from mstar.server.streaming import AsyncEvents, submit

        kwargs = dict(kwargs)
        if kwargs.pop(CANCEL_FIRST, False):  # its cancel came first: the engine applies it as the request arrives
            self.engine.cancel(kwargs["request_id"])
        try:
            stream = await submit(self.engine, **kwargs)  # validates off the loop; typed errors before anything runs
        except Exception as exc:
            yield error_line(exc)
            return
        events = AsyncEvents(stream)
        try:
            yield accepted_line(stream.request_id, self.replica_id)
            async for event in events:
                yield event_line(event)
        except Exception as exc:  # the request failed in the engine (ModelError, timeout, a dead TP worker ...)
            yield error_line(exc)
        finally:
            events.close()  # on asyncio.CancelledError too: cancels the request in the engine

    def report(self) -> dict[str, Any]:
        """What this replica tells the ingress: identity, health, engine stats and description."""
        stats = self.engine.stats()
        stats["cancel_latencies"] = list(stats.get("cancel_latencies", []))[-_LATENCIES_KEPT:]
        return {
            "replica": self.replica_id,
            "actor": self.actor_name,
            "health": self.engine.health(),
            "stats": stats,
            "describe": self.engine.describe().to_dict(),
            "accepted_kwargs": self.engine.accepted_kwargs(),
            "speech_chunk_chars": self.engine.speech_chunk_chars,
        }

    async def _report_loop(self) -> None:
        assert self._ingress is not None
        while True:
            try:
                await self._ingress.report.remote(self.report())
            except Exception as exc:  # the ingress restarts or is not up yet: try again next time
                log.debug("replica %s could not report: %s", self.replica_id, exc)
            await asyncio.sleep(self._interval)

    def check_health(self) -> None:
        """Ray Serve's periodic health check: raising makes Ray replace this replica."""
        problem = self.engine.health()
        if problem is not None:
            raise RuntimeError(f"engine unhealthy: {problem}")

    def __del__(self) -> None:
        reporter = getattr(self, "_reporter", None)
        if reporter is not None:
            reporter.cancel()
        engine = getattr(self, "engine", None)
        if engine is not None:
            with contextlib.suppress(Exception):
                engine.close()
