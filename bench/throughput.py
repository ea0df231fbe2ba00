"""Aggregate decode throughput of continuous batching against one-request-at-a-time transformers + snac.

For each N, N Orpheus requests (bench-size config: the real 156,940-token
vocabulary, random weights) are submitted to one Engine at once; aggregate
tokens/s = all output tokens / wall time from first submit to last finish
(prefill, sampling and SNAC windows included). The baseline runs the same
weights through transformers' ``LlamaForCausalLM.generate`` (same sampling
settings, same audio-token mask) and the ``snac`` package over the same
sliding windows, one request after another; its aggregate tokens/s is
independent of N. Target: N=16 at least 8x the baseline.

    python bench/throughput.py                       # N = 1,4,16,64
    python bench/throughput.py --n 1,16 --tokens 140 --baseline-requests 2
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import _common  # noqa: F401  (sys.path, offline env)
import torch
from _common import machine_info, parse_ns, print_table, write_results
from _load import run_engine_load
from _orpheus import baseline_request, bench_engine, bench_models, bench_texts, orpheus_kwargs, prompt_ids

TARGET_N, TARGET_RATIO = 16, 8.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="bench", choices=("bench", "full"))
    ap.add_argument("--n", default="1,4,16,64", help="concurrency levels (comma-separated)")
    ap.add_argument("--tokens", type=int, default=210, help="output tokens per request (7 per audio frame)")
    ap.add_argument("--baseline-requests", type=int, default=2, help="sequential baseline requests to time (0: skip)")
    args = ap.parse_args(argv)
    info = machine_info()  # load average before the run
    ns = parse_ns(args.n)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    models = bench_models(args.size, device=device, dtype=dtype, baseline=args.baseline_requests > 0)
    engine, desc = bench_engine(args.size, device=device, dtype=dtype, max_batch_size=max(ns), models=models)
    kwargs = orpheus_kwargs(args.tokens)
    texts = bench_texts(max(ns))
    print(f"orpheus-{args.size}: {desc['lm_params'] / 1e6:.1f}M LM params, {device}, {dtype}, {args.tokens} tokens/request", flush=True)

    run_engine_load(engine, texts[:1], {**kwargs, "max_output_tokens": 35})  # warm-up
    levels: list[dict[str, Any]] = []
    for n in ns:
        res = run_engine_load(engine, texts[:n], kwargs)
        stats = engine.stats()
        levels.append({**res.to_dict(), "decode_forwards": stats["forwards"]["decode"], "snac_calls": stats["forwards"]["snac"]})
        print(f"  N={n}: {res.tokens} tokens in {res.wall_s:.1f} s = {res.tokens_per_s:.1f} tok/s", flush=True)
    engine.close()

    baseline: dict[str, Any] | None = None
    if args.baseline_requests > 0:
        runs = []
        baseline_request(models, prompt_ids(engine, texts[0]), 14, seed=0)  # warm-up
        for i in range(args.baseline_requests):
            r = baseline_request(models, prompt_ids(engine, texts[i]), args.tokens, seed=1000 + i)
            runs.append(r)
            print(f"  baseline request {i}: {r['tokens']} tokens in {r['total_s']:.1f} s (generate {r['generate_s']:.1f} s, snac {r['snac_s']:.1f} s)", flush=True)
        total_tokens = sum(r["tokens"] for r in runs)
        total_s = sum(r["total_s"] for r in runs)
        baseline = {"requests": runs, "tokens": total_tokens, "wall_s": total_s, "tokens_per_s": total_tokens / total_s}

    rows = []
    for lv in levels:
        ratio = lv["tokens_per_s"] / baseline["tokens_per_s"] if baseline else None
        lv["ratio_vs_baseline"] = ratio
        rows.append([lv["n"], lv["tokens"], lv["wall_s"], lv["tokens_per_s"], "-" if ratio is None else f"{ratio:.2f}x"])
    if baseline:
        rows.append(["baseline (sequential)", baseline["tokens"], baseline["wall_s"], baseline["tokens_per_s"], "1.00x"])
    print(f"\nthroughput: orpheus-{args.size}, {args.tokens} tokens/request, {device}")
    print_table(["N", "tokens", "wall s", "tokens/s", "vs baseline"], rows)
    at_target = next((lv for lv in levels if lv["n"] == TARGET_N), None)
    verdict = None
    if at_target is not None and at_target["ratio_vs_baseline"] is not None:
        verdict = at_target["ratio_vs_baseline"] >= TARGET_RATIO
        print(f"target: N={TARGET_N} >= {TARGET_RATIO:.0f}x baseline -> {at_target['ratio_vs_baseline']:.2f}x ({'met' if verdict else 'MISSED'})")
    path = write_results(f"throughput_{args.size}_{device.type}", {
        "bench": "throughput", "command": "python " + " ".join(sys.argv), "machine": info, "model": desc,
        "tokens_per_request": args.tokens, "levels": levels, "baseline": baseline,
        "target": {"n": TARGET_N, "ratio": TARGET_RATIO, "met": verdict},
    })
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
