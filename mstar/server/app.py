"""``create_app``: the ASGI application serving one Engine (native API + OpenAI-compatible /v1)."""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from litestar import Litestar, Request
from litestar.middleware import DefineMiddleware

from mstar.server.body_timeout import BodyTimeoutMiddleware
from mstar.server.call import auth_guard
from mstar.server.errors import exception_handlers
from mstar.server.metrics import finish_request, remember_status
from mstar.server.routes import ALL_ROUTES
from mstar.server.state import EngineHolder, ServerConfig, ServerState

if TYPE_CHECKING:
    from mstar.engine import Engine

__all__ = ["create_app"]

log = logging.getLogger("mstar.server")

# How UploadScope names what it saves under the upload dir: 32 hex digits, as a file with the
# media's extension or as a folder holding the file under the client's name.
_UPLOAD_NAME = re.compile(r"[0-9a-f]{32}(\.[A-Za-z0-9]{1,8})?")


def create_app(
    engine: Engine | Callable[[], Engine] | None = None,
    *,
    model: str | None = None,
    config: ServerConfig | None = None,
    **settings: Any,
) -> Litestar:
    """Build the server app for one engine.

    ``engine`` is a ready :class:`~mstar.Engine`, a zero-argument factory
    (called on a background thread at startup; model routes answer 503 and
    ``/ready`` 503 until it returns), or None with ``model=`` naming the
    family, in which case call ``app.state["mstar"].holder.set_engine(e)``
    later. ``settings`` are :class:`ServerConfig` fields (``api_key``,
    ``max_concurrent``, ``upload_dir`` ...) for when no ``config`` is given.

    >>> app = create_app(mstar.Engine("orpheus", weights="tiny"), api_key="s3cret")
    """
    if config is None:
        config = ServerConfig(**settings)
    elif settings:
        raise TypeError("give either config= or individual settings, not both")
    if isinstance(config.upload_dir, str):
        config.upload_dir = Path(config.upload_dir)
    created_dir = config.upload_dir is None
    upload_dir = config.resolve_upload_dir()

    factory: Callable[[], Engine] | None = None
    if engine is None or (callable(engine) and not hasattr(engine, "generate")):
        if engine is not None:
            factory = engine  # type: ignore[assignment]
        if model is None:
            raise ValueError("create_app needs model= when the engine is not given ready")
        holder = EngineHolder(model=model)
    else:
        holder = EngineHolder(engine)  # type: ignore[arg-type]
        if model is not None and model != holder.info.name:
            raise ValueError(f"model={model!r} does not match the engine's {holder.info.name!r}")

    state = ServerState.build(holder, config)

    def on_startup() -> None:
        if factory is not None and not holder.ready:
            holder.load_in_background(factory)

    def on_shutdown() -> None:
        holder.close()
        _remove_uploads(upload_dir, remove_dir=created_dir)

    def after_response(request: Request[Any, Any, Any]) -> None:
        finish_request(request)  # errors are counted by the exception handlers

    return Litestar(
        route_handlers=ALL_ROUTES,
        middleware=[DefineMiddleware(BodyTimeoutMiddleware, timeout=config.body_timeout)],
        guards=[auth_guard],
        exception_handlers=exception_handlers,
        on_startup=[on_startup],
        on_shutdown=[on_shutdown],
        before_send=[remember_status] if state.metrics is not None else [],
        after_response=after_response if state.metrics is not None else None,
        state=_state(state),
        # The body may hold several uploads (or base64 of them); each is checked against the cap itself.
        request_max_body_size=config.max_upload_bytes * 6 + 1024 * 1024,
        openapi_config=None,
        debug=False,
    )


def _remove_uploads(upload_dir: Path, *, remove_dir: bool) -> None:
    """Delete the uploads a request left behind (one cut off by shutdown), then the directory if
    the server made it. Other files in a given ``--upload-dir`` are not the server's and stay."""
    try:
        leftovers = [p for p in upload_dir.iterdir() if _UPLOAD_NAME.fullmatch(p.name)]
    except OSError:
        return  # already gone
    for path in leftovers:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    if leftovers:
        log.info("removed %d upload(s) left in %s at shutdown", len(leftovers), upload_dir)
    if remove_dir:
        try:
            upload_dir.rmdir()
        except OSError:
            log.warning("upload dir %s was not empty at shutdown", upload_dir)


def _state(state: ServerState) -> Any:
    from litestar.datastructures import State

    return State({"mstar": state})
