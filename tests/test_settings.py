"""Runner settings: one typed object from Engine arguments or server flags, resolved against each
family's defaults, refused with a typed error when they make no sense."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

import mstar
from mstar.errors import InvalidParameterError
from mstar.layers import invariant
from mstar.layers.invariant import batch_invariance, invariant_linear
from mstar.server.cli import build_parser
from mstar.settings import RunnerSettings, Sizing

DEFAULTS = Sizing(max_batch_size=8, max_seq_len=192)


def test_unset_fields_keep_the_family_defaults_and_set_ones_win() -> None:
    assert RunnerSettings().resolve(DEFAULTS) == DEFAULTS
    got = RunnerSettings(max_batch_size=2, kv_cache_tokens=400, batch_invariant=False).resolve(DEFAULTS)
    assert (got.max_batch_size, got.max_seq_len, got.kv_pool_tokens, got.batch_invariant) == (2, 192, 400, False)
    assert DEFAULTS.kv_pool_tokens == 8 * 192  # default pool: every request at full length


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"max_seq_len": -3}, "max_seq_len"),
        ({"prefill_chunk": True}, "prefill_chunk"),
        ({"kv_block_size": 2.5}, "kv_block_size"),
        ({"cuda_graphs": "yes"}, "cuda_graphs"),
        ({"batch_invariant": 1}, "batch_invariant"),
    ],
)
def test_nonsense_settings_are_refused_naming_the_setting(kwargs: dict[str, object], param: str) -> None:
    with pytest.raises(InvalidParameterError) as err:
        RunnerSettings(**kwargs)  # type: ignore[arg-type]
    assert err.value.param == param


def test_a_pool_that_cannot_hold_one_full_request_is_refused() -> None:
    with pytest.raises(InvalidParameterError) as err:
        RunnerSettings(kv_cache_tokens=100).resolve(DEFAULTS)
    assert err.value.param == "kv_cache_tokens" and "192" in str(err.value)


def test_server_flags_reach_the_same_settings() -> None:
    args = build_parser().parse_args(
        ["--model", "orpheus", "--max-batch-size", "3", "--kv-cache-tokens", "900", "--no-batch-invariant", "--cuda-graphs"]
    )
    assert (args.max_batch_size, args.kv_cache_tokens, args.batch_invariant, args.cuda_graphs) == (3, 900, False, True)
    assert build_parser().parse_args(["--model", "orpheus"]).batch_invariant is None


def test_batch_invariance_is_per_thread_and_off_means_plain_linear() -> None:
    torch.manual_seed(0)
    x, w = torch.randn(5, 64), torch.randn(96, 64)
    with batch_invariance(False):
        assert torch.equal(invariant_linear(x, w), F.linear(x, w))
        seen: list[bool] = []
        other = threading.Thread(target=lambda: seen.append(torch.equal(invariant_linear(x[:1], w), invariant_linear(x, w)[:1])))
        other.start()
        other.join()
    assert seen == [True]  # another thread kept the default: rows independent of their batch


def test_an_engine_runs_its_steps_with_its_own_invariance_setting() -> None:
    with mstar.Engine("orpheus", weights="tiny", device="cpu", dtype="float32", batch_invariant=False, max_batch_size=2) as engine:
        assert engine.runner.sizing.batch_invariant is False and engine.stats()["kv_slots_total"] == 2
        modes: list[bool] = []
        # The fault hook runs on the scheduler's thread just before each step.
        engine.scheduler.fault_hook = lambda req: modes.append(getattr(invariant._mode, "on", True))
        res = engine.generate(text="Hi", output_modalities=("audio",), seed=1, max_output_tokens=35)
        assert res.audio is not None and len(res.audio) > 0
    assert modes and not any(modes)
    assert getattr(invariant._mode, "on", True)  # the caller's thread is untouched
