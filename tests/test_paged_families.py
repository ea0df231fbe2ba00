"""Qwen3-Omni, BAGEL and Pi0.5 on the paged KV cache.

Each family sizes its pool from ``kv_cache_tokens`` and admits a request only when the blocks of
its worst case fit beside what the running requests reserved: with a small pool requests wait
(never fail, never change), a request no pool of that size could hold is refused up front, and
nothing stays held afterwards. Qwen3-Omni's Thinker reuses cached blocks of a repeated text prefix
(system prompt, chat history) without changing the output; BAGEL's guidance contexts share blocks.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import mstar
from mstar.errors import InvalidRequestError
from mstar.request import Request, RequestInputs
from mstar.types import GenerateResult

# ---------------------------------------------------------------------------------------------- helpers


def _idle_stats(engine: mstar.Engine) -> dict[str, Any]:
    """The engine's stats once every request has been released."""
    deadline = time.monotonic() + 20
    while engine.stats()["inflight"] and time.monotonic() < deadline:
        time.sleep(0.01)
    return engine.stats()


def _together(engine: mstar.Engine, jobs: list[dict[str, Any]]) -> tuple[list[GenerateResult], int]:
    """Submit every job before the loop's first step runs; return the results and the most
    requests seen waiting for admission at any step."""
    submitted = threading.Event()
    waiting: list[int] = []

    def hook(req: Request) -> None:
        submitted.wait(10)
        waiting.append(engine.stats()["waiting"])

    engine.scheduler.fault_hook = hook
    try:
        streams = [engine.stream(**job) for job in jobs]
        submitted.set()
        results = [GenerateResult.from_events(s.request_id, list(s)) for s in streams]
    finally:
        engine.scheduler.fault_hook = None
    return results, max(waiting, default=0)


