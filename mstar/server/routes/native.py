"""The native API: ``/generate`` (JSON or NDJSON), ``/health``, ``/ready`` and ``/cancel``."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from litestar import Request, Response, get, post

from mstar.errors import InvalidParameterError, InvalidRequestError
from mstar.media import modality_for_filename
from mstar.messages import MEDIA_PART_TYPES
from mstar.protocol import check_request_id, parse_modalities
from mstar.server.adapters import SubmitArgs
from mstar.server.call import RouteCall, open_call
from mstar.server.errors import error_chunk
from mstar.server.fields import form_bool, json_kind, refuse_unknown
from mstar.server.jsonio import loads_strict, read_json
from mstar.server.message_media import place_message_media
from mstar.server.multipart import FORM_TYPES, Upload, media_type, read_form
from mstar.server.state import server_state
from mstar.server.streaming import AsyncEvents, stream_response
from mstar.types import event_to_ndjson

__all__ = ["ROUTES"]

_FIELDS = ("text", "messages", "files", "input_modalities", "output_modalities", "streaming", "model_kwargs", "request_id")


@get("/health", opt={"public": True}, sync_to_thread=False)
def health() -> dict[str, str]:
    """Liveness: the process answers (no auth)."""
    return {"status": "healthy"}


@get("/ready", sync_to_thread=False)
def ready(request: Request[Any, Any, Any]) -> Response[dict[str, Any]]:
    """Readiness: 200 once the model is loaded and healthy; 503 while loading, after a failed load,
    when the engine reports a problem (:meth:`mstar.Engine.health`), or while the server drains for shutdown."""
    state = server_state(request)
    holder = state.holder
    if state.draining:
        return Response({"status": "draining", "model": holder.info.name,
                         "error": "the server is shutting down and takes no new requests"},
                        status_code=503, headers={"Retry-After": "5"})
    if holder.ready:
        problem = holder.engine.health()
        if problem is None:
            return Response({"status": "ready", "model": holder.info.name})
        return Response({"status": "unhealthy", "model": holder.info.name, "error": problem},
                        status_code=503, headers={"Retry-After": "5"})
    status = "failed" if holder.load_error is not None else "loading"
    body: dict[str, Any] = {"status": status, "model": holder.info.name}
    if holder.load_error is not None:
        body["error"] = str(holder.load_error)
    return Response(body, status_code=503, headers={"Retry-After": "5"})


def _model_kwargs(raw: Any) -> dict[str, Any]:
    if raw is None or raw == "":
        return {}
    value = loads_strict(raw, "model_kwargs", param="model_kwargs") if isinstance(raw, str) else raw
    if not isinstance(value, dict):
        raise InvalidParameterError(f"model_kwargs must be a JSON object, got {json_kind(value)}", param="model_kwargs")
    return value


_PART_TYPES = ("text", "input_text", "image", "audio", "video")
_MEDIA_HINT = ("on /generate, upload each file in 'files' and refer to it with {\"type\": \"image\"} "
               "(or audio, video), or inline as an OpenAI part: " + ", ".join(MEDIA_PART_TYPES))


def _messages(raw: Any, files: list[Upload]) -> list[dict[str, Any]] | None:
    """Chat messages as a JSON list of ``{"role", "content"}``; media parts refer to the uploads in order."""
    if raw is None or raw == "":
        return None
    value = loads_strict(raw, "messages", param="messages") if isinstance(raw, str) else raw
    if not isinstance(value, list) or not value:
        raise InvalidParameterError("messages must be a non-empty JSON list of {role, content} objects", param="messages")
    uploaded: dict[str, int] = {}
    for upload in files:
        modality = modality_for_filename(upload.filename)
        if modality is not None:
            uploaded[modality] = uploaded.get(modality, 0) + 1
    referred: dict[str, int] = {}
    for i, msg in enumerate(value):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise InvalidParameterError(f"messages[{i}] must be a {{role, content}} object with a string role", param="messages")
        refuse_unknown((k for k, v in msg.items() if v is not None), ("role", "content"), f"messages[{i}]")
        content = msg.get("content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise InvalidParameterError(f"messages[{i}].content must be a string or a list of parts", param="messages")
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            ptype = part.get("type") if isinstance(part, dict) else None
            if ptype in MEDIA_PART_TYPES:  # OpenAI media parts: checked and saved by place_message_media
                continue
            if ptype not in _PART_TYPES:
                raise InvalidParameterError(f"{where} has type {ptype!r}; parts are text, image, audio or video: {_MEDIA_HINT}"[:400],
                                            param="messages")
            assert isinstance(part, dict)
            if ptype in ("text", "input_text"):
                refuse_unknown(part, ("type", "text"), where)
                if not isinstance(part.get("text"), str):
                    raise InvalidParameterError(f"{where}.text must be a string", param="messages")
            else:
                refuse_unknown(part, ("type",), where, hint=f" ({_MEDIA_HINT})")
                referred[ptype] = referred.get(ptype, 0) + 1
    for modality, count in referred.items():
        if count > uploaded.get(modality, 0):
            raise InvalidParameterError(
                f"messages refer to {count} {modality} part(s) but {uploaded.get(modality, 0)} {modality} file(s) were uploaded",
                param="messages",
            )
    return value


async def _read_fields(call: RouteCall) -> tuple[dict[str, Any], list[Upload]]:
    """The fields (single values) and the uploaded files of a /generate request."""
    ctype = call.content_type
    files: list[Upload] = []
    if ctype == "application/json":
        given: dict[str, Any] = await call.json()
        if "files" in given:
            raise InvalidRequestError("files must be uploaded as multipart/form-data", param="files")
    elif ctype in FORM_TYPES:
        form = await call.form()
        given, files = dict(form.fields), form.files
        if "files" in given:
            raise InvalidParameterError(
                "'files' must be file uploads (a part with a filename, e.g. curl -F files=@photo.png), not text", param="files"
            )
        for upload in files:
            if upload.field != "files":
                what = "is a text field" if upload.field in _FIELDS else "is not a field of /generate"
                raise InvalidParameterError(
                    f"a file ({upload.filename!r}) was sent as {upload.field!r}, which {what}; media uploads go in 'files'"[:300],
                    param=upload.field,
                )
    else:
        raise InvalidRequestError("send /generate as multipart/form-data (or application/json without files)")
    unknown = sorted(set(given) - set(_FIELDS))
    if unknown:
        raise InvalidRequestError(
            f"unknown form field(s) {', '.join(map(repr, unknown))}; accepted: {', '.join(_FIELDS)} "
            "(model parameters go inside model_kwargs)"[:400],
            param=unknown[0],
        )
    for key in ("text", "input_modalities", "output_modalities", "request_id"):
        if given.get(key) is not None and not isinstance(given[key], str):
            raise InvalidParameterError(f"{key} must be a string", param=key)
    if ctype == "application/json" and given.get("streaming") is not None and not isinstance(given["streaming"], bool):
        raise InvalidParameterError(f"streaming must be true or false, got {given['streaming']!r}"[:200], param="streaming")
    if given.get("request_id") is not None:  # "" too: an empty id is refused, not replaced
        check_request_id(given["request_id"])  # before anything runs: the id goes into a header and /cancel paths
    return given, files


@post("/generate", status_code=200)
async def generate(request: Request[Any, Any, Any]) -> Any:
    """Run one request: JSON result, or an NDJSON event stream (``streaming``, default true)."""
    async with open_call(request) as call:
        fields, files = await _read_fields(call)
        streaming = fields.get("streaming", True)
        if not isinstance(streaming, bool):
            streaming = form_bool(str(streaming), "streaming")
        args = SubmitArgs(
            text=fields.get("text"),
            messages=_messages(fields.get("messages"), files),
            model_kwargs=_model_kwargs(fields.get("model_kwargs")),
        )
        # A model that takes no such input says so before the file's bytes are looked at.
        call.state.holder.engine.info.check_inputs(
            [m for m in (modality_for_filename(u.filename or "") for u in files) if m is not None]
        )
        for upload in files:
            modality, path = call.uploads.save_upload(upload.filename, upload.data)
            args.add_media(modality, path)
        args.output_modalities = parse_modalities(
            fields.get("output_modalities"), "output_modalities"
        ) or call.state.holder.info.default_outputs  # absent: what the model always produces
        extra: dict[str, Any] = {}
        if fields.get("input_modalities") is not None:
            extra["input_modalities"] = parse_modalities(fields["input_modalities"], "input_modalities")
        if fields.get("request_id") is not None:
            extra["request_id"] = fields["request_id"]
        if args.messages:  # OpenAI media parts (data URLs, input_audio, allowed remote URLs) saved like uploads
            info = call.state.holder.engine.info
            args = await call.translate(lambda a, scope: place_message_media(a, scope, info), args)
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


async def _cancel(request: Request[Any, Any, Any], request_id: Any) -> dict[str, Any]:
    if request_id is None or (isinstance(request_id, str) and not request_id.strip()):
        raise InvalidRequestError("cancel needs a request_id (there is no 'cancel everything')", param="request_id")
    request_id = check_request_id(request_id)  # the id rule of /generate: an id it refuses was never in flight
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
    refuse_unknown(request.query_params, ("request_id",), "the query string")
    rid: Any = request.query_params.get("request_id")
    body: dict[str, Any] = {}
    if ctype == "application/json":
        body = await read_json(request)
    elif ctype in FORM_TYPES:
        form = await read_form(request)
        if form.files:
            raise InvalidParameterError("cancel takes no files", param=form.files[0].field)
        body = dict(form.fields)
    refuse_unknown(body, ("request_id",), "the cancel body")
    if rid is not None and body.get("request_id") not in (None, rid):
        raise InvalidParameterError("request_id is given twice (query and body) with different values", param="request_id")
    return await _cancel(request, rid if rid is not None else body.get("request_id"))


ROUTES = [health, ready, generate, cancel_by_path, cancel_by_body]
