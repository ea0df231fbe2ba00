"""Test-double model families for the server tests, and the OpenAI adapters that give them a /v1 surface.

* ``fake``       -- tests/fake_model.py's echoing runner, with :class:`FakeAdapter` (chat and speech);
* ``fakeimg``    -- :class:`FakeImageRunner`: flat PNGs (image generation and edits);
* ``fake_noapi`` -- the ``fake`` runner without an adapter: a model with no OpenAI shape;
* ``fake_media`` -- :class:`MediaFakeRunner`: decodes every media input as real runners do, answers "ok".

Importing this module registers them (so ``bench/soak.py --import tests.helpers.fakes`` works in a
server subprocess); in tests, request the ``fake_models`` fixture of tests/conftest.py instead.
"""

from __future__ import annotations

from typing import Any, ClassVar

import tests.fake_model  # noqa: F401  (registers the "fake" family)
from mstar.media import decode_audio, decode_image, decode_video
from mstar.models.base import ModelRunner
from mstar.models.params import Param
from mstar.registry import ModelInfo, register_model
from mstar.request import Request, RequestInputs
from mstar.server.adapters import register_adapter
from mstar.server.adapters.base import OpenAIAdapter, SubmitArgs
from mstar.server.media_io import UploadScope
from mstar.server.openai_schema import ChatRequest, ImageEditRequest, ImageRequest, SpeechRequest
from mstar.types import ImageChunk, Progress, TextChunk
from tests.fake_model import FAKE, FakeRunner
from tests.helpers.media import png_bytes

__all__ = ["FAKE_MODELS", "FakeAdapter", "FakeImageAdapter", "FakeImageRunner", "MediaFakeRunner", "register_fakes"]

#: The families :func:`register_fakes` registers.
FAKE_MODELS = ("fake", "fakeimg", "fake_noapi", "fake_media")


class FakeAdapter(OpenAIAdapter):
    """The fake model speaks OpenAI: chat (one flattened prompt, text and audio out) and speech."""

    sampling_keys: ClassVar[dict[str, str]] = {"max_tokens": "max_output_tokens", "seed": "seed"}
    voices: ClassVar[tuple[str, ...]] = ("alpha", "beta")
    default_voice: ClassVar[str | None] = "alpha"

    def chat_to_request(self, req: ChatRequest, media: UploadScope) -> SubmitArgs:
        voice, req.audio_voice = req.audio_voice, None
        self.check_voice(voice)  # the fake has one sound: check the name, do not pass it
        return self.chat_args(req, media, flatten=True)

    def speech_to_request(self, req: SpeechRequest, media: UploadScope) -> SubmitArgs:
        self.check_voice(req.voice)
        req.voice = None
        return self.speech_args(req)


# --------------------------------------------------------------------------- image and no-surface fakes


class FakeImageRunner(ModelRunner):
    """Paints a flat PNG of the requested size; its colour comes from the seed (edits: the input's colour)."""

    name = "fakeimg"
    params: ClassVar[dict[str, Param]] = {"width": Param(int, 16, min=8, max=64), "height": Param(int, 16, min=8, max=64),
                                           "steps": Param(int, 2, min=1, max=10)}

    def validate(self, inputs: Any, output_modalities: tuple[str, ...], kwargs: Any) -> dict[str, Any]:
        params = super().validate(inputs, output_modalities, kwargs)
        params["_colors"] = [tuple(int(c) for c in decode_image(item)[0, 0]) for item in inputs.images]
        return params

    def step(self, reqs: list[Request]) -> None:
        import torch

        for r in reqs:
            st = r.state or {"i": 0}
            r.state = st
            st["i"] += 1
            r.emit(Progress(st["i"], r.params["steps"], "denoise"))
            if st["i"] >= r.params["steps"]:
                colors = r.params["_colors"]
                color = colors[0] if colors else tuple(int(x) for x in torch.randint(0, 256, (3,), generator=r.generator))
                r.emit(ImageChunk(png_bytes(r.params["width"], r.params["height"], color)))
                r.finish("stop")


class FakeImageAdapter(OpenAIAdapter):
    sampling_keys: ClassVar[dict[str, str]] = {"seed": "seed"}

    def image_to_request(self, req: ImageRequest, media: UploadScope) -> SubmitArgs:
        kwargs = self.build_kwargs(req)
        if req.size:
            kwargs["width"], kwargs["height"] = req.size
        return SubmitArgs(text=req.prompt, output_modalities=("image",), model_kwargs=kwargs)

    def edit_to_request(self, req: ImageEditRequest, media: UploadScope) -> SubmitArgs:
        args = self.image_to_request(req, media)
        args.images = list(req.images)
        return args


# --------------------------------------------------------------------------- a fake that decodes its media


class MediaFakeRunner(FakeRunner):
    """The fake model, but it decodes every media input in ``validate`` with the shared decoders, as real runners do."""

    name = "fake_media"
    params: ClassVar[dict[str, Param]] = dict(FakeRunner.params)

    def validate(self, inputs: RequestInputs, output_modalities: tuple[str, ...], kwargs: Any) -> dict[str, Any]:
        params = super().validate(inputs, output_modalities, kwargs)
        for item in inputs.images:
            decode_image(item)
        for item in inputs.audio:
            decode_audio(item, sample_rate=16000)
        for item in inputs.video:
            decode_video(item, max_frames=16)
        return params

    def step(self, reqs: list[Request]) -> None:
        for r in reqs:
            r.emit(TextChunk("ok"))
            r.output_tokens += 1
            r.finish("stop")


def register_fakes() -> tuple[str, ...]:
    """(Re-)register every fake family and its adapter; returns their names. Idempotent."""
    register_model(FAKE)
    register_adapter("fake", FakeAdapter)
    register_model(ModelInfo("fakeimg", "test double: flat images", "none/fakeimg", ("text", "image"), ("image",),
                             "tests.helpers.fakes:FakeImageRunner"))
    register_adapter("fakeimg", FakeImageAdapter)
    # Same runner as "fake", but no adapter: a model whose outputs have no OpenAI shape.
    register_model(ModelInfo("fake_noapi", "test double without an OpenAI surface", "none/fake_noapi", ("text",), ("text",),
                             "tests.fake_model:FakeRunner"))
    register_model(ModelInfo("fake_media", "test double: decodes its media, answers ok", "none/fake_media",
                             ("text", "image", "audio", "video"), ("text", "audio"), "tests.helpers.fakes:MediaFakeRunner"))
    register_adapter("fake_media", FakeAdapter)
    return FAKE_MODELS


register_fakes()
