"""Tensor parallelism on Orpheus' Llama backbone (gloo, 2 ranks, fp32 tiny weights): the same greedy
tokens and logits (within 1e-4) as one rank, and seeded sampling that reproduces run to run."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

import mstar
from mstar.layers.attention import AttnBatch
from mstar.parallel import ShardedKVCache
from mstar.parallel.layers import ParallelLMHead
from tests.helpers.parallel_load import (
    Backbone,
    Reads,
    assert_rank0_read_only_its_slices,
    process_gone,
    tiny_engine,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

TEXT = "Hello there, general Kenobi"


@pytest.fixture(scope="module")
def reads() -> dict[int, Reads]:
    """What rank 0 read from the checkpoint while building the engine of each size."""
    return {}


@pytest.fixture(scope="module")
def tp1(reads: dict[int, Reads]) -> Iterator[mstar.Engine]:
    with tiny_engine("orpheus", 1, reads) as engine:
        yield engine


@pytest.fixture(scope="module")
def tp2(tp1: mstar.Engine, reads: dict[int, Reads]) -> Iterator[mstar.Engine]:
    with tiny_engine("orpheus", 2, reads) as engine:  # after TP 1, which wrote the tiny checkpoint if needed
        pids = engine.runner.parallel.pids
        yield engine
    # Closing a healthy engine stops its workers: no process is left behind.
    assert pids and all(process_gone(pid) for pid in pids)


def _greedy_logits(engine: mstar.Engine) -> tuple[list[torch.Tensor], np.ndarray]:
    """Every LM forward's logits on rank 0, and the audio, for one greedy request."""
    seen: list[torch.Tensor] = []
    hook = engine.runner.model.lm_head.register_forward_hook(lambda _m, _a, out: seen.append(out.detach().clone()))
    try:
        result = engine.generate(text=TEXT, temperature=0.0, max_output_tokens=56, seed=1)
    finally:
        hook.remove()
    assert result.audio is not None
    return seen, result.audio.to_numpy()


def test_tp2_greedy_tokens_and_logits_match_tp1(tp1: mstar.Engine, tp2: mstar.Engine) -> None:
    assert isinstance(tp2.runner.model.lm_head, ParallelLMHead)
    ref_logits, ref_audio = _greedy_logits(tp1)
    logits, audio = _greedy_logits(tp2)
    assert len(logits) == len(ref_logits) > 10
    for a, b in zip(logits, ref_logits, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
        assert torch.equal(a.argmax(-1), b.argmax(-1))  # the greedy tokens
    np.testing.assert_array_equal(audio, ref_audio)


def test_tp2_seeded_sampling_reproduces(tp2: mstar.Engine) -> None:
    runs = [tp2.generate(text=TEXT, max_output_tokens=56, seed=11) for _ in range(2)]
    assert runs[0].audio is not None and runs[1].audio is not None
    np.testing.assert_array_equal(runs[0].audio.to_numpy(), runs[1].audio.to_numpy())
    other = tp2.generate(text=TEXT, max_output_tokens=56, seed=12)
    assert other.audio is not None
    assert not np.array_equal(other.audio.to_numpy(), runs[0].audio.to_numpy())


def test_tp2_rank0_reads_only_its_slices_of_the_lm(
    tp1: mstar.Engine, tp2: mstar.Engine, reads: dict[int, Reads]
) -> None:
    assert_rank0_read_only_its_slices(reads[1], reads[2], [Backbone(tp1.runner.model, tp2.runner.model, "")])


def test_tp2_engine_is_healthy_and_holds_half_the_kv_heads(tp1: mstar.Engine, tp2: mstar.Engine) -> None:
    assert tp2.health() is None
    assert tp2.runner.cache.k.shape[-2] * 2 == tp1.runner.cache.k.shape[-2]


def _branch_logits(engine: mstar.Engine) -> list[torch.Tensor]:
    """Fill a slot with 20 tokens, branch a second slot off it (sharing its half-full last block),
    then decode on the branch (copy on write of that block) and on the parent."""
    runner = engine.runner
    cache, model = runner.cache, runner.model
    ids = torch.arange(100, 120)[None, :]
    out = []
    parent, branch = cache.allocate(), cache.allocate()
    assert parent is not None and branch is not None
    try:
        with torch.inference_mode():
            batch = AttnBatch.build(cache, [parent], [20], device="cpu")
            out.append(model(ids, cache, batch))
            batch.commit(cache)
            cache.copy_slot(parent, branch)
            for slot, tok in ((branch, 7), (parent, 9), (branch, 11)):
                batch = AttnBatch.build(cache, [slot], [1], device="cpu")
                out.append(model(torch.tensor([[tok]]), cache, batch))
                batch.commit(cache)
    finally:
        cache.free(parent)
        cache.free(branch)
    return out


def test_tp2_workers_repeat_copy_on_write_block_copies(tp1: mstar.Engine, tp2: mstar.Engine) -> None:
    copies: list[tuple[int, int, int]] = []
    cache = tp2.runner.cache
    assert isinstance(cache, ShardedKVCache)
    own = cache._copy_block

    def counted(src: int, dst: int) -> None:
        own(src, dst)
        copies.append(cache.pending_copies[-1])

    cache._copy_block = counted  # type: ignore[method-assign]
    try:
        got = _branch_logits(tp2)
    finally:
        del cache._copy_block
    assert copies  # the branch's first write copied the shared block (and the workers repeated it)
    for a, b in zip(got, _branch_logits(tp1), strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
