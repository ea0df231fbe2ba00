"""BAGEL: text chat (text out), text-to-image and image editing.

Chat honours ``temperature``, ``top_p``, ``max_tokens`` and ``seed``; the
``cfg_*`` guidance knobs (and ``num_timesteps``, ``think_mode`` ...) pass
through ``extra_body``. ``size`` maps onto ``width``/``height``.
"""

from __future__ import annotations

from typing import ClassVar

from mstar.errors import InvalidParameterError
from mstar.server.adapters.base import OpenAIAdapter, SubmitArgs
from mstar.server.media_io import UploadScope
from mstar.server.openai_schema import ChatRequest, ImageEditRequest, ImageRequest

__all__ = ["BagelAdapter"]


class BagelAdapter(OpenAIAdapter):
    sampling_keys: ClassVar[dict[str, str]] = {
        "temperature": "temperature",
        "top_p": "top_p",
        "max_tokens": "max_output_tokens",
        "seed": "seed",
    }

    def chat_to_request(self, req: ChatRequest, media: UploadScope) -> SubmitArgs:
        if "audio" in req.modalities:
            raise InvalidParameterError("bagel chat answers with text only", param="modalities")
        return self.chat_args(req, media)

    def image_to_request(self, req: ImageRequest, media: UploadScope) -> SubmitArgs:
        kwargs = self.build_kwargs(req)
        self._apply_size(req, kwargs)
        return SubmitArgs(text=req.prompt, output_modalities=("image",), model_kwargs=kwargs)

    def edit_to_request(self, req: ImageEditRequest, media: UploadScope) -> SubmitArgs:
        kwargs = self.build_kwargs(req)
        self._apply_size(req, kwargs)
        return SubmitArgs(text=req.prompt, images=list(req.images), output_modalities=("image",), model_kwargs=kwargs)

    def _apply_size(self, req: ImageRequest, kwargs: dict[str, object]) -> None:
        if req.size is None:
            return
        if not {"width", "height"} <= self.accepted_kwargs():
            raise InvalidParameterError(f"model {self.model!r} does not take a size", param="size")
        both = sorted({"width", "height"} & set(kwargs))
        if both:  # two answers to one question: neither may silently win
            raise InvalidParameterError(f"give either 'size' or {' and '.join(map(repr, both))}, not both", param="size")
        kwargs["width"], kwargs["height"] = req.size
