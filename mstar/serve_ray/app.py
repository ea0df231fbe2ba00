"""Build and run the Ray Serve application: an ingress deployment in front of N engine replicas.

>>> from mstar.serve_ray import build_app
>>> app = build_app("orpheus", replicas=2, engine_kwargs={"weights": "tiny"})
>>> serve.run(app, name="mstar", route_prefix="/")          # inside your own Ray Serve setup

:func:`build_app` returns the application for users who compose their own; :func:`deploy`
starts Serve's HTTP proxy and deploys it on the Ray cluster this process is connected to;
:func:`run` (what ``mstar-server --replicas`` calls) also starts or joins the cluster and
serves until interrupted.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from mstar.errors import InvalidParameterError
from mstar.serve_ray.ingress import MStarIngress
from mstar.serve_ray.proxy_headers import PROXY_CALLBACK, PROXY_CALLBACK_ENV
from mstar.serve_ray.replica import EngineReplica

if TYPE_CHECKING:
    from ray.serve import Application
    from ray.serve.handle import DeploymentHandle

    from mstar.server.state import ServerConfig

__all__ = [
    "APP_NAME",
    "DEFAULT_REPLICA_CONCURRENCY",
    "INGRESS_DEPLOYMENT",
    "REPLICA_DEPLOYMENT",
    "Scaling",
    "build_app",
    "deploy",
    "run",
]

log = logging.getLogger("mstar.serve_ray")

APP_NAME = "mstar"
INGRESS_DEPLOYMENT = "MStarIngress"
REPLICA_DEPLOYMENT = "EngineReplica"
#: Requests one replica runs at once when neither ``replica_concurrency`` nor ``max_batch_size`` says.
DEFAULT_REPLICA_CONCURRENCY = 16
# The ingress also answers /ready, /describe, reports and cancels: room beyond the admitted requests,
# so Ray's proxy never refuses (503) what the server's own admission should decide (429).
_INGRESS_HEADROOM = 256


@dataclass(frozen=True, slots=True)
class Scaling:
    """How many replicas: a fixed ``replicas``, or Ray Serve autoscaling between ``min_replicas``
    and ``max_replicas`` (starting at ``replicas``) aiming at ``target_ongoing_requests`` per replica."""

    replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float | None = None

    @property
    def autoscaling(self) -> bool:
        return any(v is not None for v in (self.min_replicas, self.max_replicas, self.target_ongoing_requests))

    @property
    def most(self) -> int:
        """The largest number of replicas there can be (what the ingress's admission is sized for)."""
        return max(self.replicas, self.max_replicas or 0)

    def check(self) -> Scaling:
        for name in ("replicas", "min_replicas", "max_replicas"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "min_replicas" else 1)):
                raise InvalidParameterError(f"{name} must be a positive integer, got {value!r}", param=name)
        low = self.min_replicas if self.min_replicas is not None else 1
        high = self.max_replicas if self.max_replicas is not None else max(self.replicas, low)
        if not low <= self.replicas <= high:
            raise InvalidParameterError(
                f"replicas ({self.replicas}) must lie between min_replicas ({low}) and max_replicas ({high})",
                param="replicas")
        target = self.target_ongoing_requests
        if target is not None and (isinstance(target, bool) or not isinstance(target, (int, float)) or target <= 0):
            raise InvalidParameterError(f"target_ongoing_requests must be > 0, got {target!r}",
                                        param="target_ongoing_requests")
        return self

    def deployment_options(self) -> dict[str, Any]:
        """``num_replicas``, or Ray Serve's ``autoscaling_config``."""
        if not self.autoscaling:
            return {"num_replicas": self.replicas}
        config: dict[str, Any] = {
            "min_replicas": self.min_replicas if self.min_replicas is not None else 1,
            "max_replicas": self.most,
            "initial_replicas": self.replicas,
        }
        if self.target_ongoing_requests is not None:
            config["target_ongoing_requests"] = self.target_ongoing_requests
        return {"autoscaling_config": config}


