"""MStarClient against a fake transport: a requests adapter mounted on the session.

Every error path of the client is exercised here without a server: refused
connections, timeouts, error bodies, malformed streams, in-band errors,
retries, early close, split UTF-8 and the typed decoding of every modality.
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import json
import socket
import subprocess
import sys
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import pytest
import requests
import urllib3.exceptions
from requests.adapters import BaseAdapter
from requests.structures import CaseInsensitiveDict

from mstar import errors
from mstar.client import ClientEventStream, MStarClient
from mstar.types import (
    AudioBuffer,
    AudioChunk,
    ErrorChunk,
    Finished,
    GenerateResult,
    Progress,
    TensorChunk,
    TextChunk,
    Usage,
    event_to_ndjson,
)

BASE = "http://mstar.test"

# ----------------------------------------------------------------------------- fakes


class FakeRaw:
    """A response body that hands out its chunks one at a time, as a socket would.

    A chunk may be an exception (raised when reached). ``pulled`` counts the
    chunks read so far; ``closed`` records that the client closed the body.
    """

    def __init__(self, chunks: Iterable[bytes | BaseException]) -> None:
        self._chunks = list(chunks)
        self.pulled = 0
        self.closed = False

    def stream(self, amt: int | None = None, decode_content: bool | None = None) -> Iterable[bytes]:
        while self._chunks and not self.closed:
            chunk = self._chunks.pop(0)
            self.pulled += 1
            if isinstance(chunk, BaseException):
                raise chunk
            yield chunk

    def close(self) -> None:
        self.closed = True


Reply = Callable[[requests.PreparedRequest], requests.Response] | BaseException


class FakeAdapter(BaseAdapter):
    """Answers each request with the next scripted reply (a response maker or an exception)."""

    def __init__(self, replies: list[Reply]) -> None:
        super().__init__()
        self.replies = list(replies)
        self.sent: list[requests.PreparedRequest] = []
        self.send_kwargs: list[dict[str, Any]] = []
        self.responses: list[requests.Response] = []

    def send(
        self, request: requests.PreparedRequest, stream: bool = False, timeout: Any = None, **kw: Any
    ) -> requests.Response:  # type: ignore[override]
        self.sent.append(request)
        self.send_kwargs.append({"stream": stream, "timeout": timeout})
        if not self.replies:
            raise AssertionError(f"unexpected request {request.method} {request.url}")
        reply = self.replies.pop(0)
        if isinstance(reply, BaseException):
            raise reply
        resp = reply(request)
        self.responses.append(resp)
        return resp

    def close(self) -> None:
        pass


def answer(
    status: int = 200, body: bytes | list[bytes | BaseException] = b"", headers: dict[str, str] | None = None
) -> Callable[[requests.PreparedRequest], requests.Response]:
    def make(request: requests.PreparedRequest) -> requests.Response:
        resp = requests.Response()
        resp.status_code = status
        resp.reason = {200: "OK", 429: "Too Many Requests", 502: "Bad Gateway", 503: "Service Unavailable"}.get(
            status, ""
        )
        resp.headers = CaseInsensitiveDict(headers or {})
        resp.raw = FakeRaw([body] if isinstance(body, bytes) else body)
        resp.url = request.url or ""
        resp.request = request
        return resp

    return make


def json_answer(status: int, doc: Any, headers: dict[str, str] | None = None) -> Callable[..., requests.Response]:
    return answer(status, json.dumps(doc).encode(), {"Content-Type": "application/json", **(headers or {})})


def ndjson(*events: Any) -> bytes:
    return b"".join(e if isinstance(e, bytes) else event_to_ndjson(e) for e in events)


def text_line(raw: bytes) -> bytes:
    """A text wire line whose data is raw token bytes (possibly partial UTF-8)."""
    return json.dumps({"modality": "text", "data": base64.b64encode(raw).decode(), "metadata": {}}).encode() + b"\n"


DONE = Finished("stop", Usage(input_tokens=3, output_tokens=2, steps=2), seed=7)


def make_client(replies: list[Reply], **kw: Any) -> tuple[MStarClient, FakeAdapter, list[float]]:
    adapter = FakeAdapter(replies)
    session = requests.Session()
    session.mount("http://", adapter)
    sleeps: list[float] = []
    kw.setdefault("sleep", sleeps.append)
    return MStarClient(BASE, session=session, **kw), adapter, sleeps


def form_parts(request: requests.PreparedRequest) -> dict[str, list[tuple[str | None, bytes]]]:
    """Parse a multipart request body into {field: [(filename, payload)]}."""
    body = request.body if isinstance(request.body, bytes) else str(request.body).encode()
    ctype = request.headers["Content-Type"]
    assert ctype.startswith("multipart/form-data"), ctype
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + body
    )
    parts: dict[str, list[tuple[str | None, bytes]]] = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        filename = part.get_param("filename", header="content-disposition")
        parts.setdefault(str(name), []).append((filename, part.get_payload(decode=True)))
    return parts


def field(parts: dict[str, list[tuple[str | None, bytes]]], name: str) -> str:
    return parts[name][0][1].decode()


# ----------------------------------------------------------------------------- import


def test_client_import_pulls_in_neither_torch_nor_transformers() -> None:
    code = (
        "import mstar; from mstar import MStarClient; import mstar.client, sys; "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, "
        "[m for m in ('torch', 'transformers') if m in sys.modules]"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_client_returns_the_engine_types() -> None:
    import mstar.client as mc
    import mstar.types as mt

    assert mc.GenerateResult is mt.GenerateResult and mc.AudioBuffer is mt.AudioBuffer and mc.TextChunk is mt.TextChunk


# ----------------------------------------------------------------------------- transport errors


def test_refused_connection_raises_connect_error() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    client = MStarClient(f"http://127.0.0.1:{port}", timeout=2.0)
    with pytest.raises(errors.ConnectError, match="could not connect"):
        client.generate(text="hi")


def test_refused_connection_makes_health_false() -> None:
    client, _, _ = make_client([requests.exceptions.ConnectionError("refused")])
    assert client.health() is False


def test_read_timeout_raises_read_timeout_error() -> None:
    client, _, _ = make_client([requests.exceptions.ReadTimeout("slow")])
    with pytest.raises(errors.ReadTimeoutError):
        client.generate(text="hi")


def test_connect_timeout_raises_connect_error() -> None:
    client, _, _ = make_client([requests.exceptions.ConnectTimeout("no route")])
    with pytest.raises(errors.ConnectError, match="timed out connecting"):
        client.generate(text="hi")


def test_read_timeout_mid_stream_raises_read_timeout_error() -> None:
    stall = urllib3.exceptions.ReadTimeoutError(None, "/generate", "Read timed out.")  # type: ignore[arg-type]
    client, adapter, _ = make_client([answer(200, [ndjson(TextChunk("a")), stall])])
    events = client.stream(text="hi")
    assert next(events) == TextChunk("a")
    with pytest.raises(errors.ReadTimeoutError):
        next(events)
    assert adapter.responses[0].raw.closed


def test_connection_broken_mid_stream_raises_protocol_error() -> None:
    broken = urllib3.exceptions.ProtocolError("Connection broken: IncompleteRead")
    client, _, _ = make_client([answer(200, [ndjson(TextChunk("a")), broken])])
    events = client.stream(text="hi")
    next(events)
    with pytest.raises(errors.ProtocolError, match="broke mid-response"):
        next(events)


@pytest.mark.parametrize("timeout, expected", [(3.0, 3.0), ((1.5, 7.0), (1.5, 7.0))])
def test_timeout_float_or_pair_reaches_the_transport(timeout: Any, expected: Any) -> None:
    client, adapter, _ = make_client([json_answer(200, {"status": "healthy"})], timeout=timeout)
    assert client.health()
    assert adapter.send_kwargs[0]["timeout"] == expected


@pytest.mark.parametrize("timeout", [0, -1.0, (1.0,), (1.0, 0), "5", True])
def test_bad_timeout_raises_invalid_parameter(timeout: Any) -> None:
    with pytest.raises(errors.InvalidParameterError, match="timeout"):
        MStarClient(BASE, timeout=timeout)


# ----------------------------------------------------------------------------- HTTP error bodies


@pytest.mark.parametrize(
    "status, body, exc_type, message",
    [
        (
            400,
            {
                "error": {
                    "message": "unknown parameter(s) 'foo'",
                    "type": "invalid_request_error",
                    "param": "foo",
                    "code": "unknown_parameter",
                }
            },
            errors.InvalidRequestError,
            "unknown parameter(s) 'foo'",
        ),
        (
            401,
            {"error": {"message": "bad key", "type": "auth", "param": None, "code": "invalid_api_key"}},
            errors.AuthenticationError,
            "bad key",
        ),
        (404, "no such route", errors.NotFoundError, "no such route"),
        (409, {"detail": "request_id 'x' is already in flight"}, errors.ConflictError, "already in flight"),
        (413, {"detail": [{"msg": "too big"}]}, errors.PayloadTooLargeError, "too big"),
        (422, {"message": "unprocessable"}, errors.InvalidRequestError, "unprocessable"),
        (
            500,
            {"error": {"message": "model blew up", "type": "server_error", "param": None, "code": "model_error"}},
            errors.ModelError,
            "model blew up",
        ),
        (502, "", errors.ServiceError, "HTTP 502 Bad Gateway"),
        (
            504,
            {"error": {"message": "deadline passed", "type": "timeout", "param": None, "code": "timeout"}},
            errors.RequestTimeoutError,
            "deadline passed",
        ),
    ],
)
def test_http_error_raises_matching_typed_error_with_server_message(
    status: int, body: Any, exc_type: type[errors.MStarError], message: str
) -> None:
    raw = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    client, adapter, sleeps = make_client([answer(status, raw)])
    with pytest.raises(exc_type) as info:
        client.generate(text="hi")
    assert message in str(info.value)
    assert info.value.status_code == status
    assert len(adapter.sent) == 1 and sleeps == []  # never retried


def test_error_body_code_and_param_are_kept() -> None:
    doc = {
        "error": {
            "message": "unknown voice 'bob'",
            "type": "invalid_request_error",
            "param": "voice",
            "code": "unknown_voice",
        }
    }
    client, _, _ = make_client([json_answer(400, doc)])
    with pytest.raises(errors.InvalidRequestError) as info:
        client.tts("hi", voice="bob")
    assert info.value.code == "unknown_voice" and info.value.param == "voice"


def test_streaming_request_error_before_stream_raises_typed_error() -> None:
    doc = {
        "error": {
            "message": "model 'fake' cannot produce image",
            "type": "invalid_request_error",
            "param": "output_modalities",
            "code": "unsupported_modality",
        }
    }
    client, adapter, _ = make_client([json_answer(400, doc)])
    with pytest.raises(errors.InvalidRequestError, match="cannot produce image"):
        client.stream(text="hi", output_modalities=("image",))
    assert adapter.send_kwargs[0]["stream"] is True


# ----------------------------------------------------------------------------- retries


def test_retry_then_success_backs_off_exponentially() -> None:
    result = GenerateResult("r1", text="ok")
    client, adapter, sleeps = make_client(
        [
            json_answer(503, {"error": {"message": "loading"}}),
            json_answer(429, {"error": {"message": "full"}}),
            json_answer(200, result.to_json()),
        ],
        backoff=0.25,
    )
    res = client.generate(text="hi")
    assert isinstance(res, GenerateResult) and res.text == "ok"
    assert sleeps == [0.25, 0.5]
    assert len(adapter.sent) == 3


def test_retry_exhausted_raises_last_typed_error() -> None:
    full = json_answer(429, {"error": {"message": "queue full", "code": "queue_full"}}, {"Retry-After": "2"})
    client, adapter, sleeps = make_client([full, full, full], retries=2)
    with pytest.raises(errors.RateLimitError, match="queue full") as info:
        client.generate(text="hi")
    assert info.value.retry_after == 2.0
    assert len(adapter.sent) == 3 and sleeps == [2.0, 2.0]


def test_retries_zero_sends_once() -> None:
    client, adapter, sleeps = make_client([json_answer(503, {"error": {"message": "loading"}})], retries=0)
    with pytest.raises(errors.NotReadyError, match="loading"):
        client.generate(text="hi")
    assert len(adapter.sent) == 1 and sleeps == []


@pytest.mark.parametrize(
    "retry_after, expected",
    [("3", 3.0), ("0.5", 0.5), ("100000", 30.0), ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0), ("soon", 0.5)],
)
def test_retry_after_is_honoured_and_capped(retry_after: str, expected: float) -> None:
    ok = json_answer(200, GenerateResult("r", text="x").to_json())
    client, _, sleeps = make_client(
        [json_answer(429, {"error": {"message": "full"}}, {"Retry-After": retry_after}), ok],
        backoff=0.5,
        max_backoff=30.0,
    )
    client.generate(text="hi")
    assert sleeps == [expected]


def test_retry_after_http_date_in_the_future() -> None:
    from mstar.client.transport import parse_retry_after

    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == pytest.approx(10.0)


def test_streaming_request_is_retried_before_the_stream_starts() -> None:
    client, adapter, sleeps = make_client(
        [json_answer(503, {"detail": "loading"}), answer(200, ndjson(TextChunk("a"), DONE))]
    )
    events = list(client.stream(text="hi"))
    assert events == [TextChunk("a"), DONE]
    assert len(sleeps) == 1


# ----------------------------------------------------------------------------- stream decoding


def test_stream_yields_typed_events_and_closes_after_done() -> None:
    audio = AudioChunk(np.arange(8, dtype="<i2").tobytes(), 24000)
    client, adapter, _ = make_client([answer(200, ndjson(TextChunk("hé"), audio, DONE))])
    stream = client.stream(text="hi", output_modalities=("text", "audio"))
    assert isinstance(stream, ClientEventStream)
    assert list(stream) == [TextChunk("hé"), audio, DONE]
    assert adapter.responses[0].raw.closed


def test_tensor_progress_and_done_decode_to_their_types() -> None:
    actions = np.arange(2 * 3, dtype=np.float32).reshape(2, 3) / 7
    latents = np.arange(4, dtype=np.float16).reshape(1, 2, 2)
    body = ndjson(
        Progress(1, 10, "denoise"),
        TensorChunk.from_numpy(actions, "action", {"horizon": 2}),
        TensorChunk.from_numpy(latents, "latent"),
        Finished("length", Usage(5, 6, 7), seed=123, request_id="abc"),
    )
    client, _, _ = make_client([answer(200, body)])
    events = list(client.stream(text="go"))
    assert events[0] == Progress(1, 10, "denoise")
    act = events[1]
    assert isinstance(act, TensorChunk) and act.modality == "action" and act.dtype == "float32" and act.shape == (2, 3)
    assert act.metadata == {"horizon": 2}
    np.testing.assert_array_equal(act.to_numpy(), actions)
    lat = events[2]
    assert (
        isinstance(lat, TensorChunk) and lat.modality == "latent" and lat.dtype == "float16" and lat.shape == (1, 2, 2)
    )
    np.testing.assert_array_equal(lat.to_numpy(), latents)
    done = events[3]
    assert isinstance(done, Finished)
    assert (done.finish_reason, done.seed, done.usage, done.request_id) == ("length", 123, Usage(5, 6, 7), "abc")


def test_split_utf8_across_lines_and_chunks_stays_correct() -> None:
    text = "hé😀!"
    raw = text.encode()  # b'h\xc3\xa9\xf0\x9f\x98\x80!'
    tokens = [raw[:2], raw[2:4], raw[4:6], raw[6:]]  # every multibyte char is split
    body = b"".join(text_line(t) for t in tokens) + ndjson(DONE)
    network = [body[i : i + 5] for i in range(0, len(body), 5)]  # lines also split across reads
    client, _, _ = make_client([answer(200, network)])
    events = list(client.stream(text="x"))
    texts = [e.text for e in events if isinstance(e, TextChunk)]
    assert "".join(texts) == text
    assert all("\ufffd" not in t for t in texts)
    assert texts == ["h", "é", "😀!"]


def test_stream_ending_inside_a_character_shows_replacement() -> None:
    client, _, _ = make_client([answer(200, text_line(b"a\xe2\x82") + ndjson(DONE))])
    events = list(client.stream(text="x"))
    assert [e.text for e in events if isinstance(e, TextChunk)] == ["a", "\ufffd"]
    assert events[-1] == DONE


def test_stream_is_read_incrementally() -> None:
    chunks: list[bytes | BaseException] = [ndjson(TextChunk("a")), ndjson(TextChunk("b")), ndjson(DONE)]
    client, adapter, _ = make_client([answer(200, chunks)])
    stream = client.stream(text="x")
    raw = adapter.responses[0].raw
    assert raw.pulled == 0  # nothing read before asked
    assert next(stream) == TextChunk("a")
    assert raw.pulled == 1  # the first event came before the rest of the body
    assert next(stream) == TextChunk("b") and raw.pulled == 2


def test_leaving_a_stream_early_closes_the_response() -> None:
    chunks: list[bytes | BaseException] = [ndjson(TextChunk(c)) for c in "abcdef"] + [ndjson(DONE)]
    client, adapter, _ = make_client([answer(200, chunks)])
    with client.stream(text="x") as stream:
        for ev in stream:
            assert ev == TextChunk("a")
            break
    raw = adapter.responses[0].raw
    assert raw.closed and raw.pulled == 1
    assert stream.closed and list(stream) == []


def test_stream_close_method_closes_the_response() -> None:
    client, adapter, _ = make_client([answer(200, [ndjson(TextChunk("a")), ndjson(TextChunk("b")), ndjson(DONE)])])
    stream = client.stream(text="x")
    next(stream)
    stream.close()
    assert adapter.responses[0].raw.closed


@pytest.mark.parametrize(
    "line, problem",
    [
        (b"this is not json\n", "not JSON"),
        (b'{"modality": "smell", "data": "", "metadata": {}}\n', "unknown modality 'smell'"),
        (b'["text", "aGk="]\n', "must be a JSON object"),
        (b'{"data": "aGk=", "metadata": {}}\n', "no 'modality'"),
        (b'{"modality": "text", "data": "!!!", "metadata": {}}\n', "invalid base64"),
        (b'{"modality": "image", "data": "!!!", "metadata": {}}\n', "invalid base64"),
        (b'{"modality": "audio", "data": "AAA=", "metadata": {}}\n', "malformed 'audio'"),
        (b'{"modality": "action", "data": "AAAA", "metadata": {"dtype": "float32", "shape": [2]}}\n', "needs 8 bytes"),
        (b'{"modality": "done", "data": "", "metadata": {"finish_reason": "bored"}}\n', "finish_reason"),
    ],
)
def test_malformed_line_raises_protocol_error_naming_the_problem(line: bytes, problem: str) -> None:
    client, adapter, _ = make_client([answer(200, ndjson(TextChunk("ok")) + line + ndjson(DONE))])
    stream = client.stream(text="x")
    assert next(stream) == TextChunk("ok")
    with pytest.raises(errors.ProtocolError, match="line 2") as info:
        next(stream)
    assert problem in str(info.value)
    assert adapter.responses[0].raw.closed


def test_unknown_modality_is_never_decoded_as_text() -> None:
    line = b'{"modality": "video", "data": "aGVsbG8=", "metadata": {}}\n'
    client, _, _ = make_client([answer(200, line + ndjson(DONE))])
    with pytest.raises(errors.ProtocolError, match="unknown modality 'video'"):
        list(client.stream(text="x"))


def test_stream_without_done_line_raises_protocol_error() -> None:
    client, _, _ = make_client([answer(200, ndjson(TextChunk("a")))])
    stream = client.stream(text="x")
    assert next(stream) == TextChunk("a")
    with pytest.raises(errors.ProtocolError, match="without a 'done' line"):
        next(stream)


def test_blank_lines_are_ignored() -> None:
    client, _, _ = make_client([answer(200, b"\n" + ndjson(TextChunk("a")) + b"\r\n\n" + ndjson(DONE))])
    assert list(client.stream(text="x")) == [TextChunk("a"), DONE]


@pytest.mark.parametrize(
    "status, exc_type",
    [
        (500, errors.ModelError),
        (504, errors.RequestTimeoutError),
        (400, errors.InvalidRequestError),
        (503, errors.NotReadyError),
    ],
)
def test_in_band_error_raises_typed_error_with_status_and_message(
    status: int, exc_type: type[errors.MStarError]
) -> None:
    body = ndjson(TextChunk("partial"), ErrorChunk(status, "the model broke at step 3", "model_error"))
    client, adapter, sleeps = make_client([answer(200, body)])
    stream = client.stream(text="x")
    assert next(stream) == TextChunk("partial")
    with pytest.raises(exc_type, match="the model broke at step 3") as info:
        next(stream)
    assert info.value.status_code == status and info.value.code == "model_error"
    assert adapter.responses[0].raw.closed and sleeps == []


def test_in_band_error_as_the_first_line_raises() -> None:
    body = ndjson(ErrorChunk(504, "request ran past its 1.0 s deadline", "timeout"))
    client, _, _ = make_client([answer(200, body)])
    with pytest.raises(errors.RequestTimeoutError, match="deadline"):
        list(client.stream(text="x"))


# ----------------------------------------------------------------------------- non-streaming and requests


def test_non_streaming_generate_parses_the_result_document() -> None:
    audio = AudioBuffer(np.arange(10, dtype="<i2").tobytes(), 24000)
    act = TensorChunk.from_numpy(np.ones((2, 2), np.float32), "action")
    doc = GenerateResult(
        "rid-1", text="hello", audio=audio, tensors=[act], finish_reason="length", seed=9, usage=Usage(1, 2, 3)
    ).to_json()
    client, adapter, _ = make_client([json_answer(200, doc)])
    res = client.generate(text="hi", request_id="rid-1")
    assert isinstance(res, GenerateResult)
    assert (res.request_id, res.text, res.finish_reason, res.seed, res.usage) == (
        "rid-1",
        "hello",
        "length",
        9,
        Usage(1, 2, 3),
    )
    assert res.audio is not None and res.audio.pcm == audio.pcm and res.audio.sample_rate == 24000
    assert res.tensors == [act]
    assert res.raw == doc
    assert adapter.send_kwargs[0]["stream"] is False


def test_non_streaming_answer_that_is_not_json_raises_protocol_error() -> None:
    client, _, _ = make_client([answer(200, b"<html>proxy</html>")])
    with pytest.raises(errors.ProtocolError, match="expected a JSON answer"):
        client.generate(text="hi")


def test_non_streaming_answer_with_bad_outputs_raises_protocol_error() -> None:
    client, _, _ = make_client(
        [json_answer(200, {"request_id": "r", "outputs": {"smell": [{"data": "", "metadata": {}}]}})]
    )
    with pytest.raises(errors.ProtocolError, match="unknown modality 'smell'"):
        client.generate(text="hi")


def test_generate_sends_the_documented_multipart_form(tmp_path: Any) -> None:
    png = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16
    wav_path = tmp_path / "voice.wav"
    wav_path.write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt ")
    client, adapter, _ = make_client([json_answer(200, GenerateResult("r", text="x").to_json())], api_key="sk-test")
    client.generate(
        text="describe",
        images=[png, ("photo.jpg", b"\xff\xd8\xff\xe0")],
        audio=str(wav_path),
        output_modalities=("text", "audio"),
        input_modalities="text,image,audio",
        request_id="my-id",
        voice="tara",
        temperature=0.5,
        top_p=None,
        state=np.array([1.0, 2.0]),
    )
    req = adapter.sent[0]
    assert req.method == "POST" and req.url == BASE + "/generate"
    assert req.headers["Authorization"] == "Bearer sk-test"
    parts = form_parts(req)
    assert field(parts, "text") == "describe"
    assert field(parts, "streaming") == "false"
    assert field(parts, "output_modalities") == "text,audio"
    assert field(parts, "input_modalities") == "text,image,audio"
    assert field(parts, "request_id") == "my-id"
    assert json.loads(field(parts, "model_kwargs")) == {"voice": "tara", "temperature": 0.5, "state": [1.0, 2.0]}
    assert [(name, data[:4]) for name, data in parts["files"]] == [
        ("image.png", png[:4]),
        ("photo.jpg", b"\xff\xd8\xff\xe0"),
        ("voice.wav", b"RIFF"),
    ]


def test_text_only_request_is_still_multipart_and_gets_a_request_id() -> None:
    client, adapter, _ = make_client([answer(200, ndjson(DONE))])
    stream = client.stream(text="hi")
    parts = form_parts(adapter.sent[0])
    assert field(parts, "streaming") == "true"
    assert field(parts, "request_id") == stream.request_id and len(stream.request_id) >= 16
    assert "model_kwargs" not in parts and "files" not in parts


@pytest.mark.parametrize(
    "data, modality, name",
    [
        (b"\x89PNG\r\n\x1a\n", "image", "image.png"),
        (b"GIF89a", "image", "image.gif"),
        (b"RIFF\0\0\0\0WEBPVP8 ", "image", "image.webp"),
        (b"RIFF\0\0\0\0WAVEfmt ", "audio", "audio.wav"),
        (b"fLaC", "audio", "audio.flac"),
        (b"\0\0\0\x20ftypisom", "video", "video.mp4"),
        (b"\0\0\0\x20ftypM4A ", "audio", "audio.m4a"),
        (b"\x1aE\xdf\xa3", "audio", "audio.wav"),  # WebM is a video extension: keep the argument's modality
        (b"unknown", "video", "video.mp4"),
    ],
)
def test_raw_bytes_get_an_extension_of_their_modality(data: bytes, modality: str, name: str) -> None:
    from mstar.client.form import name_upload
    from mstar.media import MediaItem, modality_for_filename

    named = name_upload(MediaItem(f"{modality}.bin", data, modality))
    assert named.name == name and modality_for_filename(named.name) == modality


def test_media_with_the_wrong_extension_raises_media_error() -> None:
    client, adapter, _ = make_client([])
    with pytest.raises(errors.MediaError, match="audio file extension"):
        client.generate(text="x", images=("clip.wav", b"RIFF"))
    assert adapter.sent == []


def test_missing_media_path_raises_media_error() -> None:
    client, _, _ = make_client([])
    with pytest.raises(errors.MediaError, match="not found"):
        client.generate(text="x", audio="/no/such/file.wav")


def test_unserialisable_model_kwarg_raises_invalid_parameter() -> None:
    client, _, _ = make_client([])
    with pytest.raises(errors.InvalidParameterError, match="'voice'"):
        client.generate(text="x", voice=object())


def test_tts_returns_an_audio_buffer() -> None:
    pcm = np.arange(100, dtype="<i2").tobytes()
    doc = GenerateResult("r", audio=AudioBuffer(pcm, 24000)).to_json()
    client, adapter, _ = make_client([json_answer(200, doc)])
    buf = client.tts("hello", voice="zoe")
    assert isinstance(buf, AudioBuffer) and len(buf) == 100 and buf.sample_rate == 24000
    parts = form_parts(adapter.sent[0])
    assert field(parts, "output_modalities") == "audio"
    assert json.loads(field(parts, "model_kwargs")) == {"voice": "zoe"}


def test_generate_image_and_edit_image_return_png_bytes() -> None:
    png = b"\x89PNG\r\n\x1a\n" + b"\x01" * 20
    doc = GenerateResult("r", images=[png]).to_json()
    client, adapter, _ = make_client([json_answer(200, doc), json_answer(200, doc)])
    assert client.generate_image("a cat") == png
    assert client.edit_image(png, "make it blue", cfg_img_scale=2.0) == png
    parts = form_parts(adapter.sent[1])
    assert field(parts, "output_modalities") == "image" and parts["files"][0][0] == "image.png"


def test_chat_with_messages_sends_them_as_json() -> None:
    msgs = [{"role": "user", "content": "hi"}]
    client, adapter, _ = make_client([json_answer(200, GenerateResult("r", text="yo").to_json())])
    res = client.chat(msgs)
    assert isinstance(res, GenerateResult) and res.text == "yo"
    assert json.loads(field(form_parts(adapter.sent[0]), "messages")) == msgs


# ----------------------------------------------------------------------------- control routes


def test_health_ready_models_and_cancel() -> None:
    client, adapter, _ = make_client(
        [
            json_answer(200, {"status": "healthy"}),
            json_answer(503, {"status": "loading"}),
            json_answer(200, {"status": "ready"}),
            json_answer(200, {"object": "list", "data": [{"id": "fake", "object": "model"}]}),
            json_answer(200, {"cancelled": True}),
            json_answer(404, {"error": {"message": "unknown request"}}),
        ]
    )
    assert client.health() is True
    assert client.ready() is False
    assert client.ready() is True
    assert client.list_models() == [{"id": "fake", "object": "model"}]
    assert client.cancel("req/1") is True
    assert client.cancel("gone") is False
    urls = [(r.method, r.url) for r in adapter.sent]
    assert urls == [
        ("GET", BASE + "/health"),
        ("GET", BASE + "/ready"),
        ("GET", BASE + "/ready"),
        ("GET", BASE + "/v1/models"),
        ("POST", BASE + "/cancel/req%2F1"),
        ("POST", BASE + "/cancel/gone"),
    ]


def test_list_models_falls_back_to_the_model_named_by_ready() -> None:
    client, adapter, _ = make_client(
        [json_answer(200, {"object": "list", "data": []}), json_answer(503, {"status": "loading", "model": "pi05"})]
    )
    assert [m["id"] for m in client.list_models()] == ["pi05"]
    assert [r.url for r in adapter.sent] == [BASE + "/v1/models", BASE + "/ready"]


def test_unhealthy_answer_makes_health_false() -> None:
    client, _, _ = make_client([json_answer(500, {"status": "broken"})])
    assert client.health() is False


def test_list_models_with_a_bad_answer_raises_protocol_error() -> None:
    client, _, _ = make_client([json_answer(200, {"models": "fake"})])
    with pytest.raises(errors.ProtocolError, match="/v1/models"):
        client.list_models()


def test_cancel_without_id_raises_invalid_request() -> None:
    client, _, _ = make_client([])
    with pytest.raises(errors.InvalidRequestError, match="request_id"):
        client.cancel("")


def test_bad_base_url_raises_invalid_parameter() -> None:
    with pytest.raises(errors.InvalidParameterError, match="base_url"):
        MStarClient("localhost:8000")


# ----------------------------------------------------------------------------- line splitting


def test_split_lines_joins_lines_across_reads() -> None:
    from mstar.client.stream import split_lines

    assert list(split_lines([b"ab\ncd", b"", b"e\n\nf", b"g"])) == [b"ab", b"cde", b"", b"fg"]


def test_endless_line_raises_protocol_error() -> None:
    from mstar.client.stream import split_lines

    with pytest.raises(errors.ProtocolError, match="exceeds 15 bytes"):
        list(split_lines([b"x" * 10, b"y" * 10], max_line=15))


# ----------------------------------------------------------------------------- one SDK behaviour


@pytest.mark.parametrize(
    "code, cls",
    [
        ("unknown_voice", errors.UnknownVoiceError),
        ("unknown_parameter", errors.UnknownParameterError),
        ("invalid_parameter", errors.InvalidParameterError),
        ("unsupported_modality", errors.UnsupportedModalityError),
        ("empty_input", errors.EmptyInputError),
        ("invalid_media", errors.MediaError),
        ("invalid_shape", errors.ShapeError),
        ("unknown_model", errors.UnknownModelError),
        ("invalid_request", errors.InvalidRequestError),
        ("some_code_of_a_newer_server", errors.InvalidRequestError),
    ],
)
def test_error_code_in_the_body_raises_the_engines_class(code: str, cls: type[errors.MStarError]) -> None:
    doc = {"error": {"message": "no", "type": "invalid_request_error", "param": "voice", "code": code}}
    client, _, _ = make_client([json_answer(400, doc)])
    with pytest.raises(cls) as info:
        client.generate(text="hi")
    assert type(info.value) is cls  # the very class, not only a parent
    assert isinstance(info.value, errors.InvalidRequestError)  # what older code catches still catches it
    assert info.value.code == code and info.value.param == "voice" and info.value.status_code == 400


def test_in_band_error_line_raises_the_class_of_its_code_with_its_param() -> None:
    body = ndjson(TextChunk("x"), ErrorChunk(400, "robot_state has shape (9,)", "invalid_shape", param="robot_state"))
    client, _, _ = make_client([answer(200, body)])
    stream = client.stream(text="x")
    next(stream)
    with pytest.raises(errors.ShapeError, match=r"shape \(9,\)") as info:
        next(stream)
    assert info.value.param == "robot_state"


def test_api_key_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MSTAR_API_KEY", "from-env")
    client, adapter, _ = make_client([json_answer(200, {"status": "ready"})])
    assert client.ready() is True
    assert adapter.sent[0].headers["Authorization"] == "Bearer from-env"


def test_explicit_api_key_wins_over_the_environment_and_empty_sends_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MSTAR_API_KEY", "from-env")
    client, adapter, _ = make_client([json_answer(200, {"status": "ready"})], api_key="given")
    client.ready()
    assert adapter.sent[0].headers["Authorization"] == "Bearer given"
    client, adapter, _ = make_client([json_answer(200, {"status": "ready"})], api_key="")
    client.ready()
    assert "Authorization" not in adapter.sent[0].headers


@pytest.mark.parametrize("method", ["ready", "health", "list_models"])
def test_a_wrong_key_raises_authentication_error_from_every_call(method: str) -> None:
    doc = {"error": {"message": "missing or invalid API key", "type": "authentication_error", "code": "invalid_api_key"}}
    client, _, _ = make_client([json_answer(401, doc, {"WWW-Authenticate": "Bearer"})])
    with pytest.raises(errors.AuthenticationError, match="invalid API key"):
        getattr(client, method)()


@pytest.mark.parametrize("value", [float("nan"), np.array([1.0, np.inf])])
def test_nan_model_kwargs_are_refused_before_sending_naming_the_key(value: Any) -> None:
    client, adapter, _ = make_client([])
    with pytest.raises(errors.InvalidParameterError, match="'state' holds NaN or an infinity") as info:
        client.generate(text="x", state=value)
    assert info.value.param == "state" and adapter.sent == []


def test_openai_data_url_parts_travel_as_uploads_in_their_place() -> None:
    png = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    msgs = [
        {"role": "user", "content": [
            {"type": "image"},
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": "compare"},
            {"type": "image_url", "image_url": {"url": "https://example.com/c.png"}},
        ]}
    ]
    client, adapter, _ = make_client([json_answer(200, GenerateResult("r", text="x").to_json())])
    client.chat(msgs, images=[("first.jpg", b"\xff\xd8\xff\xe0")])
    parts = form_parts(adapter.sent[0])
    sent = json.loads(field(parts, "messages"))
    # The data URL became a placeholder after the caller's own image; the remote URL is left to the server.
    assert sent[0]["content"][:3] == [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "compare"}]
    assert sent[0]["content"][3]["type"] == "image_url"
    assert [(name, data) for name, data in parts["files"]] == [("first.jpg", b"\xff\xd8\xff\xe0"), ("image.png", png)]
    assert msgs[0]["content"][1]["type"] == "image_url"  # the caller's messages are not modified
