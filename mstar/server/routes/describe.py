"""``GET /describe``: the served model's inputs, outputs, voices and parameters.

Answers while the model loads too: the registry's description (``engine``: null)
until the engine is ready, then the engine's own (weights, device, dtype, sizing).
"""

from __future__ import annotations

from typing import Any

from litestar import Request, get

from mstar.describe import describe_model
from mstar.server.fields import refuse_query
from mstar.server.state import server_state

__all__ = ["ROUTES"]


@get("/describe", sync_to_thread=False)
def describe(request: Request[Any, Any, Any]) -> dict[str, Any]:
    """:class:`mstar.describe.ModelDescription` of the served model, as JSON."""
    refuse_query(request.query_params, "/describe")  # it takes no options: a query would look honoured
    holder = server_state(request).holder
    desc = holder.engine.describe() if holder.ready else describe_model(holder.info.name)
    return desc.to_dict()


ROUTES = [describe]
