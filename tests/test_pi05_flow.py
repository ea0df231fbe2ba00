"""Pi0.5's building blocks against hand-computed values: adaRMS, the time embedding, the Euler loop, the prompt."""

from __future__ import annotations

import math

import pytest
import torch

from mstar.layers.gemma import AdaRMSNorm, GemmaRMSNorm
from mstar.models.pi05.flow import euler_time, euler_update, time_embedding
from mstar.models.pi05.prompt import BOS_ID, NEWLINE_ID, ByteTokenizer, build_prompt, discretize_state


def test_adarms_norm_scales_shifts_and_gates_from_the_condition() -> None:
    norm = AdaRMSNorm(2, cond_dim=2, eps=0.0)
    with torch.no_grad():
        norm.dense.weight.zero_()
        norm.dense.weight[0] = torch.tensor([1.0, 0.0])  # scale[0] follows cond[0]
        norm.dense.bias.copy_(torch.tensor([0.0, 0.0, 0.5, -1.0, 2.0, 3.0]))
    x = torch.tensor([[[3.0, 4.0]]])
    cond = torch.tensor([[1.0, 7.0]])  # scale = [1, 0], shift = [0.5, -1], gate = [2, 3]
    out, gate = norm(x, cond)
    rms = math.sqrt((9 + 16) / 2)
    expected = [3 / rms * (1 + 1) + 0.5, 4 / rms * (1 + 0) - 1.0]
    torch.testing.assert_close(out, torch.tensor([[expected]]))
    torch.testing.assert_close(gate, torch.tensor([[[2.0, 3.0]]]))


def test_plain_gemma_norm_stores_its_weight_as_an_offset_from_one() -> None:
    norm = GemmaRMSNorm(2, eps=0.0)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, -0.5]))
    out, gate = norm(torch.tensor([[3.0, 4.0]]))
    rms = math.sqrt(12.5)
    torch.testing.assert_close(out, torch.tensor([[3 / rms * 2, 4 / rms * 0.5]]))
    assert gate is None


def test_time_embedding_is_sin_then_cos_over_geometric_periods() -> None:
    # dim 4: periods 4e-3 and 4.0, i.e. angular frequencies 500*pi and pi/2.
    emb = time_embedding(torch.tensor([0.0, 0.5, 1.0]), 4, min_period=4e-3, max_period=4.0)
    h = math.sqrt(0.5)
    expected = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, h, 1.0, h], [0.0, 1.0, 1.0, 0.0]])
    torch.testing.assert_close(emb, expected, atol=1e-6, rtol=0)
    assert emb.dtype == torch.float32


def test_euler_times_run_from_one_down_in_equal_steps() -> None:
    assert [round(euler_time(k, 10), 6) for k in range(10)] == [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]


def test_euler_loop_matches_hand_integration() -> None:
    # v = x * t over 2 steps: t=1 then t=0.5, dt=-0.5 -> x * (1 - 0.5) * (1 - 0.25) = 0.375 x.
    out = torch.tensor([[2.0], [-4.0]])
    for k in range(2):
        t = torch.full((2,), euler_time(k, 2))
        out = euler_update(out, out * t[:, None], 2)
    torch.testing.assert_close(out, torch.tensor([[0.75], [-1.5]]))


def test_euler_update_takes_a_step_size_per_row() -> None:
    x, v = torch.ones(2, 1, 1), torch.ones(2, 1, 1)
    out = euler_update(x, v, torch.tensor([2, 4]))
    torch.testing.assert_close(out.flatten(), torch.tensor([0.5, 0.75]))


def test_state_is_discretised_into_256_bins_over_minus_one_to_one() -> None:
    assert discretize_state([-1.0, -0.999, 0.0, 0.5, 0.999, 1.0, 7.0, -7.0]).tolist() == [
        0,
        0,
        128,
        192,
        255,
        255,
        255,
        0,
    ]


def test_prompt_follows_the_openpi_pi05_format() -> None:
    prompt = build_prompt("  pick_up the\ncube ", [0.0, -1.0])
    assert prompt == "Task: pick up the cube, State: 128 0;\nAction: "
    ids = ByteTokenizer(512).encode(prompt)
    assert ids.count(NEWLINE_ID) == 1 and BOS_ID not in ids and max(ids) < 512


@pytest.mark.parametrize("vocab", [100, 472])
def test_byte_tokenizer_needs_room_for_the_byte_tokens(vocab: int) -> None:
    with pytest.raises(ValueError):
        ByteTokenizer(vocab)
