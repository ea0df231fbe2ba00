"""The native API: ``/generate`` (JSON or NDJSON), ``/health``, ``/ready`` and ``/cancel``."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from typing import Any

from litestar import Request, Response, get, post

from mstar.errors import InvalidParameterError, InvalidRequestError
from mstar.media import modality_for_filename
from mstar.protocol import parse_modalities
from mstar.server.adapters import SubmitArgs
from mstar.server.call import RouteCall, open_call
from mstar.server.errors import error_chunk
from mstar.server.jsonio import read_json
from mstar.server.multipart import FORM_TYPES, Upload, media_type, read_form
from mstar.server.state import server_state
from mstar.server.streaming import AsyncEvents, stream_response
from mstar.types import event_to_ndjson

__all__ = ["ROUTES"]

_FIELDS = ("text", "messages", "files", "input_modalities", "output_modalities", "streaming", "model_kwargs", "request_id")
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


@get("/health", opt={"public": True}, sync_to_thread=False)
def health() -> dict[str, str]:
    """Liveness: the process answers (no auth)."""
    return {"status": "healthy"}


@get("/ready", sync_to_thread=False)
def ready(request: Request[Any, Any, Any]) -> Response[dict[str, Any]]:
    """Readiness: 200 once the model is loaded, 503 while loading or after a failed load."""
    holder = server_state(request).holder
    if holder.ready:
        return Response({"status": "ready", "model": holder.info.name})
    status = "failed" if holder.load_error is not None else "loading"
    body: dict[str, Any] = {"status": status, "model": holder.info.name}
    if holder.load_error is not None:
        body["error"] = str(holder.load_error)
    return Response(body, status_code=503, headers={"Retry-After": "5"})


def _bool_field(value: str, name: str) -> bool:
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise InvalidParameterError(f"{name} must be true or false, got {value!r}", param=name)


def _model_kwargs(raw: Any) -> dict[str, Any]:
    if raw is None or raw == "":
        return {}
    if isinstance(raw, dict):
        return raw
    try:
        value = json.loads(raw)
    except (ValueError, TypeError) as exc:
        raise InvalidParameterError(f"model_kwargs must be a JSON object: {exc}", param="model_kwargs") from None
    if not isinstance(value, dict):
        raise InvalidParameterError(f"model_kwargs must be a JSON object, got {type(value).__name__}", param="model_kwargs")
    return value


def _messages(raw: Any) -> list[dict[str, Any]] | None:
    """Chat messages as a JSON list of ``{"role", "content"}``; media parts refer to the uploads in order."""
    if raw is None or raw == "":
        return None
    value = raw
    if isinstance(raw, str):
        try:
            value = json.loads(raw)
        except ValueError as exc:
            raise InvalidParameterError(f"messages must be a JSON list of {{role, content}} objects: {exc}", param="messages") from None
    if not isinstance(value, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in value):
        raise InvalidParameterError("messages must be a JSON list of {role, content} objects", param="messages")
    return value


async def _read_fields(call: RouteCall) -> tuple[dict[str, Any], list[Upload]]:
    """The fields (single values) and the uploaded files of a /generate request."""
    ctype = call.content_type
    files: list[Upload] = []
    if ctype == "application/json":
        fields: dict[str, Any] = await call.json()
        if "files" in fields:
            raise InvalidRequestError("files must be uploaded as multipart/form-data", param="files")
    elif ctype in FORM_TYPES:
        form = await call.form()
        fields, files = dict(form.fields), form.files
    else:
        raise InvalidRequestError("send /generate as multipart/form-data (or application/json without files)")
    unknown = sorted(set(fields) - set(_FIELDS))
    if unknown:
        raise InvalidRequestError(
            f"unknown form field(s) {', '.join(map(repr, unknown))}; accepted: {', '.join(_FIELDS)} "
            "(model parameters go inside model_kwargs)",
            param=unknown[0],
        )
    for key in ("text", "input_modalities", "output_modalities", "request_id"):
        if fields.get(key) is not None and not isinstance(fields[key], str):
            raise InvalidParameterError(f"{key} must be a string", param=key)
    return fields, files


@post("/generate", status_code=200)
async def generate(request: Request[Any, Any, Any]) -> Any:
    """Run one request: JSON result, or an NDJSON event stream (``streaming``, default true)."""
    async with open_call(request) as call:
        fields, files = await _read_fields(call)
        streaming = fields.get("streaming", True)
        if not isinstance(streaming, bool):
            streaming = _bool_field(str(streaming), "streaming")
        args = SubmitArgs(
            text=fields.get("text"),
            messages=_messages(fields.get("messages")),
            model_kwargs=_model_kwargs(fields.get("model_kwargs")),
        )
        # A model that takes no such input says so before the file's bytes are looked at.
        call.state.holder.engine.info.check_inputs(
            [m for m in (modality_for_filename(u.filename or "") for u in files) if m is not None]
        )
        for upload in files:
            modality, path = call.uploads.save_upload(upload.filename, upload.data)
            args.add_media(modality, path)
        args.output_modalities = parse_modalities(fields.get("output_modalities") or None, "output_modalities") or ("text",)
        extra: dict[str, Any] = {}
        if fields.get("input_modalities"):
            extra["input_modalities"] = parse_modalities(fields["input_modalities"], "input_modalities")
        if fields.get("request_id"):
            extra["request_id"] = fields["request_id"]
        events = await call.start(args, **extra)
    headers = {"X-Request-Id": events.request_id}
    if streaming:
        return await stream_response(
            events, _ndjson(events), media_type="application/x-ndjson", headers=headers,
            on_error=lambda exc: event_to_ndjson(error_chunk(exc)),
        )
    result = await call.result(events)
    return Response(result.to_json(), headers=headers)


async def _ndjson(events: AsyncEvents) -> AsyncGenerator[bytes, None]:
    yield b""  # the status line goes out at once: from here on, a failure is an in-band error line
    async for ev in events:
        yield event_to_ndjson(ev)


async def _cancel(request: Request[Any, Any, Any], request_id: str | None) -> dict[str, Any]:
    if not request_id or not isinstance(request_id, str) or not request_id.strip():
        raise InvalidRequestError("cancel needs a request_id (there is no 'cancel everything')", param="request_id")
    found = server_state(request).holder.engine.cancel(request_id)
    return {
        "request_id": request_id,
        "cancelled": found,
        "status": "cancelled" if found else "pending",  # an unknown id is remembered briefly, in case its request races in
    }


@post("/cancel/{request_id:str}", status_code=200)
async def cancel_by_path(request: Request[Any, Any, Any], request_id: str) -> dict[str, Any]:
    """Cancel an in-flight request by id."""
    return await _cancel(request, request_id)


@post("/cancel", status_code=200)
async def cancel_by_body(request: Request[Any, Any, Any]) -> dict[str, Any]:
    """Cancel by ``request_id`` given as JSON or a form field; no id is refused (400)."""
    ctype = media_type(request)
    rid: Any = request.query_params.get("request_id")
    if rid is None and ctype == "application/json":
        rid = (await read_json(request)).get("request_id")
    elif rid is None and ctype in FORM_TYPES:
        rid = (await read_form(request)).fields.get("request_id")
    return await _cancel(request, rid)


ROUTES = [health, ready, generate, cancel_by_path, cancel_by_body]
