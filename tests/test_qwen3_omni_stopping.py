"""When a Qwen3-Omni request ends: each stage stops on its own end token or cap, speech-only requests
end with their speech, and the tiny variant's default caps make a default request end in seconds."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from mstar.request import RequestInputs

#: A generous hang guard: these requests take well under a second on a laptop CPU.
HANG_GUARD_S = 60.0


@pytest.fixture(scope="module")
def engine() -> Iterator[Any]:
    import mstar

    eng = mstar.Engine("qwen3_omni", weights="tiny", device="cpu")
    yield eng
    eng.close()


@pytest.fixture()
def speech_ends_after(engine: Any) -> Iterator[Any]:
    """``speech_ends_after(n)``: the Talker's codec head favours end-of-speech from its ``n + 1``-th frame on."""
    talker = engine.runner.talker
    eos = talker.tk_cfg["codec_eos_token_id"]
    calls: dict[str, int] = {"n": 0, "after": 0}

    def force(_module: Any, _args: Any, out: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] > calls["after"]:
            out = out.clone()
            out[..., eos] = 1e4
        return out

    def arm(frames: int) -> None:
        calls["n"], calls["after"] = 0, frames

    hook = talker.net.codec_head.register_forward_hook(force)
    yield arm
    hook.remove()


def test_tiny_caps_fill_in_what_the_user_left_unset(engine: Any) -> None:
    runner = engine.runner
    params = runner.validate(RequestInputs(text="Hello"), ("audio",), {})
    assert params["max_output_tokens"] == runner.TINY_CAPS["max_output_tokens"] == 32
    assert params["talker_max_output_tokens"] == runner.TINY_CAPS["talker_max_output_tokens"] == 25
    assert runner.validate(RequestInputs(text="Hello"), ("audio",), {"talker_max_output_tokens": 7})[
        "talker_max_output_tokens"
    ] == 7
    # The published checkpoint keeps the reference's Talker cap and the context as the Thinker's.
    assert runner.FULL_CAPS == {"max_output_tokens": None, "talker_max_output_tokens": 4096}


@pytest.mark.slow
def test_speech_only_hello_with_defaults_ends_in_seconds(engine: Any) -> None:
    start = time.monotonic()
    res = engine.generate(text="Hello", output_modalities=("audio",), seed=1)
    took = time.monotonic() - start
    assert took < HANG_GUARD_S, f"took {took:.1f} s"
    assert res.audio is not None and res.audio.sample_rate == 24000 and len(res.audio) > 0
    # Random weights never say end-of-speech: the Talker's cap ends the speech, and with it the request,
    # before the hidden text reaches its own cap.
    assert res.finish_reason == "length"
    assert res.usage.output_tokens < engine.runner.TINY_CAPS["max_output_tokens"]
    seconds = len(res.audio) / res.audio.sample_rate
    assert seconds < 2.5, f"{seconds:.2f} s of audio from 25 frames at 12.5 per second"


@pytest.mark.slow
def test_speech_only_request_ends_at_the_codec_end_of_speech(engine: Any, speech_ends_after: Any) -> None:
    speech_ends_after(3)
    res = engine.generate(
        text="Hello", output_modalities=("audio",), max_output_tokens=500, talker_temperature=0.0, seed=2
    )
    assert res.finish_reason == "stop"
    assert res.audio is not None and len(res.audio) > 0
    # The Thinker stopped with the speech (a step or two behind it), far below its cap of 500.
    assert res.usage.output_tokens <= 6
    assert res.usage.steps <= 6


@pytest.mark.slow
def test_text_keeps_going_after_the_speech_has_ended(engine: Any, speech_ends_after: Any) -> None:
    speech_ends_after(3)
    res = engine.generate(
        text="Hello",
        output_modalities=("text", "audio"),
        max_output_tokens=12,
        talker_temperature=0.0,
        seed=2,
    )
    assert res.usage.output_tokens == 12 and res.finish_reason == "length"
    assert res.text and res.audio is not None and len(res.audio) > 0


@pytest.mark.slow
def test_served_speech_only_hello_with_defaults_ends_in_seconds(engine: Any, tmp_path: Any) -> None:
    import mstar
    from mstar.server import create_app
    from tests.helpers.servers import ServerThread

    with ServerThread(create_app(engine, upload_dir=tmp_path)) as srv:
        client = mstar.MStarClient(srv.url, timeout=HANG_GUARD_S)
        start = time.monotonic()
        res = client.generate(text="Hello", output_modalities=("audio",), seed=1)
        took = time.monotonic() - start
    assert took < HANG_GUARD_S, f"took {took:.1f} s"
    assert res.audio is not None and res.audio.sample_rate == 24000 and len(res.audio) > 0
    local = engine.generate(text="Hello", output_modalities=("audio",), seed=1)
    assert local.audio is not None and res.audio.pcm == local.audio.pcm