def build_app(
    model: str,
    *,
    replicas: int = 1,
    min_replicas: int | None = None,
    max_replicas: int | None = None,
    target_ongoing_requests: float | None = None,
    replica_concurrency: int | None = None,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    engine_kwargs: dict[str, Any] | None = None,
    server_config: ServerConfig | None = None,
    max_queued_requests: int | None = None,
) -> Application:
    """The Ray Serve application serving ``model``: replicas of one Engine each, behind the server app.

    ``engine_kwargs`` are :class:`mstar.Engine` keyword arguments for every replica (``weights``,
    ``device``, ``max_batch_size``, ``tensor_parallel_size`` ...). Each replica reserves
    ``num_cpus`` CPUs and ``num_gpus`` GPUs from Ray (a tensor-parallel replica needs
    ``num_gpus=tensor_parallel_size``: Ray then gives its process, and the worker processes the
    Engine starts, that many devices on one machine). ``replica_concurrency`` requests run on a
    replica at once (its Ray ``max_ongoing_requests``; default ``max_batch_size``, else 16); the
    ingress admits ``replica_concurrency`` times the most replicas there can be, and queues
    ``server_config.max_queue`` more before answering 429. ``max_queued_requests`` (default: all
    the ingress admits) bounds the requests Ray holds for a replica while none has room (a replica
    restarting, one Ray's router has not heard of yet); beyond it Ray's ``BackPressureError`` is
    answered 429 too. ``server_config`` is the server's
    :class:`~mstar.server.state.ServerConfig`; its ``max_concurrent`` is replaced by that size.
    """
    from ray import serve

    from mstar.registry import get_model_info
    from mstar.server.state import ServerConfig

    get_model_info(model)  # an unknown model fails here, not on every replica
    scaling = Scaling(replicas, min_replicas, max_replicas, target_ongoing_requests).check()
    engine_kwargs = dict(engine_kwargs or {})
    per_replica = replica_concurrency or engine_kwargs.get("max_batch_size") or DEFAULT_REPLICA_CONCURRENCY
    if isinstance(per_replica, bool) or not isinstance(per_replica, int) or per_replica < 1:
        raise InvalidParameterError(f"replica_concurrency must be a positive integer, got {per_replica!r}",
                                    param="replica_concurrency")
    if num_cpus < 0 or num_gpus < 0:
        raise InvalidParameterError("num_cpus and num_gpus per replica must be >= 0", param="num_gpus")
    config = replace(server_config or ServerConfig(), max_concurrent=per_replica * scaling.most)
    # Ray's router can hold a request for a moment although admission counted a free replica slot
    # (a replica it has not heard of yet, a finished stream not yet counted): by default it may hold
    # every request the ingress admits, so the ingress's admission alone decides 429.
    queued = config.max_concurrent + config.max_queue if max_queued_requests is None else max_queued_requests

    deployment: Any = serve.deployment  # its overloads do not type a class given with options
    replica = deployment(
        EngineReplica,
        name=REPLICA_DEPLOYMENT,
        max_ongoing_requests=per_replica,
        max_queued_requests=queued,
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
        health_check_period_s=2.0,
        health_check_timeout_s=30.0,
        **scaling.deployment_options(),
    )
    ingress = deployment(
        serve.ingress()(MStarIngress),
        name=INGRESS_DEPLOYMENT,
        num_replicas=1,  # the one place admission is decided
        max_ongoing_requests=config.max_concurrent + config.max_queue + _INGRESS_HEADROOM,
        max_queued_requests=-1,
        ray_actor_options={"num_cpus": 0},
    )
    app: Application = ingress.bind(replica.bind(model, engine_kwargs, INGRESS_DEPLOYMENT), model, config)
    return app


def deploy(app: Application, *, host: str = "127.0.0.1", port: int = 8000, name: str = APP_NAME) -> DeploymentHandle:
    """Start Ray Serve's HTTP proxy on ``host:port`` and deploy ``app`` at ``/`` on the connected
    cluster; returns once every replica is up (the ingress's handle)."""
    from ray import serve

    serve.start(http_options={"host": host, "port": port})
    return serve.run(app, name=name, route_prefix="/")


def run(
    model: str,
    *,
    ray_address: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    **build_kwargs: Any,
) -> None:
    """Serve ``model`` on replicas until SIGINT/SIGTERM: ``mstar-server --replicas`` / ``--ray-address``.

    Without ``ray_address`` a Ray cluster is started on this machine (and stopped at the end);
    with one (``"auto"``, ``"10.0.0.5:6379"``) the application is deployed on that cluster and
    deleted from it at the end. ``build_kwargs`` go to :func:`build_app`; ``num_gpus=None`` (or
    absent) reserves one GPU per tensor-parallel rank when the cluster has GPUs and the engine's
    device is not the CPU (Ray hides every GPU from a replica that reserves none), else none.
    """
    import ray
    from ray import serve

    # Read where Ray's HTTP proxy starts: a cluster started here inherits it (see proxy_headers).
    os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)
    own_cluster = ray_address is None
    ray.init(address=ray_address or "local", include_dashboard=False, log_to_driver=True)
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        if build_kwargs.get("num_gpus") is None:
            build_kwargs["num_gpus"] = _default_gpus(dict(build_kwargs.get("engine_kwargs") or {}))
        deploy(build_app(model, **build_kwargs), host=host, port=port)
        log.info("serving %s on http://%s:%d with Ray Serve", model, host, port)
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        if own_cluster:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
        ray.shutdown()


def _default_gpus(engine_kwargs: dict[str, Any]) -> float:
    """GPUs per replica when none are named: one per tensor-parallel rank if the connected cluster has any."""
    import ray

    if str(engine_kwargs.get("device") or "").startswith("cpu") or not ray.cluster_resources().get("GPU"):
        return 0.0
    return float(engine_kwargs.get("tensor_parallel_size") or 1)
