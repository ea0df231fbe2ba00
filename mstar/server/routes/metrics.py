"""``GET /metrics``: the Prometheus text exposition of the server's metrics (:mod:`mstar.server.metrics`)."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, get

from mstar.errors import NotFoundError
from mstar.server.state import server_state

__all__ = ["ROUTES"]


@get("/metrics", opt={"metrics": True}, sync_to_thread=False)
def metrics(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Every metric of this server; needs the API key unless the server runs with ``--public-metrics``."""
    server_metrics = server_state(request).metrics
    if server_metrics is None:
        raise NotFoundError("/metrics needs the prometheus-client package, which is not installed: "
                            "pip install prometheus-client (or pip install 'mstar[server]')")
    body, content_type = server_metrics.render()
    return Response(body, media_type=content_type)


ROUTES = [metrics]
