"""``/v1/audio/speech/stream``: text sent word by word is heard a sentence at a time, in order."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

import mstar
from mstar.engine import Engine
from mstar.errors import AuthenticationError, UnknownVoiceError
from mstar.server.routes.speech_ws import MAX_UTTERANCE_CHARS
from mstar.types import AudioChunk, Finished

TOKENS = 35  # two audio windows per sentence
KEY = "s3cret"
TEXT = "Hello there my friend. This is the second sentence. And a third without an end"


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    eng = Engine("orpheus", weights="tiny", device="cpu", speech_chunk_chars=120)
    yield eng
    eng.close()
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def urls(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """An open server and one that wants the bearer token ``KEY``, on the same engine."""
    from mstar.server import create_app
    from tests.helpers.servers import ServerThread

    uploads = tmp_path_factory.mktemp("uploads")
    with ServerThread(create_app(engine, upload_dir=uploads)) as open_srv, ServerThread(
        create_app(engine, upload_dir=uploads, api_key=KEY)
    ) as keyed:
        yield {"open": open_srv.url, "keyed": keyed.url}


def _ws(base: str, **kwargs: Any) -> ClientConnection:
    return connect(base.replace("http://", "ws://") + "/v1/audio/speech/stream", open_timeout=10, **kwargs)


def _config(**fields: Any) -> str:
    return json.dumps({"type": "session.config", "voice": "tara", "seed": 4, "max_new_tokens": TOKENS, **fields})


def _text(text: str) -> str:
    return json.dumps({"type": "input.text", "text": text})


def _event(ws: ClientConnection, timeout: float = 30) -> dict[str, Any] | bytes:
    msg = ws.recv(timeout=timeout)
    return msg if isinstance(msg, bytes) else json.loads(msg)


def _until_done(ws: ClientConnection) -> list[dict[str, Any] | bytes]:
    seen: list[dict[str, Any] | bytes] = []
    while True:
        ev = _event(ws)
        seen.append(ev)
        if isinstance(ev, dict) and ev["type"] in ("session.done", "error"):
            return seen


def _wait_idle(engine: Engine, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while engine.stats()["inflight"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats()["inflight"] == 0


@pytest.mark.slow
def test_text_sent_word_by_word_is_heard_before_input_done(urls: dict[str, str]) -> None:
    words = TEXT.split(" ")
    with _ws(urls["open"]) as ws:
        ws.send(_config())
        for word in words[:4]:  # "Hello there my friend." and the space after it
            ws.send(_text(word + " "))
        start = _event(ws)
        assert isinstance(start, dict) and start["type"] == "audio.start"
        assert (start["sentence_index"], start["sentence_text"]) == (0, "Hello there my friend.")
        assert (start["format"], start["sample_rate"], start["num_channels"]) == ("pcm", 24000, 1)
        audio = _event(ws)
        assert isinstance(audio, bytes) and len(audio) == 2 * 2048  # heard while input is still open
        for word in words[4:]:
            ws.send(_text(word + " "))
        ws.send(json.dumps({"type": "input.done"}))
        rest = _until_done(ws)
    starts = [e for e in [start, *rest] if isinstance(e, dict) and e["type"] == "audio.start"]
    assert [s["sentence_text"] for s in starts] == [
        "Hello there my friend.", "This is the second sentence.", "And a third without an end"
    ]
    dones = [e for e in rest if isinstance(e, dict) and e["type"] == "audio.done"]
    assert [d["sentence_index"] for d in dones] == [0, 1, 2]
    assert all(d["total_bytes"] == 2 * 2 * 2048 for d in dones)
    end = rest[-1]
    assert isinstance(end, dict) and end["type"] == "session.done"
    assert (end["utterance_index"], end["total_sentences"]) == (0, 3)
    assert end["usage"]["output_tokens"] == 3 * TOKENS and end["usage"]["total_tokens"] > 3 * TOKENS


@pytest.mark.slow
def test_a_seeded_session_repeats_and_the_connection_serves_another_utterance(urls: dict[str, str]) -> None:
    def utterance(ws: ClientConnection) -> bytes:
        ws.send(_text("One short line. "))
        ws.send(json.dumps({"type": "input.done"}))
        return b"".join(e for e in _until_done(ws) if isinstance(e, bytes))

    with _ws(urls["open"]) as a, _ws(urls["open"]) as b:
        a.send(_config())
        b.send(_config())
        first_a, first_b = utterance(a), utterance(b)
        second_a = utterance(a)
    assert first_a == first_b and first_a
    assert second_a and second_a != first_a  # the next sentence of the session has its own seed


def test_wav_sessions_send_each_sentence_as_a_wav_stream(urls: dict[str, str]) -> None:
    with _ws(urls["open"]) as ws:
        ws.send(_config(response_format="wav"))
        ws.send(_text("Hi there."))
        ws.send(json.dumps({"type": "input.done"}))
        frames = [e for e in _until_done(ws) if isinstance(e, bytes)]
    assert frames[0][:4] == b"RIFF" and frames[0][8:12] == b"WAVE"


def test_an_unknown_message_is_an_error_event_and_the_session_goes_on(urls: dict[str, str]) -> None:
    with _ws(urls["open"]) as ws:
        ws.send(_config())
        ws.send(json.dumps({"type": "input.bogus"}))
        err = _event(ws)
        assert isinstance(err, dict) and err["type"] == "error"
        assert (err["code"], err["status"], err["param"]) == ("invalid_request", 400, "type")
        ws.send("not json")
        assert _event(ws)["code"] == "invalid_request"  # type: ignore[index]
        ws.send(json.dumps({"type": "input.done"}))
        done = _event(ws)
        assert isinstance(done, dict) and (done["type"], done["total_sentences"]) == ("session.done", 0)


@pytest.mark.parametrize(
    ("fields", "code", "param"),
    [
        ({"voice": "nobody"}, "unknown_voice", None),
        ({"response_format": "mp3"}, "invalid_parameter", "response_format"),
        ({"stream_audio": False}, "invalid_parameter", "stream_audio"),
        ({"speed": 2.0}, "invalid_parameter", "speed"),
        ({"model": "someone-else"}, "unknown_model", None),
        ({"nonsense": 1}, "unknown_parameter", None),
    ],
)
def test_a_bad_session_config_is_an_error_event_then_close(urls: dict[str, str], fields: dict[str, Any], code: str, param: str | None) -> None:
    with _ws(urls["open"]) as ws:
        ws.send(_config(**fields))
        err = _event(ws)
        assert isinstance(err, dict) and err["type"] == "error" and err["code"] == code
        if param is not None:
            assert err["param"] == param
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008


def test_text_before_session_config_is_refused(urls: dict[str, str]) -> None:
    with _ws(urls["open"]) as ws:
        ws.send(_text("Hello."))
        err = _event(ws)
        assert isinstance(err, dict) and "session.config" in err["message"]
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=5)


def test_an_utterance_over_the_limit_is_refused_and_closed(urls: dict[str, str]) -> None:
    with _ws(urls["open"]) as ws:
        ws.send(_config())
        ws.send(_text("x" * (MAX_UTTERANCE_CHARS + 1)))
        err = _event(ws)
        assert isinstance(err, dict) and (err["code"], err["status"]) == ("payload_too_large", 413)
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009


def test_a_server_with_a_key_refuses_a_stream_without_it(urls: dict[str, str]) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        with _ws(urls["keyed"], additional_headers=headers) as ws:
            err = _event(ws)
            assert isinstance(err, dict) and (err["code"], err["status"]) == ("invalid_api_key", 401)
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008


@pytest.mark.slow
def test_a_server_with_a_key_speaks_with_it(urls: dict[str, str]) -> None:
    with _ws(urls["keyed"], additional_headers={"Authorization": f"Bearer {KEY}"}) as ws:
        ws.send(_config())
        ws.send(_text("Hi."))
        ws.send(json.dumps({"type": "input.done"}))
        assert _until_done(ws)[-1]["type"] == "session.done"  # type: ignore[index]


@pytest.mark.slow
def test_a_client_that_disconnects_cancels_every_sentence(engine: Engine, urls: dict[str, str]) -> None:
    ws = _ws(urls["open"])
    ws.send(_config(max_new_tokens=300))
    ws.send(_text("First one is long enough. Second one too. Third one as well. Fourth. "))
    assert _event(ws)["type"] == "audio.start"  # type: ignore[index]
    assert engine.stats()["inflight"] >= 2  # the later sentences run already
    ws.close()
    _wait_idle(engine)


# ---------------------------------------------------------------------- the SDK


@pytest.mark.slow
def test_the_client_receives_audio_before_it_ends_the_utterance(urls: dict[str, str]) -> None:
    client = mstar.MStarClient(urls["open"], timeout=30)
    with client.speech_stream(voice="tara", seed=4, max_new_tokens=TOKENS) as speech:
        for word in "Good morning to you. And".split():
            speech.send(word + " ")
        first = speech.receive()
        assert isinstance(first, AudioChunk) and first.sample_rate == 24000
        assert first.metadata == {"utterance_index": 0, "sentence_index": 0}
        speech.send("goodbye.")
        speech.done()
        events = list(speech)
    assert isinstance(events[-1], Finished) and events[-1].usage.output_tokens == 2 * TOKENS
    assert [e.metadata["sentence_index"] for e in events[:-1]] == [0, 1, 1]


def test_the_client_raises_the_servers_error(urls: dict[str, str]) -> None:
    client = mstar.MStarClient(urls["open"], timeout=30)
    with client.speech_stream(voice="nobody") as speech, pytest.raises(UnknownVoiceError):
        speech.receive()
    keyed = mstar.MStarClient(urls["keyed"], timeout=30, api_key="")
    # The server refuses at once, so the refusal may surface while the config is being sent.
    with pytest.raises(AuthenticationError), keyed.speech_stream() as speech:
        speech.receive()
