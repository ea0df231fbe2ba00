"""Tensor parallelism on BAGEL's Qwen2 Mixture-of-Transformers backbone (gloo, 2 ranks, fp32 tiny
weights): text logits and greedy tokens, and the image velocities (generation expert, guidance
branches sharing KV blocks), match one rank within 1e-4; a seeded image reproduces at TP 2."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

import mstar
from tests.helpers.parallel_load import Backbone, Reads, assert_rank0_read_only_its_slices, tiny_engine

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def reads() -> dict[int, Reads]:
    """What rank 0 read from the checkpoint while building the engine of each size."""
    return {}


@pytest.fixture(scope="module")
def tp1(reads: dict[int, Reads]) -> Iterator[mstar.Engine]:
    with tiny_engine("bagel", 1, reads) as engine:
        yield engine


@pytest.fixture(scope="module")
def tp2(tp1: mstar.Engine, reads: dict[int, Reads]) -> Iterator[mstar.Engine]:
    with tiny_engine("bagel", 2, reads) as engine:  # after TP 1, which wrote the tiny checkpoint if needed
        yield engine


def test_tp2_rank0_reads_only_its_slices_of_the_mot_decoder(
    tp1: mstar.Engine, tp2: mstar.Engine, reads: dict[int, Reads]
) -> None:
    assert_rank0_read_only_its_slices(
        reads[1],
        reads[2],
        [
            Backbone(
                tp1.runner.model.language_model, tp2.runner.model.language_model, "language_model.",
                skip=("model.embed_tokens", "lm_head"),
            )
        ],
    )


def _outputs(module: torch.nn.Module, run: Callable[[], Any]) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    hook = module.register_forward_hook(lambda _m, _a, out: seen.append(out.detach().clone()))
    try:
        run()
    finally:
        hook.remove()
    return seen


def _assert_close_all(got: list[torch.Tensor], ref: list[torch.Tensor]) -> None:
    assert len(got) == len(ref) > 0
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_tp2_text_logits_and_greedy_tokens_match_tp1(tp1: mstar.Engine, tp2: mstar.Engine) -> None:
    results: dict[int, Any] = {}

    def chat(engine: mstar.Engine, tp: int) -> Callable[[], Any]:
        return lambda: results.__setitem__(tp, engine.chat("Describe a sunset.", max_output_tokens=6, seed=1))

    ref = _outputs(tp1.runner.model.language_model.lm_head, chat(tp1, 1))
    got = _outputs(tp2.runner.model.language_model.lm_head, chat(tp2, 2))
    _assert_close_all(got, ref)
    assert [t.argmax(-1).tolist() for t in got] == [t.argmax(-1).tolist() for t in ref]
    assert results[2].text == results[1].text


def test_tp2_image_velocities_match_tp1(tp1: mstar.Engine, tp2: mstar.Engine) -> None:
    def image(engine: mstar.Engine) -> Callable[[], Any]:
        return lambda: engine.generate_image("a red cube", width=32, height=32, seed=3, num_timesteps=3)

    ref = _outputs(tp1.runner.model.llm2vae, image(tp1))
    got = _outputs(tp2.runner.model.llm2vae, image(tp2))
    _assert_close_all(got, ref)


def test_tp2_seeded_image_reproduces(tp2: mstar.Engine) -> None:
    a, b = (tp2.generate_image("a cat", width=32, height=32, seed=11, num_timesteps=3) for _ in range(2))
    assert a == b  # PNG bytes
