"""WAV files sent in one piece carry their real sizes; streamed ones may say "unknown length".

Every non-streamed route that returns WAV is read back with three readers (Python's ``wave``,
soundfile, PyAV), each of which must count exactly the samples the model produced.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import wave
from typing import Any

import av
import numpy as np
import pytest
import requests
import soundfile

from mstar.server.audio_encode import StreamingEncoder
from tests.helpers.servers import Served

# The fake model speaks 240 samples (24 kHz) per character of its prompt.
FAKE_SAMPLES_PER_CHAR = 240


@pytest.fixture
def fake(served: Any) -> Served:
    return served("fake")  # type: ignore[no-any-return]


def _riff_sizes(data: bytes) -> tuple[int, int]:
    """The RIFF size and the data-chunk size written in a 44-byte PCM WAV header."""
    assert data[:4] == b"RIFF" and data[8:12] == b"WAVE" and data[36:40] == b"data"
    return struct.unpack("<I", data[4:8])[0], struct.unpack("<I", data[40:44])[0]


def _frames_by_every_reader(data: bytes) -> tuple[int, int, int]:
    with wave.open(io.BytesIO(data)) as w:
        by_wave = w.getnframes()
    by_soundfile = soundfile.info(io.BytesIO(data)).frames
    with av.open(io.BytesIO(data)) as container:
        by_av = sum(frame.samples for frame in container.decode(container.streams.audio[0]))
    return by_wave, by_soundfile, by_av


def _assert_complete_wav(data: bytes, frames: int) -> None:
    riff, data_size = _riff_sizes(data)
    assert data_size == len(data) - 44 == 2 * frames
    assert riff == len(data) - 8
    assert _frames_by_every_reader(data) == (frames, frames, frames)


def test_complete_encoder_writes_the_real_sizes() -> None:
    enc = StreamingEncoder("wav", 24000, complete=True)
    pcm = np.arange(1000, dtype="<i2").tobytes()
    assert enc.feed(pcm[:600]) == b"" and enc.feed(pcm[600:]) == b""  # held back until the end
    data = enc.close()
    _assert_complete_wav(data, 1000)
    assert data[44:] == pcm


def test_streaming_encoder_keeps_the_open_ended_header() -> None:
    enc = StreamingEncoder("wav", 24000)
    data = enc.feed(b"\x00\x00" * 10) + enc.close()
    assert _riff_sizes(data) == (0xFFFFFFFF, 0xFFFFFFFF)


def test_openai_speech_wav_content_has_the_true_frame_count(fake: Served) -> None:
    text = "hello there"
    resp = fake.client.audio.speech.create(model="fake", input=text, voice="alpha", response_format="wav")
    _assert_complete_wav(resp.content, FAKE_SAMPLES_PER_CHAR * len(text))


def test_speech_wav_is_sent_with_its_length(fake: Served) -> None:
    r = requests.post(fake.url + "/v1/audio/speech", json={"model": "fake", "input": "abc", "response_format": "wav"})
    assert r.status_code == 200 and r.headers["content-type"] == "audio/wav"
    assert int(r.headers["content-length"]) == len(r.content) == 44 + 2 * 3 * FAKE_SAMPLES_PER_CHAR


def test_time_stretched_speech_wav_has_the_true_frame_count(fake: Served) -> None:
    resp = fake.client.audio.speech.create(model="fake", input="a" * 40, voice="alpha", response_format="wav", speed=2.0)
    frames = (len(resp.content) - 44) // 2
    assert 0.4 * 40 * FAKE_SAMPLES_PER_CHAR < frames < 0.6 * 40 * FAKE_SAMPLES_PER_CHAR  # about half as long
    _assert_complete_wav(resp.content, frames)


def test_chat_audio_wav_has_the_true_frame_count(fake: Served) -> None:
    out = fake.client.chat.completions.create(
        model="fake", messages=[{"role": "user", "content": "say hi"}], modalities=["text", "audio"],
        audio={"voice": "alpha", "format": "wav"},
    )
    audio = out.choices[0].message.audio
    assert audio is not None
    _assert_complete_wav(base64.b64decode(audio.data), FAKE_SAMPLES_PER_CHAR * len("say hi"))


def test_sse_speech_wav_streams_with_the_open_ended_header(fake: Served) -> None:
    body = {"model": "fake", "input": "hello", "response_format": "wav", "stream_format": "sse"}
    r = requests.post(fake.url + "/v1/audio/speech", json=body, stream=True)
    events = [json.loads(line[len(b"data: "):]) for line in r.iter_lines() if line.startswith(b"data: ")]
    wav = b"".join(base64.b64decode(e["audio"]) for e in events if e["type"] == "speech.audio.delta")
    assert _riff_sizes(wav) == (0xFFFFFFFF, 0xFFFFFFFF)
    with av.open(io.BytesIO(wav)) as container:  # a streaming reader still gets every sample
        assert sum(f.samples for f in container.decode(container.streams.audio[0])) == 5 * FAKE_SAMPLES_PER_CHAR
