"""Orpheus end to end on tiny weights: WAV output, seeds, streaming, errors, batching, cancel."""

from __future__ import annotations

import io
import time
import wave
from collections.abc import Iterator

import pytest
import torch

from mstar.engine import Engine
from mstar.errors import UnknownParameterError, UnknownVoiceError, UnsupportedModalityError
from mstar.settings import RunnerSettings
from mstar.types import AudioChunk, Finished

FRAME = 2048  # samples per SNAC frame at 24 kHz


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: threads only contend on a busy 2-core machine
    eng = Engine("orpheus", weights="tiny", device="cpu")
    yield eng
    eng.close()
    torch.set_num_threads(before)


def _speak(engine: Engine, seed: int, tokens: int = 42, text: str = "Hello there") -> bytes:
    return engine.tts(text, voice="tara", seed=seed, max_output_tokens=tokens).pcm


def test_tiny_tts_writes_a_valid_24khz_mono_wav(engine: Engine, tmp_path) -> None:
    audio = engine.tts("Hello, world.", voice="tara", seed=0, max_output_tokens=42)
    path = audio.to_wav(tmp_path / "out.wav")
    with wave.open(str(path)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (24000, 1, 2)
        frames = w.readframes(w.getnframes())
    # 42 tokens = 6 frames -> windows end at frames 4, 5, 6 -> 3 x 2048 samples.
    assert len(frames) == 3 * FRAME * 2
    assert max(abs(s) for s in memoryview(frames).cast("h")) > 0


@pytest.mark.slow
def test_default_tiny_tts_runs_to_the_context_and_reports_length(engine: Engine) -> None:
    res = engine.generate(text="Hi", output_modalities=("audio",), seed=9)
    assert res.finish_reason == "length"
    assert res.audio is not None and len(res.audio) > 10 * FRAME
    wav = io.BytesIO(res.audio.wav_bytes())
    with wave.open(wav) as w:
        assert w.getnframes() == len(res.audio)


@pytest.mark.slow
def test_same_seed_gives_identical_samples_and_another_seed_differs(engine: Engine) -> None:
    a, b, c = _speak(engine, 11), _speak(engine, 11), _speak(engine, 12)
    assert a == b
    assert a != c


@pytest.mark.slow
def test_stream_yields_audio_chunks_before_finished_and_before_the_last_token(engine: Engine) -> None:
    events = engine.stream(text="Streaming test", output_modalities=("audio",), seed=3, max_output_tokens=70)
    first_audio_at = None
    seen = []
    for ev in events:
        seen.append(ev)
        if isinstance(ev, AudioChunk) and first_audio_at is None:
            first_audio_at = len(seen)
            assert engine.runner.activity.forwards["decode"] > 0
    assert isinstance(seen[-1], Finished) and seen[-1].finish_reason == "length"
    chunks = [e for e in seen if isinstance(e, AudioChunk)]
    assert first_audio_at == 1 and len(chunks) == 70 // 7 - 3
    assert all(c.sample_rate == 24000 and c.num_channels == 1 and len(c) == FRAME for c in chunks)
    # The first chunk left when frame 4 completed (token 28), long before token 70.
    assert chunks[0].metadata["frame"] == 1
    assert seen[-1].usage.output_tokens == 70


def test_unknown_voice_lists_the_voices(engine: Engine) -> None:
    with pytest.raises(UnknownVoiceError) as err:
        engine.tts("Hi", voice="bob")
    for v in ("tara", "zoe", "zac", "jess", "leo", "mia", "julia", "leah"):
        assert v in str(err.value)


def test_unknown_kwarg_is_refused(engine: Engine) -> None:
    with pytest.raises(UnknownParameterError) as err:
        engine.tts("Hi", speed=2.0)
    assert "voice" in str(err.value)


@pytest.mark.parametrize("modality", ["image", "text"])
def test_orpheus_cannot_output_image_or_text(engine: Engine, modality: str) -> None:
    with pytest.raises(UnsupportedModalityError):
        engine.generate(text="Hi", output_modalities=(modality,))


@pytest.mark.slow
def test_two_concurrent_requests_share_decode_forwards_and_match_running_alone(engine: Engine) -> None:
    texts, seeds = ["First request", "Second, longer request"], [21, 22]
    alone = [_speak(engine, s, text=t) for t, s in zip(texts, seeds, strict=True)]
    # Drive a second runner directly so both requests are admitted in the same step.
    from mstar.models.orpheus.runner import OrpheusRunner

    runner = OrpheusRunner(weights="tiny", settings=RunnerSettings())
    reqs = []
    for t, s in zip(texts, seeds, strict=True):
        req = engine._build_request(
            text=t,
            images=None,
            audio=None,
            video=None,
            messages=None,
            output_modalities=("audio",),
            input_modalities=None,
            request_id=None,
            model_kwargs={"seed": s, "voice": "tara", "max_output_tokens": 42},
        )
        assert runner.admit(req)
        reqs.append(req)
    assert runner.stats().kv_slots_used == 2
    while not all(r.done for r in reqs):
        runner.step([r for r in reqs if not r.done])
    # 42 tokens each: the first comes out of the shared prefill, the other 41 from shared decode steps.
    assert runner.activity.forwards == {"prefill": 1, "decode": 41, "snac": 3}
    assert runner.activity.rows["snac"] == 6
    batched = []
    for r in reqs:
        events = []
        while not r.events.empty():
            events.append(r.events.get())
        assert isinstance(events[-1], Finished) and events[-1].finish_reason == "length"
        batched.append(b"".join(e.pcm for e in events if isinstance(e, AudioChunk)))
        runner.release(r)
    assert batched == alone
    assert runner.stats().kv_slots_used == 0


def _wait_for_free_slots(engine: Engine) -> None:
    # Finished reaches the caller just before the scheduler releases the slot.
    deadline = time.monotonic() + 5
    while engine.stats()["kv_slots_used"] and time.monotonic() < deadline:
        time.sleep(0.01)


def test_cancel_mid_stream_stops_within_a_step_and_frees_the_slot(engine: Engine) -> None:
    _wait_for_free_slots(engine)
    events = engine.stream(text="Cancel me", output_modalities=("audio",), seed=4, max_output_tokens=150)
    for ev in events:
        if isinstance(ev, AudioChunk):
            break
    assert engine.stats()["kv_slots_used"] == 1
    engine.cancel(events.request_id)
    rest = list(events)
    assert isinstance(rest[-1], Finished) and rest[-1].finish_reason == "cancelled"
    assert rest[-1].usage.output_tokens < 150
    _wait_for_free_slots(engine)
    stats = engine.stats()
    assert stats["kv_slots_used"] == 0 and stats["kv_slots_total"] == 16 and stats["kv_bytes"] > 0
    steps, _ = stats["cancel_latencies"][-1]
    assert steps <= 1


@pytest.mark.slow
def test_chat_messages_speak_the_last_user_message(engine: Engine) -> None:
    by_text = engine.tts("Say this", seed=5, max_output_tokens=28)
    res = engine.generate(
        messages=[{"role": "user", "content": "Say this"}], output_modalities=("audio",), seed=5, max_output_tokens=28
    )
    assert res.audio is not None and res.audio.pcm == by_text.pcm and len(by_text) == 2048


def _direct(engine: Engine, runner, text: str, seed: int, tokens: int):
    req = engine._build_request(
        text=text,
        images=None,
        audio=None,
        video=None,
        messages=None,
        output_modalities=("audio",),
        input_modalities=None,
        request_id=None,
        model_kwargs={"seed": seed, "max_output_tokens": tokens},
    )
    assert runner.admit(req)
    return req


def _drain(req) -> tuple[list, bytes]:
    events = []
    while not req.events.empty():
        events.append(req.events.get())
    return events, b"".join(e.pcm for e in events if isinstance(e, AudioChunk))


@pytest.mark.slow
def test_chunked_prefill_keeps_running_requests_decoding_and_changes_no_sample(engine: Engine) -> None:
    from mstar.models.orpheus.runner import OrpheusRunner

    want = _speak(engine, 31, tokens=35, text="A rather long prompt that needs several chunks")
    runner = OrpheusRunner(weights="tiny", settings=RunnerSettings(prefill_chunk=8))
    first = _direct(engine, runner, "Hi", 1, 60)
    for _ in range(3):  # "tara: Hi" + markers = 14 tokens: 2 prefill steps, then decoding
        runner.step([first])
    assert first.state.phase == "decode"
    second = _direct(engine, runner, "A rather long prompt that needs several chunks", 31, 35)
    prompt_len = len(second.state.prompt)
    steps = 0
    while second.state.phase == "prefill":
        before = first.output_tokens
        runner.step([first, second])
        steps += 1
        assert first.output_tokens == before + 1  # never stalled by the other's prefill
    assert steps == -(-prompt_len // 8)
    while not second.done:
        runner.step([r for r in (first, second) if not r.done])
    assert _drain(second)[1] == want


def test_stop_token_finishes_with_stop_after_the_audio_so_far(engine: Engine) -> None:
    from mstar.models.orpheus.config import STOP_TOKEN
    from mstar.models.orpheus.runner import OrpheusRunner

    runner = OrpheusRunner(weights="tiny", settings=RunnerSettings())
    sample = runner._sample

    def stop_at_36(reqs, logits):
        toks = sample(reqs, logits)
        return [STOP_TOKEN if r.output_tokens == 35 else t for r, t in zip(reqs, toks, strict=True)]

    runner._sample = stop_at_36  # type: ignore[method-assign]
    req = _direct(engine, runner, "Stop soon", 2, 100)
    while not req.done:
        runner.step([req])
    events, pcm = _drain(req)
    assert isinstance(events[-1], Finished) and events[-1].finish_reason == "stop"
    assert events[-1].usage.output_tokens == 36 and len(pcm) == 2 * 2 * FRAME
