"""``GET /v1/models``: the served model, listed only when it has an OpenAI surface."""

from __future__ import annotations

from typing import Any

from litestar import Request, get

from mstar.errors import NotFoundError
from mstar.server.state import ServerState, server_state

__all__ = ["ROUTES"]


def _entry(state: ServerState) -> dict[str, Any]:
    return {"id": state.model, "object": "model", "created": state.created, "owned_by": "mstar", "root": state.holder.info.hub_id}


@get("/v1/models")
async def list_models(request: Request[Any, Any, Any]) -> dict[str, Any]:
    state = server_state(request)
    data = [_entry(state)] if state.has_openai_surface() else []
    return {"object": "list", "data": data}


@get("/v1/models/{model_id:path}")
async def get_model(request: Request[Any, Any, Any], model_id: str) -> dict[str, Any]:
    state = server_state(request)
    name = model_id.lstrip("/")
    if not state.has_openai_surface() or not state.serves(name):
        err = NotFoundError(f"model {name!r} is not served on the OpenAI-compatible API", param="model")
        err.code = "model_not_found"
        raise err
    return _entry(state)


ROUTES = [list_models, get_model]
