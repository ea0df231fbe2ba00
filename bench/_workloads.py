"""What ``server_overhead.py`` sends, per model: the same request for the in-process Engine and the server.

A :class:`Workload` holds the request (texts, outputs, model kwargs), how to build the
in-process Engine, and the ``mstar-server`` flags that build the same Engine in the server
process (with ``setup`` naming a bench-only model, see ``_bench_server.py``).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MODELS", "Workload", "workload"]

MODELS = ("orpheus", "qwen3_omni", "bagel", "fake")

_QWEN_PROMPTS = [
    "Hello, how are you today?",
    "Tell me about the weather.",
    "What is your favourite colour?",
    "Read me a short poem.",
]
_BAGEL_PROMPTS = ["a red cube on a wooden table", "a small boat on a calm lake", "a lighthouse at dusk", "three green apples"]


@dataclass
class Workload:
    """One model's bench request and both ways of serving it."""

    model: str
    texts: list[str]
    outputs: tuple[str, ...]
    kwargs: dict[str, Any]
    build_engine: Callable[[], Any]
    cli_args: list[str]
    target_ratio: float  # server wall / in-process wall at most this
    setup: str | None = None
    desc: dict[str, Any] = field(default_factory=dict)


def _cycle(prompts: list[str], n: int) -> list[str]:
    return [f"{prompts[i % len(prompts)]} ({i})" for i in range(n)]


def _sizing(model: str, batch: int, weights: str | None = "tiny") -> list[str]:
    """The CLI flags for the Engine the in-process side builds (CPU, ``batch`` slots, admission to match)."""
    return ["--model", model, *(["--weights", weights] if weights else []), "--device", "cpu",
            "--max-batch-size", str(batch), "--max-concurrent", str(batch), "--max-queue", str(batch), "--log-level", "warning"]


def workload(args: argparse.Namespace) -> Workload:
    """The workload ``args`` ask for (``args.model``, ``args.n`` and the per-model length flags)."""
    import mstar

    batch = max(args.n)
    if args.model == "fake":
        import tests.fake_model  # noqa: F401  (registers "fake")

        return Workload(
            "fake", [f"request {i}" for i in range(batch)], ("audio",), {"max_output_tokens": args.tokens, "step_delay": 0.01},
            lambda: mstar.Engine("fake", device="cpu", max_batch_size=batch), _sizing("fake", batch, weights=None),
            1.05, setup="fake", desc={"model": "fake", "step_delay_s": 0.01},
        )
    if args.model == "orpheus":
        from _orpheus import bench_engine, bench_texts, orpheus_kwargs

        def build_orpheus() -> Any:
            return bench_engine(args.size, device="cpu", max_batch_size=batch, max_seq_len=1024)[0]

        return Workload(
            "orpheus", bench_texts(batch), ("audio",), orpheus_kwargs(args.tokens), build_orpheus,
            [*_sizing("orpheus", batch), "--max-seq-len", "1024"], 1.05, setup=f"orpheus-{args.size}",
            desc={"model": f"orpheus-{args.size}", "random_weights": True},
        )
    if args.model == "qwen3_omni":
        kwargs = {"max_output_tokens": args.tokens, "talker_max_output_tokens": args.talker_tokens}
        return Workload(
            "qwen3_omni", _cycle(_QWEN_PROMPTS, batch), tuple(args.outputs.split(",")), kwargs,
            lambda: mstar.Engine("qwen3_omni", weights="tiny", device="cpu", max_batch_size=batch),
            _sizing("qwen3_omni", batch), 1.3, desc={"model": "qwen3_omni-tiny"},
        )
    if args.model == "bagel":
        kwargs = {"num_timesteps": args.steps, "width": args.px, "height": args.px}
        return Workload(
            "bagel", _cycle(_BAGEL_PROMPTS, batch), ("image",), kwargs,
            lambda: mstar.Engine("bagel", weights="tiny", device="cpu", max_batch_size=batch),
            _sizing("bagel", batch), 1.3, desc={"model": "bagel-tiny"},
        )
    raise SystemExit(f"unknown model {args.model!r}; one of {', '.join(MODELS)}")
