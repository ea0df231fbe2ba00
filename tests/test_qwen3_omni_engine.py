"""Engine("qwen3_omni", weights="tiny"): chat with text and speech, streaming, batching and typed errors."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from mstar.errors import MediaError, UnknownVoiceError, UnsupportedModalityError
from mstar.types import AudioBuffer, AudioChunk, Finished, TextChunk


@pytest.fixture(scope="module")
def engine() -> Any:
    import mstar

    eng = mstar.Engine("qwen3_omni", weights="tiny", device="cpu")
    yield eng
    eng.close()


def test_chat_messages_answer_with_text(engine: Any) -> None:
    res = engine.chat(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}],
        max_output_tokens=8,
        seed=3,
    )
    assert res.text and res.audio is None
    assert res.finish_reason in ("stop", "length")


@pytest.mark.slow
def test_chat_with_audio_output_returns_text_and_24khz_speech(engine: Any) -> None:
    res = engine.chat(
        "Say something.", output_modalities=("text", "audio"), max_output_tokens=6, talker_max_output_tokens=12, seed=5
    )
    assert res.text
    assert isinstance(res.audio, AudioBuffer) and res.audio.sample_rate == 24000
    assert len(res.audio) > 0


@pytest.mark.slow
def test_streaming_yields_audio_chunks_before_the_text_is_done(engine: Any) -> None:
    talker = engine.runner.talker
    talker.code2wav_chunk = 4  # small chunks so the tiny run streams several pieces
    try:
        events = list(
            engine.stream(
                text="Tell me a story.",
                output_modalities=("text", "audio"),
                max_output_tokens=16,
                talker_max_output_tokens=24,
                seed=7,
                talker_temperature=0.0,
            )
        )
    finally:
        talker.code2wav_chunk = type(talker).code2wav_chunk
    kinds = [type(e) for e in events]
    assert kinds[-1] is Finished
    audio_at = [i for i, k in enumerate(kinds) if k is AudioChunk]
    text_at = [i for i, k in enumerate(kinds) if k is TextChunk]
    assert len(audio_at) >= 2
    assert audio_at[0] < text_at[-1], "the first audio should arrive while the Thinker is still writing"


@pytest.mark.slow
def test_concurrent_requests_share_decode_steps_and_keep_their_seeded_results(engine: Any) -> None:
    runner = engine.runner
    sizes: list[int] = []
    original = runner.model.thinker.forward_embeds

    def spy(x: Any, *a: Any, **kw: Any) -> Any:
        sizes.append(x.shape[0])
        return original(x, *a, **kw)

    prompts = ["one", "two two", "three three three"]
    solo = [engine.chat(p, max_output_tokens=10, seed=11).text for p in prompts]
    runner.model.thinker.forward_embeds = spy
    results: dict[int, str] = {}
    try:
        streams = [engine.stream(text=p, max_output_tokens=10, seed=11) for p in prompts]

        def read(i: int) -> None:
            results[i] = "".join(e.text for e in streams[i] if isinstance(e, TextChunk))

        threads = [threading.Thread(target=read, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        del runner.model.thinker.forward_embeds
    assert max(sizes) > 1, "decode steps should batch the requests"
    assert [results[i] for i in range(len(prompts))] == solo


@pytest.mark.slow
def test_media_requests_batched_together_match_their_solo_runs(engine: Any) -> None:
    import io

    import numpy as np
    import soundfile as sf
    from PIL import Image

    png = io.BytesIO()
    Image.fromarray(np.full((40, 70, 3), 120, np.uint8)).save(png, format="PNG")
    wav = io.BytesIO()
    sf.write(wav, (0.2 * np.sin(np.arange(20000) / 9.0)).astype(np.float32), 16000, format="WAV")
    jobs = [
        {"text": "look", "images": ("a.png", png.getvalue())},
        {"text": "listen", "audio": ("a.wav", wav.getvalue())},
        {"text": "both", "images": ("a.png", png.getvalue()), "audio": ("a.wav", wav.getvalue())},
    ]
    solo = [engine.generate(max_output_tokens=6, seed=2, **job).text for job in jobs]
    streams = [engine.stream(max_output_tokens=6, seed=2, **job) for job in jobs]
    together = ["".join(e.text for e in s if isinstance(e, TextChunk)) for s in streams]
    assert together == solo


@pytest.mark.slow
def test_concurrent_speech_requests_match_their_solo_audio(engine: Any) -> None:
    prompts = ["first voice", "second, longer voice"]
    kw: dict[str, Any] = {
        "output_modalities": ("text", "audio"),
        "max_output_tokens": 5,
        "talker_max_output_tokens": 14,
    }
    solo = [engine.generate(text=p, seed=21, **kw) for p in prompts]
    streams = [engine.stream(text=p, seed=21, **kw) for p in prompts]
    together = [AudioBuffer.from_chunks([e for e in s if isinstance(e, AudioChunk)]) for s in streams]
    for alone, batched in zip(solo, together, strict=True):
        assert alone.audio is not None and batched is not None
        assert alone.audio.pcm == batched.pcm


def test_closing_a_speech_stream_cancels_it_and_frees_its_slots(engine: Any) -> None:
    import time

    stream = engine.stream(
        text="talk for a long time",
        output_modalities=("text", "audio"),
        max_output_tokens=400,
        talker_max_output_tokens=400,
        seed=1,
    )
    first = next(iter(stream))
    assert isinstance(first, (TextChunk, AudioChunk))
    stream.close()
    deadline = time.monotonic() + 20
    # kv_slots_used adds up the Thinker's and the Talker's caches: 0 means both are free.
    while time.monotonic() < deadline and engine.stats()["kv_slots_used"]:
        time.sleep(0.05)
    assert engine.stats()["kv_slots_used"] == 0


@pytest.mark.slow
def test_a_failing_prefill_fails_only_its_own_request(engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from mstar.errors import ModelError

    thinker = engine.runner.thinker
    original = thinker.encode_media
    marker = list(b"boom")

    def flaky(states: list[Any]) -> Any:
        for st in states:
            ids = st.enc.ids
            if any(ids[i : i + 4] == marker for i in range(len(ids))):
                raise RuntimeError("encoder exploded")
        return original(states)

    monkeypatch.setattr(thinker, "encode_media", flaky)
    good = engine.stream(text="fine", max_output_tokens=40, seed=1)
    first = next(good)  # "good" is decoding now; the bad prefill lands while it runs
    bad = engine.stream(text="boom", max_output_tokens=4, seed=1)
    with pytest.raises(ModelError):
        list(bad)
    rest = list(good)
    assert isinstance(first, TextChunk) and isinstance(rest[-1], Finished)


def test_a_prompt_longer_than_the_cache_is_refused_up_front(engine: Any) -> None:
    from mstar.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError):
        engine.chat("x" * (engine.runner.sizing.max_seq_len + 10))


def test_unknown_voice_lists_the_valid_ones(engine: Any) -> None:
    with pytest.raises(UnknownVoiceError) as info:
        engine.chat("hi", output_modalities=("text", "audio"), voice="Bob")
    assert {"Ethan", "Chelsie", "Aiden"} <= set(info.value.available)


def test_image_output_is_refused(engine: Any) -> None:
    with pytest.raises(UnsupportedModalityError):
        engine.generate(text="draw a cat", output_modalities=("image",))


@pytest.mark.parametrize(
    ("kind", "name"),
    [("images", "broken.png"), ("audio", "broken.wav"), ("video", "broken.mp4")],
)
def test_corrupt_media_raise_media_error(engine: Any, kind: str, name: str) -> None:
    with pytest.raises(MediaError):
        engine.generate(text="what is this?", **{kind: (name, b"\x00\x01not really media" * 8)})


def test_video_without_a_video_stream_raises_media_error(engine: Any) -> None:
    import io

    import numpy as np
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.zeros(1600, np.float32), 16000, format="WAV")
    with pytest.raises(MediaError):
        engine.generate(text="what is this?", video=("clip.mp4", buf.getvalue()))


def test_message_media_parts_must_exist(engine: Any) -> None:
    from mstar.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError):
        engine.chat([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}])


def test_speech_stats_count_both_caches_and_every_stage(engine: Any) -> None:
    import time

    engine.chat("hi", output_modalities=("text", "audio"), max_output_tokens=4, talker_max_output_tokens=8, seed=4)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and engine.stats()["kv_slots_used"]:
        time.sleep(0.05)
    stats = engine.stats()
    runner = engine.runner
    assert stats["kv_slots_used"] == 0
    assert stats["kv_slots_total"] == runner.thinker.cache.num_slots + runner.talker.cache.num_slots
    assert stats["kv_bytes"] == runner.thinker.cache.nbytes + runner.talker.cache.nbytes + runner.talker.cp_cache.nbytes
    stages = ("thinker_prefill", "thinker_decode", "talker_prefill", "talker_decode", "code_predictor", "code2wav")
    assert all(stats["forwards"].get(name, 0) >= 1 for name in stages)


def test_kv_slots_and_lengths_come_from_the_settings() -> None:
    from mstar.errors import InvalidParameterError
    from mstar.models.qwen3_omni.config import TINY_CONFIG
    from mstar.models.qwen3_omni.runner import Qwen3OmniRunner
    from mstar.settings import RunnerSettings

    runner = Qwen3OmniRunner(weights="tiny", settings=RunnerSettings(max_batch_size=2, max_seq_len=512))
    assert (runner.sizing.max_batch_size, runner.sizing.max_seq_len) == (2, 512)
    assert runner.talker is not None
    for cache in (runner.thinker.cache, runner.talker.cache):
        assert (cache.num_slots, cache.max_len) == (2, 512)
    assert runner.stats().kv_slots_total == 4
    # Unset, the length is the family default capped at the checkpoint's positions; set past them, refused.
    limit = TINY_CONFIG["thinker_config"]["text_config"]["max_position_embeddings"]
    assert Qwen3OmniRunner(weights="tiny", settings=RunnerSettings()).sizing.max_seq_len == min(8192, limit)
    with pytest.raises(InvalidParameterError):
        Qwen3OmniRunner(weights="tiny", settings=RunnerSettings(max_seq_len=limit + 1))


# --------------------------------------------------------------------------- use_audio_in_video


@pytest.fixture(scope="module")
def small_video_budget() -> Any:
    """A small pixel budget keeps the tiny video runs fast (the layout is what these tests look at)."""
    from mstar.models.qwen3_omni import processor

    old = processor.VIDEO_MIN_PIXELS
    processor.VIDEO_MIN_PIXELS = 64 * 64
    yield
    processor.VIDEO_MIN_PIXELS = old


def _video_inputs(data: bytes) -> Any:
    from mstar.media import MediaItem
    from mstar.request import RequestInputs

    return RequestInputs(text="What do you hear?", video=[MediaItem("clip.mp4", data, "video")])


@pytest.mark.slow
def test_use_audio_in_video_hears_the_track_between_the_frames(engine: Any, small_video_budget: Any) -> None:
    from tests.helpers.media import make_mp4_with_audio

    runner = engine.runner
    clip = make_mp4_with_audio(4, 64, 2)
    inputs = _video_inputs(clip)
    plain = runner.prepare(inputs, ("text",), {})
    heard = runner.prepare(inputs, ("text",), {"use_audio_in_video": True})
    audio_pad, video_pad = (runner.cfg["thinker_config"][k] for k in ("audio_token_id", "video_token_id"))
    assert audio_pad not in plain.ids and not plain.audios
    (track,) = heard.audios
    assert heard.ids.count(audio_pad) == track.num_tokens and heard.ids.count(video_pad) == plain.ids.count(video_pad)
    # Interleaved by time: some audio tokens lie between the video's first and last tokens.
    first, last = heard.ids.index(video_pad), len(heard.ids) - 1 - heard.ids[::-1].index(video_pad)
    assert audio_pad in heard.ids[first:last]
    before = engine.stats()["forwards"].get("audio_encoder", 0)
    res = engine.generate(video=("clip.mp4", clip), text="What do you hear?", use_audio_in_video=True, max_output_tokens=3, seed=2)
    assert res.text and res.usage.input_tokens == len(heard.ids)
    assert engine.stats()["forwards"]["audio_encoder"] == before + 1


def test_use_audio_in_video_on_a_silent_clip_sees_the_frames_only(engine: Any, small_video_budget: Any) -> None:
    from tests.helpers.media import make_mp4

    inputs = _video_inputs(make_mp4(4, 64, 64))
    runner = engine.runner
    assert runner.prepare(inputs, ("text",), {"use_audio_in_video": True}).ids == runner.prepare(inputs, ("text",), {}).ids


@pytest.mark.slow
def test_use_audio_in_video_over_generate_and_openai_chat(engine: Any, small_video_budget: Any, tmp_path: Any) -> None:
    import base64

    import openai

    import mstar
    from mstar.server import create_app
    from tests.helpers.media import make_mp4_with_audio
    from tests.helpers.servers import ServerThread

    clip = make_mp4_with_audio(4, 64, 2)
    kw: dict[str, Any] = {"max_output_tokens": 3, "seed": 6}
    local = engine.generate(text="Listen.", video=("clip.mp4", clip), use_audio_in_video=True, **kw)
    plain = engine.generate(text="Listen.", video=("clip.mp4", clip), **kw)
    assert local.usage.input_tokens > plain.usage.input_tokens
    with ServerThread(create_app(engine, upload_dir=tmp_path)) as srv:
        sdk = mstar.MStarClient(srv.url, timeout=60)
        served = sdk.generate(text="Listen.", video=("clip.mp4", clip), use_audio_in_video=True, **kw)
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=60)
        url = "data:video/mp4;base64," + base64.b64encode(clip).decode()
        chat = client.chat.completions.create(
            model="qwen3_omni",
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": "Listen."}],  # type: ignore[list-item, misc]
                }
            ],
            max_tokens=3,
            extra_body={"seed": 6, "use_audio_in_video": True},
        )
    assert served.text == local.text and served.usage.input_tokens == local.usage.input_tokens
    assert chat.usage is not None and chat.usage.prompt_tokens == local.usage.input_tokens
    assert chat.choices[0].message.content == local.text
