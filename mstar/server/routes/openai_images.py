"""``POST /v1/images/generations`` and ``POST /v1/images/edits`` (multipart), answering b64_json."""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any

import anyio
from litestar import Request, post
from litestar.datastructures import UploadFile
from litestar.exceptions import HTTPException

from mstar.errors import InvalidParameterError, InvalidRequestError, ModelError, MStarError, RequestTimeoutError
from mstar.server.adapters import SubmitArgs
from mstar.server.context import ServerState, read_body, server_state
from mstar.server.openai_schema import ImageRequest, parse_edit_form, parse_image, parse_json_object
from mstar.server.streaming import collect_or_cancel
from mstar.types import GenerateResult

__all__ = ["ROUTES"]


async def _run_n(state: ServerState, request: Request[Any, Any, Any], req: ImageRequest, args: SubmitArgs) -> Any:
    """Run the request ``n`` times (seed, seed+1, ... when a seed is given) and shape the answer."""
    images: list[dict[str, Any]] = []
    seeds: list[int | None] = []
    base_seed = args.model_kwargs.get("seed")
    for i in range(req.n):
        kwargs = dict(args.model_kwargs)
        if base_seed is not None:
            kwargs["seed"] = int(base_seed) + i
        one = SubmitArgs(text=args.text, messages=args.messages, images=args.images, output_modalities=args.output_modalities, model_kwargs=kwargs)
        events = await state.start(one, receive=request.receive)
        collected = await collect_or_cancel(events, request.receive)
        result = GenerateResult.from_events(events.request_id, collected)
        if result.finish_reason == "timeout":
            raise RequestTimeoutError("image generation ran past its deadline")
        if not result.images:
            raise ModelError(f"the model produced no image (finish_reason={result.finish_reason})")
        images.extend({"b64_json": base64.b64encode(png).decode("ascii"), "revised_prompt": None} for png in result.images)
        seeds.append(result.seed)
    return {"created": int(time.time()), "data": images, "seeds": seeds}


@post("/v1/images/generations", status_code=200)
async def generations(request: Request[Any, Any, Any]) -> Any:
    state = server_state(request)
    state.adapter(surface="images")  # 404 before reading the body
    req = parse_image(parse_json_object(await read_body(request)))
    adapter = state.adapter(req.model, "images")
    with state.uploads() as media:
        args = await anyio.to_thread.run_sync(adapter.image_to_request, req, media)
        return await _run_n(state, request, req, args)


@post("/v1/images/edits", status_code=200)
async def edits(request: Request[Any, Any, Any]) -> Any:
    state = server_state(request)
    state.adapter(surface="image_edits")  # 404 before reading the body
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "multipart/form-data":
        raise InvalidRequestError("image edits are sent as multipart/form-data with 'image' file(s) and a 'prompt'")
    try:
        form = await request.form()
    except (HTTPException, MStarError):
        raise
    except Exception as exc:
        raise InvalidRequestError(f"the multipart form could not be parsed: {exc}") from None
    fields: dict[str, str] = {}
    with state.uploads() as media:
        images: list[Path] = []
        try:
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    data = await value.read()
                    await value.close()
                    if key == "mask":
                        raise InvalidParameterError("'mask' is not supported; describe the edit in the prompt", param="mask")
                    if key not in ("image", "image[]"):
                        raise InvalidParameterError(f"unexpected file field {key!r}; images go in 'image'", param=key)
                    _, path = media.save(data, Path(value.filename or "").suffix, expected="image")
                    images.append(path)
                elif key in fields:
                    raise InvalidRequestError(f"form field {key!r} was given more than once", param=key)
                else:
                    fields[key] = value
        finally:
            for _, value in form.multi_items():
                if isinstance(value, UploadFile):
                    await value.close()
        req = parse_edit_form(fields, images)
        adapter = state.adapter(req.model, "image_edits")
        args = await anyio.to_thread.run_sync(adapter.edit_to_request, req, media)
        return await _run_n(state, request, req, args)


ROUTES = [generations, edits]
