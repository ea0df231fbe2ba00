"""BAGEL through the Engine with tiny random weights: chat, text-to-image, editing, streaming, cancel."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator

import pytest
from PIL import Image

from mstar.engine import Engine
from mstar.errors import InvalidParameterError, InvalidRequestError, UnknownParameterError
from mstar.media import MediaItem
from mstar.stats import Activity
from mstar.types import Finished, ImageChunk, Progress, TextChunk


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    eng = Engine("bagel", weights="tiny", device="cpu")
    yield eng
    eng.close()


class _Calls(Activity):
    """The runner's Activity, also keeping every call in order (the schema keeps totals and the last call)."""

    __slots__ = ("calls",)

    def __init__(self, base: Activity) -> None:
        super().__init__(dict(base.forwards), dict(base.rows), dict(base.last_rows))
        self.calls: list[tuple[str, int]] = []

    def record(self, component: str, rows: int) -> None:
        Activity.record(self, component, rows)
        self.calls.append((component, rows))

    def rows_of(self, component: str) -> list[int]:
        return [r for c, r in self.calls if c == component]


@pytest.fixture
def calls(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> _Calls:
    spy = _Calls(engine.runner.activity)
    monkeypatch.setattr(engine.runner, "activity", spy)
    return spy


def _png_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        assert img.format == "PNG" and img.mode == "RGB"
        return img.size


def _source_png(w: int = 80, h: int = 48) -> bytes:
    img = Image.new("RGB", (w, h))
    img.putdata([((x * 3) % 256, (y * 5) % 256, (x * y) % 256) for y in range(h) for x in range(w)])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_text_to_image_returns_png_of_requested_size(engine: Engine) -> None:
    png = engine.generate_image("a red cube", width=64, height=32, seed=3, num_timesteps=4)
    assert _png_size(png) == (64, 32)


def test_same_seed_gives_identical_png_and_other_seed_differs(engine: Engine) -> None:
    a = engine.generate_image("a cat", width=48, height=48, seed=11, num_timesteps=4)
    b = engine.generate_image("a cat", width=48, height=48, seed=11, num_timesteps=4)
    c = engine.generate_image("a cat", width=48, height=48, seed=12, num_timesteps=4)
    assert a == b
    assert a != c


def test_chat_writes_text(engine: Engine) -> None:
    res = engine.chat("Describe a sunset.", max_output_tokens=6, seed=1)
    assert res.text
    assert res.finish_reason in ("stop", "length")
    assert 1 <= res.usage.output_tokens <= 6
    assert res.usage.input_tokens > 0


def test_chat_about_an_image_uses_the_vit(engine: Engine) -> None:
    res = engine.chat("What is in the picture?", images=_source_png(), max_output_tokens=4, seed=1)
    plain = engine.chat("What is in the picture?", max_output_tokens=4, seed=1)
    assert res.text and plain.text
    assert res.usage.input_tokens > plain.usage.input_tokens  # the image's tokens entered the context


def test_chat_messages_place_images_in_order(engine: Engine) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
    ]
    res = engine.chat(messages, images=_source_png(), max_output_tokens=3, seed=1)
    assert res.text and res.usage.output_tokens == 3
    with pytest.raises(InvalidRequestError, match="only 0 image"):
        engine.chat(messages, max_output_tokens=3)


def test_edit_returns_png_of_the_resized_source(engine: Engine) -> None:
    out = engine.edit_image(_source_png(80, 48), "make it blue", seed=5, num_timesteps=3)
    # The source is resized like the reference's VAE transform (tiny: short side >= 32, long side <= 128, stride 16).
    assert _png_size(out) == (80, 48)
    out2 = engine.edit_image(_source_png(80, 48), "make it blue", seed=5, num_timesteps=3, width=32, height=32)
    assert _png_size(out2) == (32, 32)


def test_edit_guidance_runs_three_branches_in_one_forward(engine: Engine, calls: _Calls) -> None:
    before = engine.stats()
    engine.edit_image(_source_png(), "add a hat", seed=1, num_timesteps=6, width=32, height=32, cfg_interval=[0.7, 1.0])
    after = engine.stats()
    # 5 denoising steps at shifted times 1, .92, .82, .67, .43: the first three lie in (0.7, 1] and carry
    # the conditional, text-guidance and image-guidance rows together; the rest run the conditional row alone.
    assert calls.rows_of("denoise") == [3, 3, 3, 1, 1]
    assert after["forwards"]["denoise"] - before["forwards"]["denoise"] == 5
    assert after["rows"]["denoise"] - before["rows"]["denoise"] == 11
    assert after["last_rows"]["denoise"] == 1
    assert calls.calls == [("prefill", 1)] + [("denoise", r) for r in (3, 3, 3, 1, 1)] + [("vae", 1)]


