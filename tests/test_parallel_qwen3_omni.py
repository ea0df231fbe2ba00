"""Tensor parallelism on Qwen3-Omni's Thinker (MoE text stack) and Talker (gloo, 2 ranks, fp32 tiny
weights): the same greedy tokens and logits (within 1e-4) as one rank, and seeded sampling that
reproduces run to run."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

import mstar
from tests.helpers.parallel_load import Backbone, Reads, assert_rank0_read_only_its_slices, tiny_engine

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

GREEDY: dict[str, Any] = {
    "output_modalities": ("text", "audio"),
    "max_output_tokens": 8,
    "talker_max_output_tokens": 12,
    "thinker_temperature": 0.0,
    "talker_temperature": 0.0,
    "code_predictor_temperature": 0.0,
    "seed": 5,
}


@pytest.fixture(scope="module")
def reads() -> dict[int, Reads]:
    """What rank 0 read from the checkpoint while building the engine of each size."""
    return {}


@pytest.fixture(scope="module")
def tp1(reads: dict[int, Reads]) -> Iterator[mstar.Engine]:
    with tiny_engine("qwen3_omni", 1, reads) as engine:
        yield engine


@pytest.fixture(scope="module")
def tp2(tp1: mstar.Engine, reads: dict[int, Reads]) -> Iterator[mstar.Engine]:
    with tiny_engine("qwen3_omni", 2, reads) as engine:  # after TP 1, which wrote the tiny checkpoint if needed
        yield engine


def test_tp2_rank0_reads_only_its_slices_of_the_thinker_and_talker(
    tp1: mstar.Engine, tp2: mstar.Engine, reads: dict[int, Reads]
) -> None:
    assert_rank0_read_only_its_slices(
        reads[1],
        reads[2],
        [
            Backbone(
                tp1.runner.model.thinker.model.language_model, tp2.runner.model.thinker.model.language_model,
                "thinker.model.language_model.", skip=("embed_tokens",),
            ),
            Backbone(tp1.runner.model.talker.model, tp2.runner.model.talker.model, "talker.model.", skip=("codec_embedding",)),
        ],
    )


def _run(engine: mstar.Engine, **kw: Any) -> tuple[dict[str, list[torch.Tensor]], mstar.GenerateResult]:
    """The Thinker's and the Talker's logits of every forward (on rank 0), and the result."""
    model = engine.runner.model
    seen: dict[str, list[torch.Tensor]] = {"thinker": [], "talker": []}
    hooks = [
        model.thinker.lm_head.register_forward_hook(lambda _m, _a, out: seen["thinker"].append(out.detach().clone())),
        model.talker.codec_head.register_forward_hook(lambda _m, _a, out: seen["talker"].append(out.detach().clone())),
    ]
    try:
        result = engine.chat("Say something.", **kw)
    finally:
        for h in hooks:
            h.remove()
    return seen, result


def test_tp2_thinker_and_talker_match_tp1(tp1: mstar.Engine, tp2: mstar.Engine) -> None:
    for stage in (tp2.runner.thinker, tp2.runner.talker):  # each rank holds its share of the KV heads
        assert stage.cache.k.shape[-2] * 2 == 2
    ref, ref_result = _run(tp1, **GREEDY)
    got, result = _run(tp2, **GREEDY)
    for stage in ("thinker", "talker"):
        assert len(got[stage]) == len(ref[stage]) > 2, stage
        for a, b in zip(got[stage], ref[stage], strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
            assert torch.equal(a.argmax(-1), b.argmax(-1)), stage  # the greedy tokens
    assert result.text == ref_result.text
    assert result.audio is not None and ref_result.audio is not None
    np.testing.assert_array_equal(result.audio.to_numpy(), ref_result.audio.to_numpy())


def test_tp2_seeded_sampling_reproduces(tp2: mstar.Engine) -> None:
    kw = {"output_modalities": ("text", "audio"), "max_output_tokens": 8, "talker_max_output_tokens": 12, "seed": 9}
    a, b = (tp2.chat("Tell me a story.", **kw) for _ in range(2))
    assert a.text == b.text
    assert a.audio is not None and b.audio is not None
    np.testing.assert_array_equal(a.audio.to_numpy(), b.audio.to_numpy())
