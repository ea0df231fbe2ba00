"""Replicas on Ray Serve: ``pip install "mstar[server,ray]"``, ``mstar-server --replicas N``.

One ingress deployment runs the usual server app (``mstar.server.create_app``) over a
:class:`RemoteEngine`, which sends each request to one of N replica deployments holding one
:class:`mstar.Engine` each. See docs/scaling.md.

- :func:`build_app` — the Ray Serve application, for users who compose their own;
- :func:`deploy` — start Serve's HTTP proxy and deploy an application on the connected cluster;
- :func:`run` — start or join a cluster and serve until interrupted (what the CLI calls).
"""

from __future__ import annotations

from mstar.serve_ray.app import APP_NAME, INGRESS_DEPLOYMENT, REPLICA_DEPLOYMENT, Scaling, build_app, deploy, run
from mstar.serve_ray.ingress import REPLICA_HEADER
from mstar.serve_ray.remote_engine import RemoteEngine, RemoteEventStream

__all__ = [
    "APP_NAME",
    "INGRESS_DEPLOYMENT",
    "REPLICA_DEPLOYMENT",
    "REPLICA_HEADER",
    "RemoteEngine",
    "RemoteEventStream",
    "Scaling",
    "build_app",
    "deploy",
    "run",
]
