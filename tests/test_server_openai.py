"""The OpenAI-compatible /v1 routes, driven by the official ``openai`` package against a real uvicorn."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import av
import numpy as np
import openai
import pytest
import requests

import mstar
from tests.helpers.media import png_bytes
from tests.helpers.servers import Served

SPEECH_FORMATS = ["wav", "pcm", "flac", "mp3", "opus", "aac"]
# Keep the tiny Orpheus short: six SNAC frames of seven tokens each.
SHORT = {"max_output_tokens": 42}


# ``served`` (a server per model, started once per module) is the fixture of tests/conftest.py.
# The tiny Orpheus is always in the tree (its weights are built in-process), so it needs no skip.
SPEECH_MODELS = ["orpheus", "fake"]
# Every (model, format): Orpheus decodes for real, so only its WAV is in the fast tier (the fake covers every format).
SPEECH_SWEEP = [pytest.param(m, f, marks=pytest.mark.slow) if m == "orpheus" and f != "wav" else (m, f)
                for m in SPEECH_MODELS for f in SPEECH_FORMATS]


@pytest.fixture(params=SPEECH_MODELS)
def speech(request: pytest.FixtureRequest, served: Any) -> Served:
    return served(request.param)  # type: ignore[no-any-return]


@pytest.fixture
def chat(served: Any) -> Served:
    return served("fake")  # type: ignore[no-any-return]


def _decode_samples(data: bytes, fmt: str) -> int:
    """Decode an encoded file with PyAV and count its samples (proves it really is that format)."""
    if fmt == "pcm":
        return len(data) // 2
    with av.open(io.BytesIO(data)) as container:
        expected = {"wav": "wav", "flac": "flac", "mp3": "mp3", "opus": "ogg", "aac": "aac"}[fmt]
        assert expected in container.format.name
        stream = container.streams.audio[0]
        return sum(frame.samples for frame in container.decode(stream))


# --------------------------------------------------------------------------- models


def test_models_lists_the_served_model(chat: Served) -> None:
    ids = [m.id for m in chat.client.models.list()]
    assert ids == ["fake"]
    assert chat.client.models.retrieve("fake").id == "fake"


def test_model_without_openai_surface_gets_404_on_every_v1_route_but_models(served: Any) -> None:
    s = served("fake_noapi")
    assert s.client.models.list().data == []
    with pytest.raises(openai.NotFoundError):
        s.client.chat.completions.create(model="fake_noapi", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.NotFoundError):
        s.client.audio.speech.create(model="fake_noapi", input="hi", voice="alloy")
    with pytest.raises(openai.NotFoundError):
        s.client.images.generate(model="fake_noapi", prompt="a cat")
    for path in ("/v1/audio/voices", "/v1/models/fake_noapi"):
        r = requests.get(s.url + path)
        assert r.status_code == 404 and isinstance(r.json()["error"]["code"], str)
    r = requests.post(s.url + "/v1/images/edits", files={"image": ("a.png", png_bytes()), "prompt": (None, "x"), "model": (None, "fake_noapi")})
    assert r.status_code == 404


# --------------------------------------------------------------------------- chat


def test_chat_completion_returns_the_answer(chat: Served) -> None:
    out = chat.client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "hello"}], seed=3)
    assert out.choices[0].message.content == "hello"
    assert out.choices[0].finish_reason == "stop"
    assert out.usage is not None and out.usage.completion_tokens == 5
    assert out.model_extra is not None and out.model_extra["seed"] == 3


def test_chat_max_tokens_reports_length(chat: Served) -> None:
    out = chat.client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "hello"}], max_tokens=2)
    assert out.choices[0].message.content == "he"
    assert out.choices[0].finish_reason == "length"


def test_chat_streams_deltas_and_usage(chat: Served) -> None:
    stream = chat.client.chat.completions.create(
        model="fake", messages=[{"role": "user", "content": "stream me"}], stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "stream me"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 9


def test_chat_audio_output_has_openai_shape(chat: Served) -> None:
    out = chat.client.chat.completions.create(
        model="fake", messages=[{"role": "user", "content": "say hi"}], modalities=["text", "audio"], audio={"voice": "alpha", "format": "wav"}
    )
    audio = out.choices[0].message.audio
    assert audio is not None and audio.transcript == "say hi" and audio.expires_at > 0 and audio.id
    assert _decode_samples(base64.b64decode(audio.data), "wav") == 6 * 240


def test_chat_audio_streams_as_delta_audio(chat: Served) -> None:
    stream = chat.client.chat.completions.create(
        model="fake", messages=[{"role": "user", "content": "yo"}], modalities=["text", "audio"], audio={"voice": "beta", "format": "pcm16"}, stream=True
    )
    pcm = b""
    transcript = ""
    for c in stream:
        audio = c.choices[0].delta.audio if c.choices else None
        if audio is not None:
            pcm += base64.b64decode(audio.data or "")
            transcript += audio.transcript or ""
    assert transcript == "yo" and len(pcm) == 2 * 2 * 240


def test_chat_accepts_inline_image(chat: Served) -> None:
    url = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    out = chat.client.chat.completions.create(
        model="fake",
        messages=[{"role": "user", "content": [{"type": "text", "text": "what"}, {"type": "image_url", "image_url": {"url": url}}]}],
    )
    assert out.choices[0].message.content == "what"


def test_chat_extra_body_reaches_the_model(chat: Served) -> None:
    out = chat.client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "hello"}], extra_body={"max_output_tokens": 3})
    assert out.choices[0].message.content == "hel"


def test_chat_error_mid_stream_has_error_shape(chat: Served) -> None:
    def fault(req: Any) -> None:
        if req.steps >= 2:
            raise RuntimeError("mid-stream failure")

    chat.engine.scheduler.fault_hook = fault
    try:
        with pytest.raises(openai.APIError) as info:
            list(chat.client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "abcdef"}], stream=True))
    finally:
        chat.engine.scheduler.fault_hook = None
    assert "mid-stream failure" in str(info.value)


def test_unknown_chat_key_lists_accepted_ones(chat: Served) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        chat.client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "x"}], extra_body={"bogus_knob": 1})
    body = info.value.body
    assert isinstance(body, dict) and body["code"] == "unknown_parameter"
    assert "max_output_tokens" in body["message"] and "temperature" in body["message"]


# --------------------------------------------------------------------------- speech


@pytest.mark.parametrize(("speech", "fmt"), SPEECH_SWEEP, indirect=["speech"])
def test_speech_encodes_every_format(speech: Served, fmt: str) -> None:
    voice = "tara" if speech.model == "orpheus" else "alpha"
    resp = speech.client.audio.speech.create(model=speech.model, input="hello there", voice=voice, response_format=fmt, extra_body=SHORT)  # type: ignore[arg-type]
    assert _decode_samples(resp.content, fmt) > 0


def test_speech_streams_audio_bytes(speech: Served) -> None:
    with speech.client.audio.speech.with_streaming_response.create(
        model=speech.model, input="hello", voice="tara" if speech.model == "orpheus" else "alpha", response_format="pcm", extra_body=SHORT
    ) as resp:
        assert resp.headers["content-type"] == "audio/pcm"
        data = b"".join(resp.iter_bytes())
    assert len(data) > 0 and len(data) % 2 == 0


def test_speech_streams_sse_events(speech: Served) -> None:
    body = {"model": speech.model, "input": "hello", "response_format": "wav", "stream_format": "sse", **SHORT}
    r = requests.post(speech.url + "/v1/audio/speech", json=body, stream=True)
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[len(b"data: "):]) for line in r.iter_lines() if line.startswith(b"data: ")]
    assert events[-1]["type"] == "speech.audio.done" and events[-1]["usage"]["output_tokens"] > 0
    deltas = [e for e in events if e["type"] == "speech.audio.delta"]
    wav = b"".join(base64.b64decode(e["audio"]) for e in deltas)
    assert _decode_samples(wav, "wav") > 0


def test_speech_speed_changes_duration(chat: Served) -> None:
    def samples(speed: float) -> int:
        resp = chat.client.audio.speech.create(model="fake", input="a" * 40, voice="alpha", response_format="pcm", speed=speed)
        return len(resp.content) // 2

    normal, fast = samples(1.0), samples(2.0)
    assert normal == 40 * 240
    assert abs(fast - normal / 2) < normal * 0.1


def test_voices_lists_the_models_voices(speech: Served) -> None:
    doc = requests.get(speech.url + "/v1/audio/voices").json()
    if speech.model == "orpheus":
        assert doc["default"] == "tara" and "leah" in doc["voices"]
    else:
        assert doc["voices"] == ["alpha", "beta"]


def test_unknown_voice_is_refused_with_the_list(speech: Served) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        speech.client.audio.speech.create(model=speech.model, input="hi", voice="nobody")
    body = info.value.body
    assert isinstance(body, dict) and body["code"] == "unknown_voice" and body["param"] == "voice"


# --------------------------------------------------------------------------- images


IMAGE_MODELS = ["fakeimg", "bagel"]
# Few denoising steps keep the tiny BAGEL quick.
IMAGE_EXTRA = {"fakeimg": {}, "bagel": {"num_timesteps": 3}}


@pytest.mark.parametrize("model", IMAGE_MODELS)
def test_image_generation_returns_n_b64_pngs_of_the_size(served: Any, model: str) -> None:
    s = served(model)
    extra = {**IMAGE_EXTRA[model], "seed": 5}
    out = s.client.images.generate(model=model, prompt="a red square", n=2, size="32x16", response_format="b64_json", extra_body=extra)
    assert len(out.data) == 2
    pngs = [base64.b64decode(d.b64_json or "") for d in out.data]
    assert all(p.startswith(b"\x89PNG") for p in pngs)
    assert (mstar.ImageChunk(pngs[0]).width, mstar.ImageChunk(pngs[0]).height) == (32, 16)
    again = s.client.images.generate(model=model, prompt="a red square", n=1, size="32x16", extra_body=extra)
    assert base64.b64decode(again.data[0].b64_json or "") == pngs[0]  # same seed, same image


@pytest.mark.parametrize("model", IMAGE_MODELS)
def test_image_edit_returns_a_png(served: Any, model: str) -> None:
    s = served(model)
    out = s.client.images.edit(
        model=model, image=("in.png", png_bytes(32, 32), "image/png"), prompt="make it blue", size="32x32", extra_body=IMAGE_EXTRA[model]
    )
    assert base64.b64decode(out.data[0].b64_json or "").startswith(b"\x89PNG")


def test_image_edit_takes_an_uploaded_image(served: Any) -> None:
    s = served("fakeimg")
    out = s.client.images.edit(model="fakeimg", image=("in.png", png_bytes(color=(1, 2, 3)), "image/png"), prompt="same colour")
    from PIL import Image

    img = Image.open(io.BytesIO(base64.b64decode(out.data[0].b64_json or "")))
    assert np.asarray(img.convert("RGB"))[0, 0].tolist() == [1, 2, 3]


def test_chat_timeout_mid_stream_is_an_error_event(chat: Served) -> None:
    extra = {"max_output_tokens": 100000, "step_delay": 0.02, "timeout": 0.2}
    with pytest.raises(openai.APIError, match="deadline"):
        list(chat.client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "tick"}], stream=True, extra_body=extra))


def test_non_streaming_chat_timeout_is_504(chat: Served) -> None:
    extra = {"max_output_tokens": 100000, "step_delay": 0.02, "timeout": 0.2}
    r = requests.post(chat.url + "/v1/chat/completions", json={"model": "fake", "messages": [{"role": "user", "content": "x"}], **extra})
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"


def test_speech_failure_after_audio_began_cuts_the_stream(chat: Served) -> None:
    def fault(req: Any) -> None:
        if req.steps >= 3:
            raise RuntimeError("decoder died")

    chat.engine.scheduler.fault_hook = fault
    try:
        body = {"model": "fake", "input": "a long sentence", "response_format": "pcm"}
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            r = requests.post(chat.url + "/v1/audio/speech", json=body, stream=True)
            assert r.status_code == 200
            b"".join(r.iter_content(None))
    finally:
        chat.engine.scheduler.fault_hook = None


def test_speech_sse_failure_is_an_error_event(chat: Served) -> None:
    def fault(req: Any) -> None:
        if req.steps >= 3:
            raise RuntimeError("decoder died")

    chat.engine.scheduler.fault_hook = fault
    try:
        body = {"model": "fake", "input": "a long sentence", "response_format": "pcm", "stream_format": "sse"}
        r = requests.post(chat.url + "/v1/audio/speech", json=body, stream=True)
        events = [json.loads(line[len(b"data: "):]) for line in r.iter_lines() if line.startswith(b"data: ")]
    finally:
        chat.engine.scheduler.fault_hook = None
    assert events[0]["type"] == "speech.audio.delta"
    assert events[-1]["error"]["code"] == "model_error" and "decoder died" in events[-1]["error"]["message"]


def test_format_this_ffmpeg_cannot_encode_is_a_400_not_a_fallback(chat: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    from mstar.server import audio_encode

    broken = audio_encode._Format("audio/aac", "adts", "no_such_encoder", "fltp")
    monkeypatch.setitem(audio_encode.AUDIO_FORMATS, "aac", broken)
    audio_encode._probe.cache_clear()
    try:
        with pytest.raises(openai.BadRequestError, match="cannot be encoded"):
            chat.client.audio.speech.create(model="fake", input="hi", voice="alpha", response_format="aac")
    finally:
        audio_encode._probe.cache_clear()
