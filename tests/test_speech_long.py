"""A long text to speak runs as sentence-aligned chunk requests, heard in order as one request."""

from __future__ import annotations

import io
import json
import time
import wave
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import torch

from mstar.engine import Engine
from mstar.errors import ModelError
from mstar.speech.chunked import chunk_request_id, chunk_seed
from mstar.speech.chunking import chunk_text
from mstar.speech.seams import SeamJoiner, fade_samples
from mstar.types import AudioChunk, Finished

CHUNK = 120  # the tiny model's context is 384 byte tokens: keep each prompt well inside it
TOKENS = 35  # 5 frames: two audio windows per chunk
_SENTENCES = [
    "The morning train left the station a little after seven.",
    "Nobody on the platform seemed to notice the old clock had stopped.",
    "A boy with a red kite ran along the fence, laughing <laugh> at the wind.",
    "Somewhere further down the line, a dog barked twice and fell silent.",
    "The conductor checked every ticket with the same patient smile.",
]
PARAGRAPH = " ".join(_SENTENCES * 8)[:2000].rsplit(" ", 1)[0] + "."
SENTENCE = "The morning train left the station a little after seven."


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    eng = Engine("orpheus", weights="tiny", device="cpu", speech_chunk_chars=CHUNK)
    yield eng
    eng.close()
    torch.set_num_threads(before)


