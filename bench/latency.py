"""Time to first audio and real-time factor per request, at each concurrency level.

N Orpheus requests (bench-size config, random weights, audio tokens forced so
none stops early) are submitted together; each asks for a ``--seconds``-long
utterance: 7 tokens per 2048-sample frame, plus the 3 frames the 4-frame SNAC
window needs before its first output. Per request: time to first audio
(submit -> first AudioChunk), total time, and real-time factor (total time /
seconds of audio; below 1 is faster than real time). Target: time to first
audio at most 10% of the total time.

    python bench/latency.py                    # N = 1,4,16, 10 s utterances
    python bench/latency.py --n 64 --seconds 2
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

import _common  # noqa: F401  (sys.path, offline env)
import torch
from _common import machine_info, parse_ns, print_table, summary, write_results
from _load import run_engine_load
from _orpheus import bench_engine, bench_texts, orpheus_kwargs

from mstar.models.orpheus.config import CODES_PER_FRAME, WINDOW_FRAMES

TARGET_TTFA_FRACTION = 0.10


def tokens_for(seconds: float, sample_rate: int, samples_per_frame: int) -> int:
    """Output tokens that yield at least ``seconds`` of audio (each window after the first 3 frames adds a frame)."""
    frames = math.ceil(seconds * sample_rate / samples_per_frame) + WINDOW_FRAMES - 1
    return frames * CODES_PER_FRAME


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="bench", choices=("bench", "full"))
    ap.add_argument("--n", default="1,4,16", help="concurrency levels (comma-separated)")
    ap.add_argument("--seconds", type=float, default=10.0, help="audio per request")
    ap.add_argument("--tag", default="", help="suffix for the results file name")
    args = ap.parse_args(argv)
    info = machine_info()  # load average before the run
    ns = parse_ns(args.n)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    engine, desc = bench_engine(args.size, device=device, max_batch_size=max(ns), max_seq_len=2048)
    runner = engine.runner
    tokens = tokens_for(args.seconds, runner.sample_rate, runner.samples_per_frame)
    kwargs = orpheus_kwargs(tokens)
    print(f"orpheus-{args.size} on {device}: {args.seconds:g} s utterances = {tokens} tokens/request", flush=True)
    run_engine_load(engine, bench_texts(1), {**kwargs, "max_output_tokens": 35})  # warm-up

    rows: list[list[Any]] = []
    levels: list[dict[str, Any]] = []
    for n in ns:
        res = run_engine_load(engine, bench_texts(n), kwargs)
        ttfa = [r.ttfa_s for r in res.requests if r.ttfa_s is not None]
        if len(ttfa) != n:
            raise RuntimeError(f"{n - len(ttfa)} request(s) produced no audio")
        frac = [r.ttfa_s / r.total_s for r in res.requests if r.ttfa_s is not None]
        rtf = [r.rtf for r in res.requests if r.rtf is not None]
        audio = summary([r.audio_s for r in res.requests])
        ok = max(frac) <= TARGET_TTFA_FRACTION
        levels.append({
            **res.to_dict(), "ttfa_s": summary(ttfa), "ttfa_fraction": summary(frac), "rtf": summary(rtf),
            "audio_s": audio, "total_s": summary([r.total_s for r in res.requests]), "meets_target": ok,
        })
        rows.append([
            n, audio["mean"], summary(ttfa)["p50"], summary(ttfa)["max"], summary([r.total_s for r in res.requests])["p50"],
            f"{max(frac) * 100:.1f}%", summary(rtf)["p50"], res.tokens_per_s, "yes" if ok else "NO",
        ])
        print(f"  N={n}: done in {res.wall_s:.1f} s", flush=True)
    engine.close()
    print(f"\nlatency: orpheus-{args.size}, {args.seconds:g} s of audio per request ({tokens} tokens), {device}")
    print_table(["N", "audio s", "TTFA p50 s", "TTFA max s", "total p50 s", "TTFA/total max", "RTF p50", "agg tok/s", "<=10%"], rows)
    path = write_results(f"latency_{args.size}_{device.type}" + (f"_{args.tag}" if args.tag else ""), {
        "bench": "latency", "command": "python " + " ".join(sys.argv), "machine": info, "model": desc,
        "seconds": args.seconds, "tokens_per_request": tokens, "target_ttfa_fraction": TARGET_TTFA_FRACTION, "levels": levels,
    })
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