def test_stream_shows_one_progress_per_step_before_the_image(engine: Engine) -> None:
    events = list(
        engine.stream(text="a tree", output_modalities=["image"], width=32, height=32, num_timesteps=6, seed=2)
    )
    kinds = [type(e).__name__ for e in events]
    progress = [e for e in events if isinstance(e, Progress)]
    # 6 grid points: 5 Euler steps, then the decode at t = 0 completes step 6 of 6.
    assert [(p.step, p.total, p.stage) for p in progress] == [(i, 6, "denoise") for i in range(1, 7)]
    assert kinds[-2:] == ["ImageChunk", "Finished"]
    assert kinds.index("ImageChunk") > max(i for i, k in enumerate(kinds) if k == "Progress")


def test_cancel_mid_denoise_stops_within_one_step(engine: Engine) -> None:
    stream = engine.stream(
        text="a long one", output_modalities=["image"], width=32, height=32, num_timesteps=400, seed=4
    )
    first = next(ev for ev in stream if isinstance(ev, Progress))
    assert first.step == 1
    engine.cancel(stream.request_id)
    rest = list(stream)
    assert isinstance(rest[-1], Finished) and rest[-1].finish_reason == "cancelled"
    assert not any(isinstance(e, ImageChunk) for e in rest)
    assert sum(isinstance(e, Progress) for e in rest) < 50
    steps, _ = engine.stats()["cancel_latencies"][-1]
    assert steps <= 1


