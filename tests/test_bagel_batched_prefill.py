"""BAGEL prefills every request that starts in a step in one forward, and that changes no result.

Two levels: the packed forward against appending the same parts one forward at a time (keys,
values, lengths and RoPE positions, within float32 tolerance: BAGEL's linears are ordinary
matmuls, so the packed and padded shapes may round the last bits differently), and chat,
text-to-image and editing requests prefilled together against each run alone (the same text
and the same PNG bytes on the CPU).
"""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from PIL import Image

from mstar.engine import Engine
from mstar.media import MediaItem
from mstar.request import RequestInputs
from mstar.types import Finished, ImageChunk, TextChunk


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    eng = Engine("bagel", weights="tiny", device="cpu")
    yield eng
    eng.close()


def _source_png(w: int = 64, h: int = 48) -> bytes:
    img = Image.new("RGB", (w, h))
    img.putdata([((x * 7) % 256, (y * 3) % 256, (x + y) % 256) for y in range(h) for x in range(w)])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _slot_kv(cache: Any, slot: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [cache.read(layer, slot) for layer in range(cache.k.shape[0])]


@pytest.mark.slow
@torch.inference_mode()
def test_packed_prefill_equals_appending_the_parts_one_forward_at_a_time(engine: Engine) -> None:
    from mstar.models.bagel.forward import Context, PrefillRow

    runner: Any = engine.runner
    fwd, cache, tok = runner.fwd, runner.cache, runner.tokenizer
    inputs = RequestInputs(text="make it blue", images=[MediaItem("src.png", _source_png(), "image")])
    prep = runner.prepare(inputs, ("image",), runner.validate(inputs, ("image",), {"num_timesteps": 3}))
    (img,) = prep.images
    gen = torch.Generator().manual_seed(4)
    latents = fwd.encode_latents(img.vae, gen)
    hh, ww = (s // runner.cfg.latent_downsample for s in img.vae.shape[1:])
    ids, other = tok.encode("make it blue"), tok.encode("a second request's longer prompt")
    slots = [cache.allocate() for _ in range(3)]
    assert None not in slots
    try:
        one_at_a_time, packed, neighbour = (Context(s) for s in slots)
        fwd.text(one_at_a_time, tok.encode("system"))
        fwd.vae_image(one_at_a_time, latents, hh, ww)
        fwd.vit_image(one_at_a_time, img.vit)
        fwd.text(one_at_a_time, ids)
        row, other_row = PrefillRow.after(packed), PrefillRow.after(neighbour)
        fwd.text_segment(row, tok.encode("system"))
        fwd.vae_segment(row, latents, hh, ww)
        fwd.vit_segment(row, img.vit)
        fwd.text_segment(row, ids)
        fwd.text_segment(other_row, other)
        fwd.prefill([row, other_row])  # two requests' rows, of different lengths, in one forward
        assert cache.lengths[packed.slot] == cache.lengths[one_at_a_time.slot] > len(ids) + latents.shape[0]
        assert packed.rope == one_at_a_time.rope == row.rope
        for (k_seq, v_seq), (k_pack, v_pack) in zip(
            _slot_kv(cache, one_at_a_time.slot), _slot_kv(cache, packed.slot), strict=True
        ):
            torch.testing.assert_close(k_pack, k_seq, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(v_pack, v_seq, rtol=1e-5, atol=1e-5)
        alone = Context(cache.allocate())
        try:
            fwd.text(alone, other)
            for (k_a, _), (k_n, _) in zip(_slot_kv(cache, alone.slot), _slot_kv(cache, neighbour.slot), strict=True):
                torch.testing.assert_close(k_n, k_a, rtol=1e-5, atol=1e-5)
        finally:
            cache.free(alone.slot)
    finally:
        for s in slots:
            cache.free(s)


JOBS: list[dict[str, Any]] = [
    {"text": "Hello there, who are you?", "max_output_tokens": 5, "seed": 1},
    {"text": "a red square", "output_modalities": ("image",), "width": 32, "height": 32, "num_timesteps": 4, "seed": 2},
    {
        "text": "make it blue",
        "images": ("src.png", _source_png()),
        "output_modalities": ("image",),
        "num_timesteps": 4,
        "width": 32,
        "height": 32,
        "seed": 3,
    },
]


def _outcome(events: list[Any]) -> tuple[str, list[bytes], str]:
    assert isinstance(events[-1], Finished)
    text = "".join(e.text for e in events if isinstance(e, TextChunk))
    return text, [e.data for e in events if isinstance(e, ImageChunk)], events[-1].finish_reason


@pytest.mark.slow
def test_concurrent_chat_image_and_edit_prefill_in_one_forward_with_their_solo_results(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner: Any = engine.runner
    solo = [_outcome(list(engine.stream(**job))) for job in JOBS]
    assert solo[0][0] and len(solo[1][1]) == len(solo[2][1]) == 1

    # Hold the scheduler inside a step of a blocker request while the three are submitted, so that
    # they are admitted together and prefill in the next step.
    release, held = threading.Event(), threading.Event()
    step = runner.step

    def held_step(reqs: list[Any]) -> None:
        if not release.is_set():
            held.set()
            release.wait(30)
        step(reqs)

    prefills: list[tuple[int, int]] = []  # (rows, language-model forwards) per prefill call
    prefill = runner.fwd.prefill
    lm_calls = [0]
    hook = runner.model.language_model.register_forward_pre_hook(lambda *_: lm_calls.__setitem__(0, lm_calls[0] + 1))

    def counted_prefill(rows: list[Any]) -> None:
        before = lm_calls[0]
        prefill(rows)
        prefills.append((len(rows), lm_calls[0] - before))

    monkeypatch.setattr(runner, "step", held_step)
    monkeypatch.setattr(runner.fwd, "prefill", counted_prefill)
    try:
        blocker = engine.stream(text="wait", max_output_tokens=2, seed=9)
        assert held.wait(30)
        streams = [engine.stream(**job) for job in JOBS]
        release.set()
        together = [_outcome(list(s)) for s in streams]
        list(blocker)
    finally:
        release.set()
        hook.remove()
    # The blocker prefilled alone; then chat (1 row), text-to-image (1: its guidance context is a
    # prefix of the conditional one) and edit (2: conditional, and image guidance's text) in ONE forward.
    assert prefills == [(1, 1), (4, 1)]
    assert together == solo
