"""Helpers for the server tests (no tests here): a real uvicorn on a free port, the fake model's adapter."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import tests.fake_model  # noqa: F401  (registers the "fake" family)
from mstar.models.base import ModelRunner
from mstar.models.params import Param
from mstar.registry import ModelInfo, register_model
from mstar.request import Request
from mstar.server.adapters import register_adapter
from mstar.server.adapters.base import OpenAIAdapter, SubmitArgs
from mstar.server.media_io import UploadScope
from mstar.server.openai_schema import ChatRequest, ImageEditRequest, ImageRequest, SpeechRequest
from mstar.types import ImageChunk, Progress

ORPHEUS_RUNNER = Path(__file__).resolve().parent.parent / "mstar" / "models" / "orpheus" / "runner.py"


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


register_adapter("fake", FakeAdapter)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerThread:
    """uvicorn serving ``app`` on 127.0.0.1 in a daemon thread of the test process."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


def orpheus_available() -> bool:
    """True once the tiny Orpheus runner exists and loads."""
    if not ORPHEUS_RUNNER.exists():
        return False
    try:
        import mstar

        mstar.Engine("orpheus", weights="tiny").close()
        return True
    except Exception:
        return False


# --------------------------------------------------------------------------- image and no-surface fakes



def png_bytes(width: int = 8, height: int = 8, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


class FakeImageRunner(ModelRunner):
    """Paints a flat PNG of the requested size; its colour comes from the seed (edits: the input's colour)."""

    name = "fakeimg"
    params: ClassVar[dict[str, Param]] = {"width": Param(int, 16, min=8, max=64), "height": Param(int, 16, min=8, max=64),
                                           "steps": Param(int, 2, min=1, max=10)}

    def validate(self, inputs: Any, output_modalities: tuple[str, ...], kwargs: Any) -> dict[str, Any]:
        from mstar.media import decode_image

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


register_model(ModelInfo("fakeimg", "test double: flat images", "none/fakeimg", ("text", "image"), ("image",),
                         "tests.test_server_support:FakeImageRunner"))
register_adapter("fakeimg", FakeImageAdapter)
# Same runner as "fake", but no adapter: a model whose outputs have no OpenAI shape.
register_model(ModelInfo("fake_noapi", "test double without an OpenAI surface", "none/fake_noapi", ("text",), ("text",),
                         "tests.fake_model:FakeRunner"))


class Served:
    """One tiny model behind one real server, with an ``openai`` client (``client``) and an
    :class:`~mstar.MStarClient` (``sdk``) pointed at it."""

    def __init__(self, model: str, upload_dir: Path) -> None:
        import openai

        import mstar
        from mstar.server import create_app

        self.model = model
        self.engine = mstar.Engine(model, weights="tiny", device="cpu")
        self.upload_dir = upload_dir
        self.server = ServerThread(create_app(self.engine, upload_dir=upload_dir)).__enter__()
        self.url = self.server.url
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=120)
        self.sdk = mstar.MStarClient(self.url, timeout=120)

    def close(self) -> None:
        self.server.__exit__(None, None, None)
        self.engine.close()


@contextlib.contextmanager
def serving(upload_dir: Path) -> Iterator[Callable[[str], Served]]:
    """``get(model)`` starts a server for ``model`` on first use; all are stopped on exit."""
    cache: dict[str, Served] = {}

    def get(model: str) -> Served:
        if model not in cache:
            cache[model] = Served(model, upload_dir)
        return cache[model]

    try:
        yield get
    finally:
        for served in cache.values():
            served.close()