@pytest.fixture
def submitted(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The ids of every engine request queued during the test."""
    ids: list[str] = []
    real = engine.scheduler.submit

    def record(req: Any) -> None:
        ids.append(req.request_id)
        real(req)

    monkeypatch.setattr(engine.scheduler, "submit", record)
    return ids


def _wait_idle(engine: Engine, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while engine.stats()["inflight"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats()["inflight"] == 0


_ALONE: dict[tuple[int, str, int], bytes] = {}


def _joined_alone(engine: Engine, text: str, seed: int) -> bytes:
    """What the chunked request must sound like: each chunk spoken alone, joined at the seams."""
    key = (id(engine), text, seed)
    if key not in _ALONE:
        _ALONE[key] = _speak_alone(engine, text, seed)
    return _ALONE[key]


def _speak_alone(engine: Engine, text: str, seed: int) -> bytes:
    joiner = SeamJoiner()
    out = b""
    for i, chunk in enumerate(chunk_text(text, CHUNK)):
        for ev in engine.stream(text=chunk, output_modalities="audio", seed=chunk_seed(seed, i), max_output_tokens=TOKENS):
            if isinstance(ev, AudioChunk) and (piece := joiner.feed(i, ev)) is not None:
                out += piece.pcm
    last = joiner.close()
    return out + (last.pcm if last is not None else b"")


def _assert_same_audio(got: bytes, want: bytes) -> None:
    """Equal length and within 2 LSB per sample: the SNAC decode of a window may round a sample
    differently in another batch, but chunks out of order or missing differ by thousands."""
    import numpy as np

    a, b = np.frombuffer(got, "<i2").astype(int), np.frombuffer(want, "<i2").astype(int)
    assert len(a) == len(b)
    assert int(np.abs(a - b).max()) <= 2


def test_the_paragraph_is_about_2000_characters_of_many_chunks() -> None:
    assert 1900 <= len(PARAGRAPH) <= 2000
    assert len(chunk_text(PARAGRAPH, CHUNK)) >= 15


def test_a_short_text_is_one_request_with_its_own_id(engine: Engine, submitted: list[str]) -> None:
    res = engine.generate(text=SENTENCE, output_modalities="audio", seed=1, max_output_tokens=TOKENS, request_id="short-1")
    assert submitted == ["short-1"]
    assert res.request_id == "short-1" and res.usage.output_tokens == TOKENS


@pytest.mark.slow
def test_a_long_text_is_one_request_per_chunk_heard_in_order(engine: Engine, submitted: list[str]) -> None:
    chunks = chunk_text(PARAGRAPH, CHUNK)
    audio = engine.tts(PARAGRAPH, voice="tara", seed=5, max_output_tokens=TOKENS, request_id="para")
    assert sorted(submitted) == sorted(chunk_request_id("para", i) for i in range(len(chunks)))
    assert submitted[0] == "para~0"  # the first chunk leads; the others follow once it speaks
    # Each chunk's audio is what it says alone (seeded runs do not depend on the batch), in text order.
    _assert_same_audio(audio.pcm, _joined_alone(engine, PARAGRAPH, seed=5))
    seams = len(chunks) - 1
    assert len(audio) == len(chunks) * 2 * 2048 - seams * fade_samples(24000)


@pytest.mark.slow
def test_the_stream_ends_with_one_finished_carrying_the_summed_usage(engine: Engine) -> None:
    chunks = chunk_text(PARAGRAPH, CHUNK)
    events = list(engine.stream(text=PARAGRAPH, output_modalities="audio", seed=7, max_output_tokens=TOKENS, request_id="sum"))
    finished = [e for e in events if isinstance(e, Finished)]
    assert finished == [events[-1]]
    fin = finished[0]
    assert (fin.request_id, fin.seed, fin.finish_reason) == ("sum", 7, "length")
    assert fin.usage.output_tokens == TOKENS * len(chunks)
    indices = [e.metadata["chunk"] for e in events if isinstance(e, AudioChunk)]
    assert indices == sorted(indices) and set(indices) == set(range(len(chunks)))


@pytest.mark.slow
def test_cancelling_the_parent_cancels_every_chunk(engine: Engine) -> None:
    stream = engine.stream(text=PARAGRAPH, output_modalities="audio", seed=2, max_output_tokens=300, request_id="cx")
    first = next(stream)
    assert isinstance(first, AudioChunk)
    time.sleep(0.1)  # the followers are queued by now
    assert engine.stats()["inflight"] > 1
    assert engine.cancel("cx") is True
    last = [e for e in stream][-1]
    assert isinstance(last, Finished) and last.finish_reason == "cancelled"
    _wait_idle(engine)
    assert engine.cancel("cx") is False  # forgotten once ended


@pytest.mark.slow
def test_closing_the_stream_early_cancels_every_chunk(engine: Engine) -> None:
    stream = engine.stream(text=PARAGRAPH, output_modalities="audio", seed=2, max_output_tokens=300)
    next(stream)
    time.sleep(0.1)
    stream.close()
    _wait_idle(engine)


@pytest.mark.slow
def test_an_error_in_one_chunk_fails_the_whole_request_and_cancels_the_rest(engine: Engine) -> None:
    def fail_third(req: Any) -> None:
        if req.request_id == "bad~2":
            raise RuntimeError("chunk two broke")

    engine.scheduler.fault_hook = fail_third
    try:
        stream = engine.stream(text=PARAGRAPH, output_modalities="audio", seed=2, max_output_tokens=300, request_id="bad")
        with pytest.raises(ModelError, match="chunk two broke"):
            for _ in stream:
                pass
    finally:
        engine.scheduler.fault_hook = None
    _wait_idle(engine)


def test_bad_input_in_a_long_text_queues_nothing(engine: Engine, submitted: list[str]) -> None:
    from mstar.errors import UnknownVoiceError

    with pytest.raises(UnknownVoiceError):
        engine.tts(PARAGRAPH, voice="nobody", max_output_tokens=TOKENS)
    assert submitted == []


def _first_audio_s(engine: Engine, text: str) -> float:
    t0 = time.perf_counter()
    stream = engine.stream(text=text, output_modalities="audio", seed=3, max_output_tokens=TOKENS)
    try:
        for ev in stream:
            if isinstance(ev, AudioChunk):
                return time.perf_counter() - t0
    finally:
        stream.close()
        _wait_idle(engine)
    raise AssertionError("no audio")


@pytest.mark.slow
def test_time_to_first_audio_of_the_paragraph_is_a_sentences(engine: Engine) -> None:
    short = min(_first_audio_s(engine, SENTENCE) for _ in range(3))
    long = min(_first_audio_s(engine, PARAGRAPH) for _ in range(3))
    # The first chunk runs alone until it speaks; a little slack for the shared, noisy CPU.
    assert long <= short * 1.5 + 0.1, (long, short)


# ---------------------------------------------------------------------- served


@pytest.fixture(scope="module")
def server(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from mstar.server import create_app
    from tests.helpers.servers import ServerThread

    with ServerThread(create_app(engine, upload_dir=tmp_path_factory.mktemp("uploads"))) as srv:
        yield srv.url


def _speech(url: str, fmt: str, tokens: int = TOKENS, **extra: Any) -> requests.Response:
    body = {"model": "orpheus", "input": PARAGRAPH, "voice": "tara", "response_format": fmt, "seed": 5,
            "max_output_tokens": tokens, **extra}
    return requests.post(url + "/v1/audio/speech", json=body, stream=True, timeout=120)


@pytest.mark.slow
def test_served_paragraph_as_wav_has_a_valid_header_and_the_chunked_audio(engine: Engine, server: str) -> None:
    r = _speech(server, "wav")
    assert r.status_code == 200 and r.headers["content-type"].startswith("audio/")
    data = r.content
    with wave.open(io.BytesIO(data)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (24000, 1, 2)
        frames = w.readframes(w.getnframes())
    _assert_same_audio(frames, _joined_alone(engine, PARAGRAPH, seed=5))


@pytest.mark.slow
def test_served_paragraph_streams_as_pcm_in_order(engine: Engine, server: str) -> None:
    r = _speech(server, "pcm")
    assert r.status_code == 200
    pieces = list(r.iter_content(chunk_size=None))
    assert len(pieces) > 1
    _assert_same_audio(b"".join(pieces), _joined_alone(engine, PARAGRAPH, seed=5))


@pytest.mark.slow
def test_served_client_disconnect_cancels_every_chunk(engine: Engine, server: str) -> None:
    r = _speech(server, "pcm", tokens=300)
    next(r.iter_content(chunk_size=4096))
    time.sleep(0.2)
    r.close()
    _wait_idle(engine)


@pytest.mark.slow
def test_served_cancel_by_id_ends_the_generate_stream(engine: Engine, server: str) -> None:
    form = {"text": PARAGRAPH, "output_modalities": "audio", "request_id": "gen-long",
            "model_kwargs": json.dumps({"seed": 1, "max_output_tokens": 300})}
    r = requests.post(server + "/generate", data=form, stream=True, timeout=120)
    lines = r.iter_lines()
    assert json.loads(next(lines))["modality"] == "audio"
    assert requests.post(server + "/cancel/gen-long", timeout=10).json()["cancelled"] is True
    rest = [json.loads(line) for line in lines if line]
    assert rest[-1]["modality"] == "done" and rest[-1]["metadata"]["finish_reason"] == "cancelled"
    assert sum(1 for ev in rest if ev["modality"] == "done") == 1
    _wait_idle(engine)