def _png(w: int, h: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- Qwen3-Omni

HISTORY: list[dict[str, Any]] = [
    {"role": "system", "content": "You are a careful assistant. Answer in one short sentence, politely."},
    {"role": "user", "content": "What is the tallest mountain on Earth, and where is it?"},
    {"role": "assistant", "content": "Mount Everest, on the border of Nepal and China."},
]


def _turn(question: str) -> list[dict[str, Any]]:
    return [*HISTORY, {"role": "user", "content": question}]


@pytest.fixture(scope="module")
def omni() -> Iterator[mstar.Engine]:
    eng = mstar.Engine("qwen3_omni", weights="tiny", device="cpu")
    yield eng
    eng.close()


@pytest.mark.slow
def test_qwen3_omni_small_pool_makes_requests_wait_and_changes_nothing(omni: mstar.Engine) -> None:
    speak = {"output_modalities": ("text", "audio"), "talker_max_output_tokens": 10}
    jobs: list[dict[str, Any]] = [
        {"text": f"question number {i}", "max_output_tokens": 20, "seed": 30 + i, **(speak if i == 1 else {})}
        for i in range(4)
    ]
    solo = [omni.generate(**job) for job in jobs]
    # 8 blocks of 16 positions per stage; each request may fill ~40 positions (3 blocks): two run at once.
    with mstar.Engine("qwen3_omni", weights="tiny", device="cpu", max_seq_len=128, kv_cache_tokens=128) as tight:
        runner: Any = tight.runner
        assert runner.thinker.cache.usable_blocks == 8 and runner.talker.cache.usable_blocks == 8
        together, waited = _together(tight, jobs)
        stats = _idle_stats(tight)
        assert runner.reserved == {"thinker": 0, "talker": 0}
    assert waited > 0
    assert stats["kv_blocks_total"] == 16 and stats["kv_blocks_used"] == 0 and stats["kv_slots_used"] == 0
    for alone, shared in zip(solo, together, strict=True):
        assert isinstance(alone, GenerateResult)
        assert (shared.text, shared.finish_reason, shared.usage.output_tokens) == (
            alone.text,
            alone.finish_reason,
            alone.usage.output_tokens,
        )
        assert (shared.audio is None) == (alone.audio is None)
        if alone.audio is not None and shared.audio is not None:
            assert shared.audio.pcm == alone.audio.pcm


def test_qwen3_omni_default_pool_holds_every_slot_at_full_length(omni: mstar.Engine) -> None:
    runner: Any = omni.runner
    size = runner.sizing
    for cache in (runner.thinker.cache, runner.talker.cache):
        assert cache.block_size == size.kv_block_size
        assert cache.usable_blocks == size.max_batch_size * -(-size.max_seq_len // size.kv_block_size)
    assert omni.stats()["kv_blocks_total"] == 2 * runner.thinker.cache.usable_blocks


def _chat(
    engine: mstar.Engine, messages: list[dict[str, Any]], max_output_tokens: int = 12, **kw: Any
) -> tuple[GenerateResult, int]:
    """A chat result and the prefix-cache hits it got."""
    before = engine.stats()["prefix_hit_tokens"]
    res = engine.chat(messages, max_output_tokens=max_output_tokens, **kw)
    assert isinstance(res, GenerateResult)
    return res, engine.stats()["prefix_hit_tokens"] - before


@pytest.mark.slow
def test_qwen3_omni_repeated_history_hits_the_prefix_cache_with_the_same_text() -> None:
    greedy: dict[str, Any] = {"thinker_temperature": 0.0, "seed": 1}
    sampled: dict[str, Any] = {"thinker_temperature": 1.0, "thinker_top_p": 0.95, "seed": 7}
    # Each engine answers one question from a cold cache (the reference) and then the other
    # question after the same system prompt and history (cached): the two are crossed.
    with mstar.Engine("qwen3_omni", weights="tiny", device="cpu") as first:
        greedy_cold, hits = _chat(first, _turn("And the deepest lake?"), **greedy)
        assert hits == 0
        sampled_warm, sampled_hits = _chat(first, _turn("And the longest river?"), **sampled)
    with mstar.Engine("qwen3_omni", weights="tiny", device="cpu") as second:
        sampled_cold, hits = _chat(second, _turn("And the longest river?"), **sampled)
        assert hits == 0
        greedy_warm, greedy_hits = _chat(second, _turn("And the deepest lake?"), **greedy)
        stats = _idle_stats(second)
        lake, river = (
            second.runner.prepare(RequestInputs(messages=_turn(q)), ("text",), {}).ids
            for q in ("And the deepest lake?", "And the longest river?")
        )
    # The hits are the full blocks the two prompts have in common (system prompt, history, the next turn's header).
    common = next(i for i, (a, b) in enumerate(zip(lake, river, strict=False)) if a != b)
    assert common > 100 and sampled_hits == greedy_hits == common // 16 * 16
    assert greedy_warm.text == greedy_cold.text and greedy_warm.usage.output_tokens == greedy_cold.usage.output_tokens
    assert sampled_warm.text == sampled_cold.text
    assert sampled_cold.text != greedy_cold.text  # the sampled run really sampled
    assert stats["kv_blocks_used"] == 0 and stats["prefix_queried_tokens"] > stats["prefix_hit_tokens"] > 0


def test_qwen3_omni_prefix_cache_stops_before_media_and_keeps_speech_unchanged(
    omni: mstar.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner: Any = omni.runner
    thinker = runner.thinker
    picture = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in this picture?"}]}
    speech: dict[str, Any] = {"output_modalities": ("text", "audio"), "talker_max_output_tokens": 10, "seed": 3}
    cases: list[tuple[list[dict[str, Any]], dict[str, Any]]] = [
        ([*HISTORY, picture], {"images": _png(40, 70, 1), "seed": 2}),
        ([*HISTORY, picture], {"images": _png(40, 70, 2), "seed": 2}),  # same ids, another image
        (_turn("Say it out loud."), speech),
    ]
    # The references: prefix matching off, so every prompt is prefilled from scratch.
    original = thinker.attach_prefix
    monkeypatch.setattr(thinker, "attach_prefix", lambda st: None)
    cold = [_chat(omni, messages, 6, **kw)[0] for messages, kw in cases]
    monkeypatch.setattr(thinker, "attach_prefix", original)
    omni.chat(_turn("warm the cache"), max_output_tokens=2, seed=0)
    for (messages, kw), ref in zip(cases, cold, strict=True):
        res, hits = _chat(omni, messages, 6, **kw)
        assert hits > 0
        assert res.text == ref.text and res.usage.output_tokens == ref.usage.output_tokens
        assert (res.audio is None) == (ref.audio is None)
        if res.audio is not None and ref.audio is not None:
            assert res.audio.pcm == ref.audio.pcm
    # Blocks holding an image's placeholders are never named: a prompt matches at most up to its first media token.
    enc = runner.prepare(RequestInputs(messages=[*HISTORY, picture], images=_media(_png(40, 70, 1))), ("text",), {})
    first_media = thinker.cacheable(enc.ids)
    assert first_media < len(enc.ids)
    matched, _ = thinker.cache.prefix_cost(enc.ids)
    assert 0 < matched <= first_media


def _media(data: bytes) -> list[Any]:
    from mstar.media import MediaItem

    return [MediaItem("a.png", data, "image")]


def test_qwen3_omni_text_prefix_len_stops_at_the_first_media_placeholder() -> None:
    from mstar.models.qwen3_omni.config import TINY_CONFIG
    from mstar.models.qwen3_omni.prompt import mrope_positions, text_prefix_len

    th = TINY_CONFIG["thinker_config"]
    img, aud = th["image_token_id"], th["audio_token_id"]
    media = {img, aud, th["video_token_id"]}
    assert text_prefix_len([1, 2, 3], media) == 3
    assert text_prefix_len([1, 2, aud, aud, 4], media) == 2
    ids = [5, 6, 7, img, img, img, img, 8]
    assert text_prefix_len(ids, media) == 3
    # Before the first visual run, positions are plain 0..k-1 on every axis, whatever the grid.
    for grid in ((1, 2, 2), (1, 4, 1)):
        pos, _ = mrope_positions(
            ids,
            image_token=img,
            video_token=th["video_token_id"],
            image_grids=[grid],
            video_grids=[],
            video_second_per_grid=[],
            merge=1,
            position_id_per_seconds=13,
        )
        assert pos[:, :3].tolist() == [[0.0, 1.0, 2.0]] * 3


# ---------------------------------------------------------------------------------------------- BAGEL


@pytest.fixture(scope="module")
def bagel() -> Iterator[mstar.Engine]:
    eng = mstar.Engine("bagel", weights="tiny", device="cpu")
    yield eng
    eng.close()


def test_bagel_small_pool_makes_requests_wait_and_refuses_what_never_fits(bagel: mstar.Engine) -> None:
    jobs: list[dict[str, Any]] = [
        {"text": f"a small house {i}", "output_modalities": ("image",), "width": 80, "height": 80, "seed": 40 + i}
        for i in range(3)
    ]
    for job in jobs:
        job["num_timesteps"] = 3
    solo = [bagel.generate(**job) for job in jobs]
    # 6 blocks of 16 positions; a guided 80x80 picture may fill 5 (the conditional context and the
    # text-guidance one): one runs at a time.
    with mstar.Engine("bagel", weights="tiny", device="cpu", max_seq_len=96, kv_cache_tokens=96) as tight:
        runner: Any = tight.runner
        assert runner.cache.usable_blocks == 6
        together, waited = _together(tight, jobs)
        with pytest.raises(InvalidRequestError, match="kv_cache_tokens") as info:
            # Three contexts (image guidance too) need 8 blocks: more than the whole pool.
            tight.generate_image("a small house", width=80, height=80, num_timesteps=3, cfg_img_scale=2.0)
        assert info.value.param == "kv_cache_tokens" and info.value.status_code == 400
        stats = _idle_stats(tight)
        assert runner.reserved_blocks == 0
    assert waited > 0
    assert stats["kv_blocks_total"] == 6 and stats["kv_blocks_used"] == 0 and stats["kv_slots_used"] == 0
    for alone, shared in zip(solo, together, strict=True):
        assert isinstance(alone, GenerateResult) and alone.image is not None
        assert shared.image == alone.image


def _bagel_request(runner: Any, rid: str, inputs: RequestInputs, **kwargs: Any) -> Request:
    params = runner.validate(inputs, ("image",), kwargs)
    return Request(
        rid,
        inputs,
        input_modalities=("text",),
        output_modalities=("image",),
        params=params,
        prepared=runner.prepare(inputs, ("image",), params),
        seed=5,
    )


def test_bagel_guidance_contexts_share_blocks_and_hold_what_they_would_recompute(bagel: mstar.Engine) -> None:
    runner: Any = bagel.runner
    cache, fwd = runner.cache, runner.fwd
    messages = [
        {"role": "system", "content": "Paint in the style of an old watercolour, soft light, muted colours. " * 2},
        {"role": "user", "content": "a lighthouse on a cliff"},
    ]
    inputs = RequestInputs(messages=messages)
    req = _bagel_request(runner, "share", inputs, width=64, height=64, num_timesteps=4, cfg_img_scale=2.0)
    assert runner.admit(req)
    try:
        st = runner.state(req)
        assert set(st.ctx) == {"cond", "text", "img"}
        runner.step([req])  # prefill
        assert st.phase == "denoise"
        assert cache.lengths[st.ctx["cond"].slot] == runner.prepared(req).context_len
        runner.step([req])  # one guided denoising step: each context writes its latent row
        assert runner.activity.last_rows["denoise"] == 3
        tables = {name: cache.tables[ctx.slot] for name, ctx in st.ctx.items()}
        one = len(tables["cond"])
        assert cache.blocks_used < sum(len(t) for t in tables.values())  # some blocks are held twice or more
        assert cache.blocks_used < 3 * one
        assert runner.stats().kv_blocks_used == cache.blocks_used
        # The shared contexts hold exactly what building them from scratch would: text guidance is
        # the context without its last text, image guidance the text parts alone (here: all of it).
        spare = cache.allocate()
        assert spare is not None
        try:
            ref = type(st.ctx["cond"])(spare)
            for name, parts in (("text", [p for p in messages[:-1]]), ("img", messages)):
                cache.lengths[spare] = 0
                ref.rope = 0
                for msg in parts:
                    fwd.text(ref, runner.tokenizer.encode(msg["content"]))
                ctx = st.ctx[name]
                assert cache.lengths[ctx.slot] == cache.lengths[spare] and ctx.rope == ref.rope
                for layer in range(cache.k.shape[0]):
                    k, v = cache.read(layer, ctx.slot)
                    k_ref, v_ref = cache.read(layer, spare)
                    # Prefill now runs as one packed forward across requests, whose matmul shapes
                    # differ from this one-message-at-a-time rebuild: equal to fp32 rounding.
                    torch.testing.assert_close(k, k_ref, rtol=1e-5, atol=1e-5)
                    torch.testing.assert_close(v, v_ref, rtol=1e-5, atol=1e-5)
        finally:
            cache.free(spare)
        while not req.done:
            runner.step([req])
    finally:
        runner.release(req)
    assert runner.reserved_blocks == 0 and cache.blocks_used == 0


# ---------------------------------------------------------------------------------------------- Pi0.5


CAMS = [_png(224, 224, 0), _png(320, 240, 1)]


def test_pi05_small_pool_makes_requests_wait_and_changes_nothing() -> None:
    jobs: list[dict[str, Any]] = [
        {
            "text": f"pick up cube {i}",
            "images": CAMS[:1],
            "robot_state": [0.1 * i, -0.2],
            "output_modalities": ("action",),
            "num_steps": 3,
            "seed": 50 + i,
        }
        for i in range(3)
    ]
    with mstar.Engine("pi05", weights="tiny", device="cpu") as roomy:
        solo = [roomy.generate(**job) for job in jobs]
    # 25 blocks of 16 positions; a one-camera request fills 256 + ~30 + 50 positions (21 blocks).
    with mstar.Engine("pi05", weights="tiny", device="cpu", max_seq_len=400, kv_cache_tokens=400) as tight:
        runner: Any = tight.runner
        assert runner.cache.usable_blocks == 25
        together, waited = _together(tight, jobs)
        stats = _idle_stats(tight)
        assert runner.reserved_blocks == 0
    assert waited > 0
    assert stats["kv_blocks_total"] == 25 and stats["kv_blocks_used"] == 0 and stats["kv_slots_used"] == 0
    for alone, shared in zip(solo, together, strict=True):
        assert isinstance(alone, GenerateResult)
        np.testing.assert_allclose(shared.tensors[0].to_numpy(), alone.tensors[0].to_numpy(), atol=1e-5, rtol=1e-4)


def test_pi05_default_pool_never_blocks_a_free_slot() -> None:
    with mstar.Engine("pi05", weights="tiny", device="cpu") as engine:
        runner: Any = engine.runner
        size = runner.sizing
        # 1018 positions a slot is not a multiple of 16: the pool rounds up per slot, not in total.
        assert runner.cache.usable_blocks == size.max_batch_size * -(-size.max_seq_len // size.kv_block_size)
        assert engine.stats()["kv_blocks_total"] == runner.cache.usable_blocks
