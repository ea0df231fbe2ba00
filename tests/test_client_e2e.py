"""MStarClient against a real mstar server on 127.0.0.1 (uvicorn in a background thread).

The same seeded request through the client and through the in-process Engine
must give the same result: the wire loses nothing. Uses the fake model family
(tests/fake_model.py), a test family that fails mid-stream, and the tiny
Orpheus when it is available.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest

import tests.fake_model  # noqa: F401  (registers the "fake" family)
from mstar import Engine, errors
from mstar.client import MStarClient
from mstar.models.base import ModelRunner
from mstar.models.params import Param
from mstar.registry import ModelInfo, register_model
from mstar.request import Request
from mstar.server.app import create_app
from mstar.types import AudioChunk, Event, Finished, GenerateResult, TextChunk
from tests.helpers.servers import ServerThread

pytestmark = pytest.mark.usefixtures("fake_models")  # the fake families of tests/helpers/fakes.py

# ----------------------------------------------------------------------------- a family that fails mid-stream


class FailingRunner(ModelRunner):
    """Emits ``fail_after`` text chunks, then (after stalling ``stall_s``) its step raises."""

    name = "client_failing"
    params: ClassVar[dict[str, Param]] = {
        "fail_after": Param(int, 2, min=0, max=100),
        "stall_s": Param(float, 0.0, min=0.0, max=5.0),
    }

    def admit(self, req: Request) -> bool:
        req.state = 0
        return True

    def step(self, reqs: list[Request]) -> None:
        for r in reqs:
            if r.state >= r.params["fail_after"]:
                time.sleep(r.params["stall_s"])
                raise RuntimeError("the decoder exploded")
            r.emit(TextChunk("ab"[r.state % 2]))
            r.state += 1


register_model(
    ModelInfo(
        name="client_failing",
        description="test double: fails mid-stream",
        hub_id="none/client_failing",
        input_modalities=("text",),
        output_modalities=("text",),
        runner="tests.test_client_e2e:FailingRunner",
    )
)

# ----------------------------------------------------------------------------- a server in a thread


class LiveServer(ServerThread):
    """uvicorn serving ``create_app(engine)`` on a free port of 127.0.0.1."""

    def __init__(self, engine: Engine, **settings: Any) -> None:
        self.engine = engine
        self.app = create_app(engine, **settings)
        super().__init__(self.app)


@pytest.fixture(scope="module")
def fake_engine() -> Iterator[Engine]:
    with Engine("fake", device="cpu") as engine:
        yield engine


@pytest.fixture(scope="module")
def fake_server(fake_engine: Engine) -> Iterator[LiveServer]:
    with LiveServer(fake_engine) as server:
        yield server


@pytest.fixture()
def client(fake_server: LiveServer) -> Iterator[MStarClient]:
    with MStarClient(fake_server.url, timeout=(2.0, 20.0), retries=0) as c:
        yield c


def _wait_idle(engine: Engine, timeout: float = 5.0) -> bool:
    runner: Any = engine.runner
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not runner.held:
            return True
        time.sleep(0.02)
    return False


def _without_request_id(events: list[Event]) -> list[Any]:
    return [Finished(e.finish_reason, e.usage, e.seed) if isinstance(e, Finished) else e for e in events]


# ----------------------------------------------------------------------------- same results as the Engine


def test_health_ready_and_models(client: MStarClient) -> None:
    assert client.health() is True
    assert client.ready() is True
    assert "fake" in [m["id"] for m in client.list_models()]


def test_generate_equals_the_engine_for_the_same_seed(client: MStarClient, fake_engine: Engine) -> None:
    remote = client.generate(text="hello wire", output_modalities=("text", "audio"), seed=1234)
    local = fake_engine.generate(text="hello wire", output_modalities=("text", "audio"), seed=1234)
    assert isinstance(remote, GenerateResult) and isinstance(local, GenerateResult)
    assert remote.text == local.text == "hello wire"
    assert remote.audio is not None and local.audio is not None
    assert remote.audio.pcm == local.audio.pcm and remote.audio.sample_rate == local.audio.sample_rate
    assert (remote.finish_reason, remote.seed, remote.usage) == (local.finish_reason, local.seed, local.usage)


def test_chat_with_messages_keeps_their_roles_over_the_wire(client: MStarClient, fake_engine: Engine) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "echo me"}]
    remote = client.chat(messages, seed=5)
    local = fake_engine.chat(messages, seed=5)
    assert isinstance(remote, GenerateResult) and isinstance(local, GenerateResult)
    assert remote.text == local.text == "echo me"


def test_stream_equals_the_engine_stream_for_the_same_seed(client: MStarClient, fake_engine: Engine) -> None:
    kwargs: dict[str, Any] = {"text": "héllo 😀", "output_modalities": ("text", "audio"), "seed": 99}
    remote = list(client.stream(**kwargs))
    local = list(fake_engine.stream(**kwargs))
    assert _without_request_id(remote) == _without_request_id(local)
    assert any(isinstance(e, AudioChunk) for e in remote)
    assert "".join(e.text for e in remote if isinstance(e, TextChunk)) == "héllo 😀"


def test_stream_request_id_reaches_the_server(client: MStarClient) -> None:
    stream = client.stream(text="ab", request_id="client-rid-1")
    assert stream.request_id == "client-rid-1"
    done = list(stream)[-1]
    assert isinstance(done, Finished) and done.finish_reason == "stop"
    assert done.request_id == "client-rid-1"


def test_unknown_parameter_raises_typed_error_with_server_message(client: MStarClient) -> None:
    with pytest.raises(errors.InvalidRequestError, match="unknown parameter") as info:
        client.generate(text="hi", bogus_knob=3)
    assert info.value.status_code == 400 and info.value.code == "unknown_parameter"


def test_unsupported_output_raises_before_the_stream(client: MStarClient) -> None:
    with pytest.raises(errors.InvalidRequestError, match="cannot produce"):
        client.stream(text="hi", output_modalities=("image",))


def test_leaving_a_stream_early_cancels_on_the_server(client: MStarClient, fake_engine: Engine) -> None:
    stream = client.stream(text="abcdef", max_output_tokens=10000, step_delay=0.02)
    first = next(stream)
    assert isinstance(first, TextChunk)
    stream.close()
    assert _wait_idle(fake_engine), "the server kept generating after the client left"


def test_cancel_by_request_id_ends_the_stream(client: MStarClient) -> None:
    stream = client.stream(text="abc", max_output_tokens=10000, step_delay=0.02, request_id="to-cancel")
    assert isinstance(next(stream), TextChunk)
    assert client.cancel("to-cancel") is True
    events = list(stream)
    assert isinstance(events[-1], Finished) and events[-1].finish_reason == "cancelled"


def test_read_timeout_against_a_slow_server(fake_server: LiveServer, fake_engine: Engine) -> None:
    slow = MStarClient(fake_server.url, timeout=(2.0, 0.2), retries=0)
    with pytest.raises(errors.ReadTimeoutError):
        slow.generate(text="a", max_output_tokens=3, step_delay=0.6)
    assert _wait_idle(fake_engine)


def test_stream_is_incremental_over_http(client: MStarClient) -> None:
    t0 = time.monotonic()
    stream = client.stream(text="abcdefghij", max_output_tokens=10, step_delay=0.05)
    next(stream)
    first = time.monotonic() - t0
    rest = list(stream)
    total = time.monotonic() - t0
    assert isinstance(rest[-1], Finished)
    assert first < total / 2, f"first event after {first:.2f}s of {total:.2f}s: the body was buffered"


# ----------------------------------------------------------------------------- a busy server, auth


def test_busy_server_429_is_retried_after_its_retry_after(fake_engine: Engine) -> None:
    with LiveServer(fake_engine, max_concurrent=1, max_queue=0, retry_after_s=2.0) as busy:
        blocker = MStarClient(busy.url).stream(text="zzz", max_output_tokens=10000, step_delay=0.02)
        assert isinstance(next(blocker), TextChunk)
        # Retries spent: the typed error carries the server's hint.
        sleeps: list[float] = []
        impatient = MStarClient(busy.url, retries=1, sleep=sleeps.append)
        with pytest.raises(errors.RateLimitError, match="busy") as info:
            impatient.generate(text="ok")
        assert info.value.retry_after == 2.0 and sleeps == [2.0]

        # A retry that finds the slot free succeeds; the "sleep" frees it instead of waiting 2 s.
        admission = busy.app.state["mstar"].admission

        def free_the_slot(seconds: float) -> None:
            sleeps.append(seconds)
            blocker.close()
            deadline = time.monotonic() + 5
            while admission.running and time.monotonic() < deadline:
                time.sleep(0.01)

        patient = MStarClient(busy.url, retries=2, sleep=free_the_slot)
        res = patient.generate(text="ok", seed=3)
        assert isinstance(res, GenerateResult) and res.text == "ok"
        assert sleeps == [2.0, 2.0]


def test_api_key_is_sent_as_bearer_token(fake_engine: Engine) -> None:
    with LiveServer(fake_engine, api_key="s3cret") as locked:
        with pytest.raises(errors.AuthenticationError):
            MStarClient(locked.url, retries=0).generate(text="hi")
        res = MStarClient(locked.url, api_key="s3cret").generate(text="hi")
        assert isinstance(res, GenerateResult) and res.text == "hi"


# ----------------------------------------------------------------------------- an in-band error


@pytest.fixture(scope="module")
def failing_server() -> Iterator[LiveServer]:
    with Engine("client_failing", device="cpu") as engine, LiveServer(engine) as server:
        yield server


def test_in_band_error_raises_model_error_with_the_server_message(failing_server: LiveServer) -> None:
    client = MStarClient(failing_server.url, retries=0)
    stream = client.stream(text="go", fail_after=2)
    assert [next(stream), next(stream)] == [TextChunk("a"), TextChunk("b")]
    with pytest.raises(errors.ModelError, match="the decoder exploded") as info:
        next(stream)
    assert info.value.status_code == 500
    assert stream.closed


def test_read_timeout_mid_stream_raises_read_timeout_error(failing_server: LiveServer) -> None:
    client = MStarClient(failing_server.url, timeout=(2.0, 0.3), retries=0)
    stream = client.stream(text="go", fail_after=1, stall_s=0.8)
    assert next(stream) == TextChunk("a")
    with pytest.raises(errors.ReadTimeoutError):
        next(stream)
    assert stream.closed


def test_failure_before_any_output_raises_model_error(failing_server: LiveServer) -> None:
    client = MStarClient(failing_server.url, retries=0)
    with pytest.raises(errors.ModelError, match="the decoder exploded"):
        client.generate(text="go", fail_after=0)


# ----------------------------------------------------------------------------- tiny Orpheus


@pytest.fixture(scope="module")
def orpheus_server() -> Iterator[LiveServer]:
    # The tiny Orpheus is in the tree and builds its weights in-process: nothing to skip for.
    engine = Engine("orpheus", weights="tiny", device="cpu")
    with engine, LiveServer(engine) as server:
        yield server


@pytest.mark.slow
def test_tts_equals_the_engine_for_the_same_seed(orpheus_server: LiveServer) -> None:
    client = MStarClient(orpheus_server.url, retries=0)
    kwargs: dict[str, Any] = {"voice": "tara", "seed": 7, "max_output_tokens": 49}
    local = orpheus_server.engine.tts("hi there", **kwargs)
    remote = client.tts("hi there", **kwargs)
    assert remote.sample_rate == local.sample_rate == 24000
    assert remote.pcm == local.pcm and len(remote) > 0


def test_unknown_voice_raises_typed_error(orpheus_server: LiveServer) -> None:
    client = MStarClient(orpheus_server.url, retries=0)
    with pytest.raises(errors.InvalidRequestError, match="bob") as info:
        client.tts("hi", voice="bob")
    assert info.value.code == "unknown_voice"
