"""One SDK behaviour: the same call through an in-process Engine and through MStarClient gives the same answer.

For every model family, one tiny engine is served (the ``served`` fixture, one server per family
for the module) and each call below goes to that very engine twice: directly, and through the
client over HTTP. Seeded good calls must give equal results (text, audio, images, tensors with
their metadata, finish reason, seed, usage); bad calls must raise the same exception class with
the same message, ``param``, ``code`` and status. Inputs use the forms both sides accept: numpy
arrays for tensor arguments, paths and bytes for media, OpenAI content parts in ``messages``.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mstar import errors
from mstar.types import GenerateResult
from tests.fixtures.vjepa2_media import make_mp4
from tests.helpers.media import make_png, make_wav

pytestmark = pytest.mark.slow  # six tiny models behind six servers

Kwargs = Callable[[Path], dict[str, Any]]


@dataclass(frozen=True)
class Call:
    family: str
    name: str
    kwargs: Kwargs
    #: Why the two sides word the error differently by design; empty when the messages must be equal.
    differs: str = ""

    @property
    def id(self) -> str:
        return f"{self.family}-{self.name}"


def _data_url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def _user(*parts: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": list(parts)}]


def _garbage(tmp: Path, name: str) -> str:
    path = tmp / name
    path.write_bytes(b"\x00\x01 these bytes are no media at all " * 4)
    return str(path)


PNG = make_png(32, 32)
WAV = make_wav(0.5)
CLIP = make_mp4(4, 40, 48, seed=7)
RNG = np.random.default_rng(0)
STATES = np.concatenate([RNG.normal(size=(2, 6)) * 0.1, [[0.2], [0.3]]], axis=1)  # V-JEPA 2-AC: 2 context frames
ACTIONS = RNG.normal(size=(3, 7)) * 0.05
SPEAK = {"output_modalities": "audio", "seed": 7, "max_output_tokens": 35}
QWEN = {"seed": 1, "max_output_tokens": 5}
PI05 = {"output_modalities": "action", "seed": 3, "num_steps": 2, "action_horizon": 4}
LATENT = {"output_modalities": "latent", "seed": 4}
REMOTE = "the Engine never fetches remote URLs (it says so); a server refuses by its --allow-remote-media policy"

GOOD: list[Call] = [
    Call("orpheus", "speech", lambda t: {"text": "Hello there", "voice": "zoe", **SPEAK}),
    Call("orpheus", "text_part", lambda t: {"messages": _user({"type": "text", "text": "Hi"}), **SPEAK}),
    Call("qwen3_omni", "chat", lambda t: {"text": "Hello!", **QWEN}),
    Call("qwen3_omni", "image_path", lambda t: {"text": "What is this?", "images": _write(t, "pic.png", PNG), **QWEN}),
    Call("qwen3_omni", "image_url_part", lambda t: {
        "messages": _user({"type": "text", "text": "What is this?"},
                          {"type": "image_url", "image_url": {"url": _data_url("image/png", PNG)}}), **QWEN}),
    Call("qwen3_omni", "placeholder_part", lambda t: {
        "messages": _user({"type": "text", "text": "What is this?"}, {"type": "image"}), "images": PNG, **QWEN}),
    Call("qwen3_omni", "input_audio_part", lambda t: {
        "messages": _user({"type": "input_audio", "input_audio": {"data": base64.b64encode(WAV).decode(), "format": "wav"}},
                          {"type": "input_text", "text": "What was said?"}), **QWEN}),
    Call("bagel", "chat", lambda t: {"text": "Hi", "seed": 1, "max_output_tokens": 4}),
    Call("bagel", "image_url_part", lambda t: {
        "messages": _user({"type": "image_url", "image_url": _data_url("image/png", PNG)},
                          {"type": "text", "text": "Describe it."}), "seed": 1, "max_output_tokens": 4}),
    Call("bagel", "text_to_image", lambda t: {
        "text": "a red cube", "output_modalities": "image", "width": 32, "height": 32, "num_timesteps": 3, "seed": 3,
        "cfg_interval": np.array([0.4, 1.0])}),
    Call("pi05", "numpy_state", lambda t: {"text": "pick", "images": PNG, "robot_state": np.zeros(8), **PI05}),
    Call("vjepa2", "latents", lambda t: {"video": ("clip.mp4", CLIP), **LATENT}),
    Call("vjepa2_ac", "rollout_numpy", lambda t: {
        "video": ("clip.mp4", CLIP), "mode": "rollout", "states": STATES, "actions": ACTIONS, **LATENT}),
    Call("vjepa2_ac", "score", lambda t: {
        "video": ("clip.mp4", CLIP), "images": PNG, "mode": "score", "states": STATES,
        "actions": np.stack([ACTIONS, ACTIONS + 0.1]), **LATENT}),
]

BAD: list[Call] = [
    Call("orpheus", "unknown_voice", lambda t: {"text": "Hi", "voice": "bob", **SPEAK}),
    Call("orpheus", "unknown_parameter", lambda t: {"text": "Hi", "foo": 1, **SPEAK}),
    Call("orpheus", "nan_temperature", lambda t: {"text": "Hi", "temperature": float("nan"), **SPEAK},
         differs="JSON has no NaN: the client refuses it before sending, naming the key"),
    Call("orpheus", "wrong_type", lambda t: {"text": "Hi", "top_k": "many", **SPEAK}),
    Call("orpheus", "unsupported_output", lambda t: {"text": "Hi", "output_modalities": "image"}),
    Call("orpheus", "empty_input", lambda t: {"text": "", **SPEAK}),
    Call("orpheus", "image_part_to_a_speech_model", lambda t: {
        "messages": _user({"type": "image_url", "image_url": {"url": _data_url("image/png", PNG)}}), **SPEAK}),
    Call("qwen3_omni", "unknown_voice", lambda t: {"text": "Hi", "voice": "bob", "output_modalities": ["text", "audio"]}),
    Call("qwen3_omni", "corrupt_image_file", lambda t: {"text": "Hi", "images": _garbage(t, "bad.png"), **QWEN}),
    Call("qwen3_omni", "missing_media_path", lambda t: {"text": "Hi", "images": str(t / "absent.png"), **QWEN}),
    Call("qwen3_omni", "bad_base64_data_url", lambda t: {
        "messages": _user({"type": "image_url", "image_url": {"url": "data:image/png;base64,!!!"}}), **QWEN}),
    Call("qwen3_omni", "wrong_mime_data_url", lambda t: {
        "messages": _user({"type": "image_url", "image_url": {"url": _data_url("audio/wav", WAV)}}), **QWEN}),
    Call("qwen3_omni", "unknown_part_type", lambda t: {"messages": _user({"type": "file", "file": {}}), **QWEN}),
    Call("qwen3_omni", "placeholder_without_media", lambda t: {"messages": _user({"type": "image"}), **QWEN}),
    Call("qwen3_omni", "bad_role", lambda t: {"messages": [{"role": "robot", "content": "hi"}], **QWEN}),
    Call("qwen3_omni", "remote_url", lambda t: {
        "messages": _user({"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}), **QWEN},
        differs=REMOTE),
    Call("bagel", "cfg_interval_not_a_list", lambda t: {"text": "a cube", "output_modalities": "image",
                                                        "cfg_interval": 0.5, "num_timesteps": 2}),
    Call("bagel", "steps_out_of_range", lambda t: {"text": "a cube", "output_modalities": "image", "num_timesteps": 1}),
    Call("pi05", "state_too_long", lambda t: {"text": "pick", "images": PNG, "robot_state": np.zeros(800), **PI05}),
    Call("pi05", "state_missing", lambda t: {"text": "pick", "images": PNG, **PI05}),
    Call("pi05", "no_camera", lambda t: {"text": "pick", "robot_state": np.zeros(8), **PI05}),
    Call("pi05", "messages_instead_of_text", lambda t: {
        "messages": [{"role": "user", "content": "pick"}], "images": PNG, "robot_state": np.zeros(8), **PI05}),
    Call("vjepa2", "one_frame_clip", lambda t: {"video": ("one.mp4", make_mp4(1, 32, 32)), **LATENT}),
    Call("vjepa2", "corrupt_video_file", lambda t: {"video": _garbage(t, "bad.mp4"), **LATENT}),
    Call("vjepa2_ac", "actions_wrong_shape", lambda t: {
        "video": ("clip.mp4", CLIP), "mode": "rollout", "states": STATES, "actions": np.zeros((3, 5)), **LATENT}),
    Call("vjepa2_ac", "unknown_mode", lambda t: {"video": ("clip.mp4", CLIP), "mode": "dream", **LATENT}),
]


def _write(tmp: Path, name: str, data: bytes) -> str:
    path = tmp / name
    path.write_bytes(data)
    return str(path)


def _result(res: GenerateResult) -> dict[str, Any]:
    """Everything a result holds but its request id (which each side makes on its own)."""
    doc = res.to_json()
    doc.pop("request_id", None)
    return doc


def _error(exc: errors.MStarError) -> tuple[Any, ...]:
    return type(exc), str(exc), exc.param, exc.code, exc.status_code


@pytest.mark.parametrize("call", GOOD, ids=lambda c: c.id)
def test_the_same_seeded_call_gives_the_same_result(call: Call, served: Any, tmp_path: Path) -> None:
    s = served(call.family)
    local = s.engine.generate(**call.kwargs(tmp_path))
    remote = s.sdk.generate(**call.kwargs(tmp_path))
    assert isinstance(local, GenerateResult) and isinstance(remote, GenerateResult)
    assert local.text or local.audio or local.images or local.tensors or local.finish_reason == "length"
    assert _result(remote) == _result(local)


@pytest.mark.parametrize("call", [c for c in GOOD if c.name in ("speech", "chat", "numpy_state", "latents")],
                         ids=lambda c: c.id)
def test_the_same_stream_gathers_to_the_same_result(call: Call, served: Any, tmp_path: Path) -> None:
    s = served(call.family)
    with s.engine.stream(**call.kwargs(tmp_path)) as events:
        local = GenerateResult.from_events("local", list(events))
    with s.sdk.stream(**call.kwargs(tmp_path)) as events:
        remote = GenerateResult.from_events("remote", list(events))
    assert _result(remote) == _result(local)


@pytest.mark.parametrize("call", BAD, ids=lambda c: c.id)
def test_the_same_bad_call_raises_the_same_error(call: Call, served: Any, tmp_path: Path) -> None:
    s = served(call.family)
    with pytest.raises(errors.MStarError) as local:
        s.engine.generate(**call.kwargs(tmp_path))
    with pytest.raises(errors.MStarError) as remote:
        s.sdk.generate(**call.kwargs(tmp_path))
    assert isinstance(local.value, errors.InvalidRequestError)  # a 400 of the Engine's own, not a crash
    if call.differs:
        assert type(remote.value) is type(local.value) and remote.value.code == local.value.code
        assert str(remote.value) != str(local.value), f"the messages agree now; drop the exemption ({call.differs})"
    else:
        assert _error(remote.value) == _error(local.value)


def test_the_sugar_methods_agree(served: Any) -> None:
    s = served("orpheus")
    assert s.sdk.tts("Hello", voice="tara", seed=2, max_output_tokens=35) == s.engine.tts(
        "Hello", voice="tara", seed=2, max_output_tokens=35
    )
    s = served("qwen3_omni")
    local = s.engine.chat(_user({"type": "image_url", "image_url": {"url": _data_url("image/png", PNG)}}), **QWEN)
    remote = s.sdk.chat(_user({"type": "image_url", "image_url": {"url": _data_url("image/png", PNG)}}), **QWEN)
    assert isinstance(local, GenerateResult) and isinstance(remote, GenerateResult)
    assert _result(remote) == _result(local)


def test_an_openai_part_means_what_the_placeholder_form_means(served: Any) -> None:
    s = served("qwen3_omni")
    openai_form = s.sdk.generate(
        messages=_user({"type": "text", "text": "What is this?"},
                       {"type": "image_url", "image_url": {"url": _data_url("image/png", PNG)}}), **QWEN)
    placeholder_form = s.engine.generate(
        messages=_user({"type": "text", "text": "What is this?"}, {"type": "image"}), images=PNG, **QWEN)
    assert isinstance(openai_form, GenerateResult) and isinstance(placeholder_form, GenerateResult)
    assert _result(openai_form) == _result(placeholder_form)


def test_a_raw_generate_call_with_a_data_url_part_means_the_same(served: Any) -> None:
    import json

    import requests

    s = served("qwen3_omni")
    messages = _user({"type": "text", "text": "What is this?"},
                     {"type": "image_url", "image_url": {"url": _data_url("image/png", PNG)}})
    form = {"messages": (None, json.dumps(messages)), "streaming": (None, "false"),
            "model_kwargs": (None, json.dumps(QWEN))}
    answer = requests.post(s.url + "/generate", files=form, timeout=120)
    assert answer.status_code == 200, answer.text
    local = s.engine.generate(messages=messages, **QWEN)
    assert isinstance(local, GenerateResult)
    assert _result(GenerateResult.from_json(answer.json())) == _result(local)
