"""``POST /v1/images/generations`` and ``POST /v1/images/edits`` (multipart), answering b64_json."""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any

from litestar import Request, post

from mstar.errors import InvalidParameterError, InvalidRequestError, ModelError, RequestTimeoutError
from mstar.server.adapters import SubmitArgs
from mstar.server.call import RouteCall, open_call
from mstar.server.openai_schema import ImageRequest, parse_edit_form, parse_image

__all__ = ["ROUTES"]


async def _run_n(call: RouteCall, req: ImageRequest, args: SubmitArgs) -> Any:
    """Run the request ``n`` times (seed, seed+1, ... when a seed is given) and shape the answer."""
    images: list[dict[str, Any]] = []
    seeds: list[int | None] = []
    base_seed = args.model_kwargs.get("seed")
    for i in range(req.n):
        kwargs = dict(args.model_kwargs)
        if base_seed is not None:
            kwargs["seed"] = int(base_seed) + i
        one = SubmitArgs(text=args.text, messages=args.messages, images=args.images, output_modalities=args.output_modalities, model_kwargs=kwargs)
        result = await call.result(await call.start(one))
        if result.finish_reason == "timeout":
            raise RequestTimeoutError("image generation ran past its deadline")
        if not result.images:
            raise ModelError(f"the model produced no image (finish_reason={result.finish_reason})")
        images.extend({"b64_json": base64.b64encode(png).decode("ascii"), "revised_prompt": None} for png in result.images)
        seeds.append(result.seed)
    return {"created": int(time.time()), "data": images, "seeds": seeds}


@post("/v1/images/generations", status_code=200)
async def generations(request: Request[Any, Any, Any]) -> Any:
    async with open_call(request, "images") as call:
        req = parse_image(await call.json())
        args = await call.translate(call.adapter(req.model).image_to_request, req)
        return await _run_n(call, req, args)


@post("/v1/images/edits", status_code=200)
async def edits(request: Request[Any, Any, Any]) -> Any:
    async with open_call(request, "image_edits") as call:
        if call.content_type != "multipart/form-data":
            raise InvalidRequestError("image edits are sent as multipart/form-data with 'image' file(s) and a 'prompt'")
        form = await call.form()
        images: list[Path] = []
        for upload in form.files:
            if upload.field == "mask":
                raise InvalidParameterError("'mask' is not supported; describe the edit in the prompt", param="mask")
            if upload.field not in ("image", "image[]"):
                raise InvalidParameterError(f"unexpected file field {upload.field!r}; images go in 'image'", param=upload.field)
            _, path = call.uploads.save(upload.data, Path(upload.filename).suffix, expected="image", name=upload.filename)
            images.append(path)
        req = parse_edit_form(form.fields, images)
        args = await call.translate(call.adapter(req.model).edit_to_request, req)
        return await _run_n(call, req, args)


ROUTES = [generations, edits]