def test_concurrent_image_requests_share_denoising_forwards(engine: Engine, calls: _Calls) -> None:
    alone = engine.generate_image("two at once", width=32, height=32, seed=21, num_timesteps=30)
    alone_rows = calls.rows_of("denoise")
    assert len(alone_rows) == 29 and set(alone_rows) == {1, 2}  # guided steps carry two rows, the others one
    calls.calls.clear()
    before = engine.stats()
    results: dict[int, bytes] = {}

    def run(seed: int, width: int) -> None:
        results[seed] = engine.generate_image("two at once", width=width, height=32, seed=seed, num_timesteps=30)

    threads = [threading.Thread(target=run, args=a) for a in ((21, 32), (22, 48))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert _png_size(results[21]) == (32, 32) and _png_size(results[22]) == (48, 32)
    # Two requests, each with a conditional and a text-guidance row: some forward carried all four rows.
    assert max(calls.rows_of("denoise")) == 4
    after = engine.stats()
    assert after["rows"]["denoise"] - before["rows"]["denoise"] == 2 * sum(alone_rows)
    assert after["forwards"]["denoise"] - before["forwards"]["denoise"] == len(calls.rows_of("denoise")) < 2 * 29
    # Sharing a (padded) batch with another request does not change a seeded result.
    assert results[21] == alone


def test_think_mode_writes_a_plan_then_paints(engine: Engine) -> None:
    events = list(
        engine.stream(
            text="a boat",
            output_modalities=["text", "image"],
            think_mode=True,
            max_output_tokens=5,
            width=32,
            height=32,
            num_timesteps=3,
            seed=1,
        )
    )
    kinds = [type(e).__name__ for e in events]
    assert "TextChunk" in kinds and "ImageChunk" in kinds
    assert kinds.index("TextChunk") < kinds.index("Progress") < kinds.index("ImageChunk")
    assert "".join(e.text for e in events if isinstance(e, TextChunk))


def test_sizes_are_validated(engine: Engine) -> None:
    with pytest.raises(InvalidParameterError, match="multiple of 16"):
        engine.generate_image("x", width=40, height=32)
    with pytest.raises(InvalidParameterError, match="between 16 and 128"):
        engine.generate_image("x", width=256, height=256)


def test_bad_kwargs_are_refused(engine: Engine) -> None:
    with pytest.raises(UnknownParameterError):
        engine.generate_image("x", width=32, height=32, guidance=3)
    with pytest.raises(InvalidParameterError):
        engine.generate_image("x", width=32, height=32, cfg_renorm_type="sideways")
    with pytest.raises(InvalidParameterError):
        engine.generate_image("x", width=32, height=32, cfg_interval=[0.4])
    with pytest.raises(InvalidParameterError):
        engine.generate_image("x", width=32, height=32, cfg_interval=[0.9, 0.4])
    with pytest.raises(InvalidParameterError, match="image output only"):
        engine.chat("hi", width=32)
    with pytest.raises(InvalidRequestError):
        engine.generate(images=_source_png(), output_modalities=["image"])  # an edit needs an instruction


def test_transparent_pixels_become_white(engine: Engine) -> None:
    from mstar.models.bagel.prepare import decode_on_white

    img = Image.new("RGBA", (4, 2), (10, 20, 30, 0))
    img.putpixel((0, 0), (10, 20, 30, 255))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    rgb = decode_on_white(MediaItem("a.png", buf.getvalue(), "image"))
    assert rgb[0, 0].tolist() == [10, 20, 30]
    assert rgb[1, 3].tolist() == [255, 255, 255]


def test_requests_wait_for_kv_slots_and_give_them_back(engine: Engine) -> None:
    import time

    src = _source_png(32, 32)
    done: dict[int, bytes] = {}

    def run(i: int) -> None:
        done[i] = engine.edit_image(src, f"edit {i}", num_timesteps=3, seed=i)

    # Each edit holds 3 slots (conditional, without text, without image); 7 of them exceed the 12 slots.
    threads = [threading.Thread(target=run, args=(i,)) for i in range(7)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(done) == 7 and all(_png_size(p) == (32, 32) for p in done.values())
    deadline = time.monotonic() + 5
    while engine.stats()["kv_slots_used"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats()["kv_slots_used"] == 0


def test_params_hold_user_kwargs_and_prepared_holds_the_rest(engine: Engine) -> None:
    from mstar.models.bagel.prepare import BagelPrepared
    from mstar.request import RequestInputs

    runner = engine.runner
    inputs = RequestInputs(text="make it blue", images=[_media(_source_png(80, 48))])
    params = runner.validate(inputs, ("image",), {"num_timesteps": 3, "cfg_interval": [0, 1]})
    assert set(params) == set(runner.params)  # every accepted kwarg, nothing else
    assert params["cfg_img_scale"] == 2.0 and params["cfg_interval"] == [0.0, 1.0]  # defaults of an edit
    prep = runner.prepare(inputs, ("image",), params)
    assert isinstance(prep, BagelPrepared)
    assert prep.mode == "image" and prep.size == (80, 48)
    assert [p.kind for p in prep.parts] == ["image", "text"]
    (img,) = prep.images
    assert img.vae is not None and tuple(img.vae.shape) == (3, 48, 80)
    # The tiny ViT takes at least 28 px a side, in 14 px patches; VAE latents are 16 px tokens.
    _, vh, vw = img.vit.shape
    assert prep.context_len == (vh // 14) * (vw // 14) + 2 + 5 * 3 + 2 + len(b"make it blue") + 2
    chat = runner.prepare(RequestInputs(text="hi"), ("text",), runner.validate(RequestInputs(text="hi"), ("text",), {}))
    assert chat.mode == "chat" and chat.size is None and chat.images == ()
    think = runner.validate(RequestInputs(text="hi"), ("text",), {"think_mode": True})
    assert runner.prepare(RequestInputs(text="hi"), ("text",), think).parts[0].text.startswith("You should first think")


def _media(data: bytes) -> MediaItem:
    return MediaItem("src.png", data, "image")


def test_sizing_comes_from_the_engine_settings(engine: Engine) -> None:
    # The tiny model's defaults: 12 KV slots of 2048 positions; the scheduler runs at most that many requests.
    assert (engine.runner.sizing.max_batch_size, engine.runner.sizing.max_seq_len) == (12, 2048)
    assert engine.stats()["kv_slots_total"] == 12 and engine.scheduler.max_active == 12
    with Engine("bagel", weights="tiny", device="cpu", max_batch_size=2, max_seq_len=96) as small:
        assert small.runner.sizing.max_batch_size == 2 and small.runner.sizing.max_seq_len == 96
        stats = small.stats()
        assert stats["kv_slots_total"] == 2 and stats["kv_slots_used"] == 0 and stats["kv_bytes"] > 0
        # A text-guided picture holds two contexts and fits; an edit needs three and never can.
        assert _png_size(small.generate_image("x", width=16, height=16, seed=1, num_timesteps=2)) == (16, 16)
        with pytest.raises(InvalidRequestError, match="needs 3 KV slots; the cache has 2"):
            small.edit_image(_source_png(32, 32), "y", width=16, height=16, num_timesteps=2)
        with pytest.raises(InvalidRequestError, match="holds 96 per request"):
            small.chat("a" * 100)
