"""Orpheus on the paged KV cache: requests wait or are preempted for blocks, never truncated;
prefix-cache hits change nothing in the output; the tiny defaults hold 16 long requests."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

import mstar
from mstar.types import GenerateResult


def _speak(engine: mstar.Engine, text: str, seed: int, tokens: int) -> GenerateResult:
    res = engine.generate(text=text, output_modalities=("audio",), seed=seed, max_output_tokens=tokens)
    assert isinstance(res, GenerateResult)
    return res


def _idle_stats(engine: mstar.Engine) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while engine.stats()["inflight"] and time.monotonic() < deadline:
        time.sleep(0.01)
    return engine.stats()


def _together(engine: mstar.Engine, jobs: list[tuple[str, int, int]]) -> list[GenerateResult]:
    out: list[GenerateResult | None] = [None] * len(jobs)

    def run(i: int) -> None:
        out[i] = _speak(engine, *jobs[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(r is not None for r in out)
    return [r for r in out if r is not None]


def test_a_small_pool_preempts_and_resumes_requests_without_changing_or_truncating_them() -> None:
    jobs = [(f"request number {i}", 40 + i, 56) for i in range(4)]
    with mstar.Engine("orpheus", weights="tiny", device="cpu", dtype="float32") as roomy:
        solo = [_speak(roomy, *job) for job in jobs]
    # 4 requests of ~80 positions each share 160 positions: they cannot all hold their KV at once.
    with mstar.Engine(
        "orpheus", weights="tiny", device="cpu", dtype="float32", max_batch_size=4, max_seq_len=128, kv_cache_tokens=160
    ) as tight:
        together = _together(tight, jobs)
        stats = _idle_stats(tight)
    assert stats["preemptions"] > 0
    for alone, shared in zip(solo, together, strict=True):
        assert shared.finish_reason == "length" and shared.usage.output_tokens == 56
        assert shared.audio is not None and alone.audio is not None
        assert shared.audio.pcm == alone.audio.pcm  # resumed from recomputed KV, bit for bit
    assert stats["kv_blocks_used"] == 0 and stats["kv_slots_used"] == 0


def test_a_repeated_prompt_hits_the_prefix_cache_and_gives_the_same_audio() -> None:
    with mstar.Engine("orpheus", weights="tiny", device="cpu", dtype="float32") as engine:
        text = "The same long sentence, spoken twice over by the same voice."
        first = _speak(engine, text, 5, 35)
        hits = engine.stats()["prefix_hit_tokens"]
        again = _speak(engine, text, 5, 35)
        stats = engine.stats()
    assert stats["prefix_hit_tokens"] - hits >= 48  # the prompt's full 16-token blocks were reused
    assert first.audio is not None and again.audio is not None and again.audio.pcm == first.audio.pcm


@pytest.mark.slow
def test_tiny_defaults_serve_16_concurrent_280_token_requests_untruncated() -> None:
    with mstar.Engine("orpheus", weights="tiny", device="cpu", dtype="float32") as engine:
        results = _together(engine, [(f"a sentence for speaker {i}", i, 280) for i in range(16)])
        forwards = engine.stats()["forwards"]
    assert all(r.finish_reason == "length" and r.usage.output_tokens == 280 for r in results)
    assert forwards["decode"] < 2 * 280  # one wave of 16, not two
