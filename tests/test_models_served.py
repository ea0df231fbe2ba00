"""Every model family through a real server: OpenAI routes for chat/speech/image models, the
native route and MStarClient for the tensor models, and 404s where a model has no OpenAI shape."""

from __future__ import annotations

import base64
import io
import wave
from typing import Any

import numpy as np
import openai
import pytest
import requests

from mstar import TensorChunk
from tests.fixtures.vjepa2_media import make_mp4, make_png

# ``served`` (a server per model, started once per module) is the fixture of tests/conftest.py.

# --------------------------------------------------------------------------- Qwen3-Omni

QWEN_SHORT = {"talker_max_output_tokens": 12, "seed": 5}


def test_qwen3_omni_chat_answers_with_text_over_openai(served: Any) -> None:
    s = served("qwen3_omni")
    out = s.client.chat.completions.create(
        model="qwen3_omni", messages=[{"role": "user", "content": "Hello!"}], max_tokens=6, extra_body={"seed": 5}
    )
    assert out.choices[0].message.content and out.choices[0].message.audio is None
    assert out.usage is not None and out.usage.completion_tokens > 0


@pytest.mark.slow
def test_qwen3_omni_chat_returns_text_and_wav_audio_over_openai(served: Any) -> None:
    s = served("qwen3_omni")
    out = s.client.chat.completions.create(
        model="qwen3_omni",
        messages=[{"role": "user", "content": "Say something."}],
        modalities=["text", "audio"],
        audio={"voice": "Ethan", "format": "wav"},
        max_tokens=6,
        extra_body=QWEN_SHORT,
    )
    audio = out.choices[0].message.audio
    assert audio is not None and audio.id and audio.transcript
    with wave.open(io.BytesIO(base64.b64decode(audio.data))) as w:
        assert w.getframerate() == 24000 and w.getnframes() > 0


@pytest.mark.slow
def test_qwen3_omni_chat_streams_text_and_audio_deltas_over_openai(served: Any) -> None:
    s = served("qwen3_omni")
    stream = s.client.chat.completions.create(
        model="qwen3_omni",
        messages=[{"role": "user", "content": "Say something."}],
        modalities=["text", "audio"],
        audio={"voice": "Ethan", "format": "pcm16"},
        max_tokens=6,
        stream=True,
        extra_body=QWEN_SHORT,
    )
    text, pcm = "", b""  # OpenAI shape: with audio output, content is null and text is the transcript
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        text += delta.content or ""
        audio = getattr(delta, "audio", None) or (delta.model_extra or {}).get("audio")
        fields = audio if isinstance(audio, dict) else (audio.model_dump() if audio is not None else {})
        text += fields.get("transcript") or ""  # with audio output the text arrives as the transcript
        data = fields.get("data")
        if data:
            pcm += base64.b64decode(data)
    assert text and len(pcm) > 0 and len(pcm) % 2 == 0


@pytest.mark.slow
def test_qwen3_omni_speech_route_returns_audio(served: Any) -> None:
    s = served("qwen3_omni")
    out = s.client.audio.speech.create(
        model="qwen3_omni", input="Hello there", voice="Ethan", response_format="wav",
        extra_body={**QWEN_SHORT, "max_output_tokens": 6},
    )
    with wave.open(io.BytesIO(out.content)) as w:
        assert w.getframerate() == 24000 and w.getnframes() > 0


def test_qwen3_omni_generate_accepts_an_image_upload(served: Any) -> None:
    s = served("qwen3_omni")
    res = s.sdk.chat("What is this?", images=("pic.png", make_png(32, 32)), max_output_tokens=4, seed=1)
    local = s.engine.chat("What is this?", images=("pic.png", make_png(32, 32)), max_output_tokens=4, seed=1)
    assert res.text == local.text and res.text


# --------------------------------------------------------------------------- BAGEL


def test_bagel_chats_over_openai(served: Any) -> None:
    s = served("bagel")
    out = s.client.chat.completions.create(
        model="bagel", messages=[{"role": "user", "content": "Hi"}], max_tokens=5, extra_body={"seed": 1}
    )
    assert out.choices[0].message.content is not None and out.choices[0].finish_reason in ("stop", "length")


# --------------------------------------------------------------------------- tensor models


def test_pi05_actions_through_the_client_have_the_advertised_shape(served: Any) -> None:
    s = served("pi05")
    args: dict[str, Any] = {
        "text": "pick up the cube",
        "images": [("cam0.png", make_png(64, 64, 0)), ("cam1.png", make_png(48, 64, 1))],
        "robot_state": [0.1, -0.2, 0.3],
        "action_horizon": 8,
        "seed": 3,
        "output_modalities": ("action",),
    }
    res = s.sdk.generate(**args)
    (chunk,) = res.tensors
    assert isinstance(chunk, TensorChunk) and chunk.modality == "action"
    actions = chunk.to_numpy()
    assert actions.shape == (8, 32) and actions.dtype == np.float32
    np.testing.assert_array_equal(actions, s.engine.generate(**args).tensors[0].to_numpy())


def test_pi05_has_no_openai_surface(served: Any) -> None:
    s = served("pi05")
    with pytest.raises(openai.NotFoundError) as info:
        s.client.chat.completions.create(model="pi05", messages=[{"role": "user", "content": "hi"}])
    body = info.value.response.json()
    assert set(body["error"]) >= {"message", "type", "param", "code"} and isinstance(body["error"]["code"], str)
    r = requests.get(s.url + "/v1/models")
    assert r.status_code == 200


def test_vjepa2_latents_through_the_client_have_the_advertised_shape(served: Any) -> None:
    s = served("vjepa2")
    clip = ("clip.mp4", make_mp4(8, 32, 32))
    res = s.sdk.generate(video=clip, output_modalities=("latent",))
    (chunk,) = res.tensors
    assert chunk.modality == "latent" and chunk.to_numpy().ndim == 2
    local = s.engine.generate(video=clip, output_modalities=("latent",)).tensors[0]
    assert chunk.shape == local.shape
    np.testing.assert_array_equal(chunk.to_numpy(), local.to_numpy())


def test_vjepa2_ac_rollout_through_the_client_has_the_advertised_shape(served: Any) -> None:
    s = served("vjepa2_ac")
    rng = np.random.default_rng(0)
    states = (rng.normal(size=(2, 7)) * 0.1).tolist()
    actions = (rng.normal(size=(3, 7)) * 0.05).tolist()
    stream = s.sdk.stream(
        video=("clip.mp4", make_mp4(4, 40, 48, seed=7)), mode="rollout", states=states, actions=actions,
        output_modalities=("latent",),
    )
    chunks = [e for e in stream if isinstance(e, TensorChunk)]
    assert len(chunks) == 1 and chunks[0].shape[0] == 3 and chunks[0].to_numpy().shape == chunks[0].shape
    r = requests.post(s.url + "/v1/chat/completions", json={"model": "vjepa2_ac", "messages": []})
    assert r.status_code == 404 and "error" in r.json()
