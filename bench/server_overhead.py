"""Server overhead: the same load through ``POST /generate`` against the in-process Engine.

One Engine serves both: first N streams submitted in process, then the same
N requests (same texts, same seeds) sent by N HTTP clients to a uvicorn
server running ``mstar.server.create_app(engine)`` on a thread of this
process. The two are interleaved ``--repeats`` times and the median wall time
of each is compared. Target: at most 5% overhead.

    python bench/server_overhead.py                 # bench-size Orpheus (random weights)
    python bench/server_overhead.py --model fake    # harness check on the fake model
"""

from __future__ import annotations

import argparse
import statistics
import sys
from typing import Any

import _common  # noqa: F401  (sets sys.path and offline env first)
from _common import machine_info, parse_ns, print_table, summary, write_results
from _load import LoadResult, UvicornThread, run_engine_load, run_http_load

TARGET_OVERHEAD = 0.05


def _build(args: argparse.Namespace) -> tuple[Any, list[str], dict[str, Any], dict[str, Any]]:
    """The engine, the request texts, the model kwargs and a description of the model."""
    if args.model == "fake":
        import mstar
        import tests.fake_model  # noqa: F401  (registers "fake")

        engine = mstar.Engine("fake", device="cpu", max_batch_size=max(args.n))
        kwargs = {"max_output_tokens": args.tokens, "step_delay": 0.01}
        return engine, [f"request {i}" for i in range(max(args.n))], kwargs, {"model": "fake", "step_delay_s": 0.01}
    from _orpheus import bench_engine, bench_texts, orpheus_kwargs

    engine, desc = bench_engine(args.size, max_batch_size=max(args.n))
    return engine, bench_texts(max(args.n)), orpheus_kwargs(args.tokens), desc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("orpheus", "fake"), default="orpheus")
    ap.add_argument("--size", default="bench", help="Orpheus config preset from bench/_orpheus.py")
    ap.add_argument("--n", default="1,4,16", help="concurrency levels (comma-separated)")
    ap.add_argument("--tokens", type=int, default=140, help="output tokens per request")
    ap.add_argument("--tag", default="", help="suffix for the results file name")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved engine/server runs per level")
    args = ap.parse_args(argv)
    info = machine_info()  # load average before the run
    args.n = parse_ns(args.n)

    from mstar.server.app import create_app

    engine, texts, kwargs, desc = _build(args)
    app = create_app(engine, max_concurrent=max(args.n), max_queue=max(args.n))
    rows: list[list[Any]] = []
    levels: list[dict[str, Any]] = []
    with UvicornThread(app) as server:
        run_engine_load(engine, texts[:1], kwargs)  # warm-up: first-call allocations, lazy imports
        run_http_load(server.url, texts[:1], kwargs)
        for n in args.n:
            eng_runs: list[LoadResult] = []
            http_runs: list[LoadResult] = []
            for rep in range(args.repeats):  # alternate which goes first, so drift in the machine's load cancels
                if rep % 2:
                    http_runs.append(run_http_load(server.url, texts[:n], kwargs))
                eng_runs.append(run_engine_load(engine, texts[:n], kwargs))
                if not rep % 2:
                    http_runs.append(run_http_load(server.url, texts[:n], kwargs))
            e_wall = statistics.median(r.wall_s for r in eng_runs)
            h_wall = statistics.median(r.wall_s for r in http_runs)
            overhead = h_wall / e_wall - 1.0
            e_ttfa = summary([t.ttfa_s or 0.0 for r in eng_runs for t in r.requests])["p50"]
            h_ttfa = summary([t.ttfa_s or 0.0 for r in http_runs for t in r.requests])["p50"]
            rows.append([n, e_wall, h_wall, f"{overhead * 100:+.1f}%", e_ttfa, h_ttfa, "yes" if overhead <= TARGET_OVERHEAD else "NO"])
            levels.append({
                "n": n, "engine_wall_s": e_wall, "server_wall_s": h_wall, "overhead": overhead,
                "engine_ttfa_p50_s": e_ttfa, "server_ttfa_p50_s": h_ttfa, "meets_target": overhead <= TARGET_OVERHEAD,
                "engine_runs": [r.to_dict() for r in eng_runs], "server_runs": [r.to_dict() for r in http_runs],
            })
    engine.close()
    print(f"\nserver overhead ({desc.get('model')}, {args.tokens} tokens/request, median of {args.repeats})")
    print_table(["N", "engine wall s", "server wall s", "overhead", "engine TTFA p50", "server TTFA p50", "<=5%"], rows)
    path = write_results(f"server_overhead_{args.model}" + (f"_{args.tag}" if args.tag else ""), {
        "bench": "server_overhead", "command": "python " + " ".join(sys.argv), "machine": info, "model": desc,
        "tokens_per_request": args.tokens, "repeats": args.repeats, "target_overhead": TARGET_OVERHEAD, "levels": levels,
    })
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
