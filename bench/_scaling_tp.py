"""Tensor-parallel scaling: the same concurrent load on one in-process Engine at a given size.

:func:`measure_tp` starts ``Engine(model, weights="tiny", tensor_parallel_size=tp_size)`` (fp32 on the
CPU unless ``device`` says otherwise), sends one warm-up request, then ``requests`` requests of
``max_tokens`` output tokens with ``concurrency`` in flight at once, and reports the aggregate output
tokens/s over the run's wall time and the mean wall time per scheduler step (one step advances every
running request by a token). ``bench/scaling.py`` calls it for its tensor-parallel rows.

    python bench/_scaling_tp.py --model orpheus --tp 2 --requests 8 --concurrency 4 --max-tokens 84
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import time
from typing import Any

import _common  # noqa: F401  (sys.path, offline env)

__all__ = ["measure_tp"]

_TEXT = "The quick brown fox jumps over the lazy dog, twice."


def measure_tp(
    model: str, tp_size: int, *, requests: int, max_tokens: int, concurrency: int, device: str = "cpu"
) -> dict[str, Any]:
    """Aggregate ``tokens_per_s`` and mean ``step_ms`` (plus ``tokens``, ``wall_s``, ``steps``) for the load."""
    import mstar

    with mstar.Engine(
        model, weights="tiny", device=device, dtype="float32", tensor_parallel_size=tp_size,
        max_batch_size=max(concurrency, 1),
    ) as engine:
        engine.generate(text=_TEXT, max_output_tokens=max_tokens, seed=0)  # warm-up: first-call costs
        steps0 = int(engine.stats()["steps"])

        def one(i: int) -> int:
            res = engine.generate(text=_TEXT, max_output_tokens=max_tokens, seed=1 + i)
            return int(res.usage.output_tokens)

        start = time.perf_counter()
        with cf.ThreadPoolExecutor(max_workers=concurrency) as pool:
            tokens = sum(pool.map(one, range(requests)))
        wall = time.perf_counter() - start
        steps = int(engine.stats()["steps"]) - steps0
    return {
        "model": model,
        "tp_size": tp_size,
        "requests": requests,
        "concurrency": concurrency,
        "tokens": tokens,
        "wall_s": round(wall, 3),
        "steps": steps,
        "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "step_ms": 1000.0 * wall / steps if steps else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="orpheus")
    ap.add_argument("--tp", type=int, default=2, help="tensor-parallel size")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=84)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    got = measure_tp(args.model, args.tp, requests=args.requests, max_tokens=args.max_tokens,
                     concurrency=args.concurrency, device=args.device)
    print(json.dumps(got, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
