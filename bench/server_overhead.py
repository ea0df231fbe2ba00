"""Server overhead: the same load through ``POST /generate`` against the in-process Engine.

Three processes: this one builds the model's Engine on its main thread (the in-process side);
``mstar-server`` (``python -m mstar.server.cli``, loopback, a free port, the same Engine flags)
serves the same model in a second; the HTTP clients run in a third. Each side is warmed up,
then the same N requests (same texts, same seeds) run as four arms, interleaved ``--repeats``
times (forward then reversed order, so drift in the machine's load cancels): in process
streamed, through the server streamed (NDJSON), and both non-streamed (``engine.generate``
against the JSON document). The medians of the wall times give the ratio server/in-process.
Targets: 1.3 for the composite models (Qwen3-Omni speech, BAGEL images), 1.05 for Orpheus.
For Qwen3-Omni, ``text=Hello`` with the tiny model's defaults is also timed both ways.

    python bench/server_overhead.py                              # bench-size Orpheus (random weights)
    python bench/server_overhead.py --model qwen3_omni --n 1,4   # tiny Qwen3-Omni speech
    python bench/server_overhead.py --model bagel --n 1,4        # tiny BAGEL text-to-image
    python bench/server_overhead.py --model fake                 # harness check on the fake model
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import _common  # noqa: F401  (sets sys.path and offline env first)
from _common import machine_info, markdown_table, parse_ns, print_table, summary, write_results
from _load import LoadResult, run_engine_load
from _serving import ClientProcess, ServerProcess
from _thread_settings import compare_engine_threads, process_denormal_bits
from _workloads import MODELS, Workload, workload

HEADERS = ["N", "mode", "in-process wall s", "server wall s", "ratio", "in-process TTFA p50", "server TTFA p50",
           "in-process CPU s", "server CPU s", "CPU ratio", "target"]


def _timed(run: Callable[[], LoadResult], cpu: Callable[[], float]) -> tuple[LoadResult, float]:
    """One load and the CPU seconds the serving process spent on it."""
    before = cpu()
    res = run()
    return res, cpu() - before


def _level(w: Workload, engine: Any, server: ServerProcess, clients: ClientProcess, n: int, repeats: int) -> list[dict[str, Any]]:
    """The four arms at concurrency ``n``; one record per mode (stream, json)."""
    texts = w.texts[:n]
    arms: dict[str, Callable[[], tuple[LoadResult, float]]] = {}
    for streaming in (True, False):
        mode = "stream" if streaming else "json"
        arms[f"engine {mode}"] = lambda s=streaming: _timed(
            lambda: run_engine_load(engine, texts, w.kwargs, outputs=w.outputs, streaming=s), time.process_time)
        arms[f"server {mode}"] = lambda s=streaming: _timed(
            lambda: clients.run(server.url, texts, w.kwargs, outputs=w.outputs, streaming=s), server.cpu_s)
    runs: dict[str, list[tuple[LoadResult, float]]] = {name: [] for name in arms}
    order = list(arms)
    for rep in range(repeats):
        for name in order if rep % 2 == 0 else order[::-1]:
            runs[name].append(arms[name]())
    out = []
    for mode in ("stream", "json"):
        eng, srv = runs[f"engine {mode}"], runs[f"server {mode}"]
        e_wall = statistics.median(r.wall_s for r, _ in eng)
        s_wall = statistics.median(r.wall_s for r, _ in srv)
        firsts = [[t.ttfa_s for r, _ in side for t in r.requests if t.ttfa_s is not None] for side in (eng, srv)]
        ttfa = [summary(f)["p50"] if f else None for f in firsts]  # None: no audio, or not streamed
        out.append({
            "n": n, "mode": mode, "engine_wall_s": e_wall, "server_wall_s": s_wall, "ratio": s_wall / e_wall,
            "engine_ttfa_p50_s": ttfa[0], "server_ttfa_p50_s": ttfa[1],
            "engine_cpu_s": statistics.median(c for _, c in eng), "server_cpu_s": statistics.median(c for _, c in srv),
            # CPU seconds barely move with other processes' load, wall seconds do: the steadier view of extra work.
            "cpu_ratio": statistics.median(c for _, c in srv) / max(statistics.median(c for _, c in eng), 1e-9),
            "meets_target": s_wall / e_wall <= w.target_ratio,
            "engine_runs": [r.to_dict() for r, _ in eng], "server_runs": [r.to_dict() for r, _ in srv],
        })
    return out


def _defaults_hello(engine: Any, server: ServerProcess, clients: ClientProcess, repeats: int) -> dict[str, Any]:
    """``text=Hello`` speech with the model's default caps, one request, non-streamed, both ways."""
    eng: list[LoadResult] = []
    srv: list[LoadResult] = []
    for rep in range(repeats):
        pair = [lambda: eng.append(run_engine_load(engine, ["Hello"], {}, streaming=False)),
                lambda: srv.append(clients.run(server.url, ["Hello"], {}, streaming=False))]
        for run in pair if rep % 2 == 0 else pair[::-1]:
            run()
    first = srv[0].requests[0]
    return {
        "engine_wall_s": statistics.median(r.wall_s for r in eng), "server_wall_s": statistics.median(r.wall_s for r in srv),
        "audio_s": first.audio_s, "output_tokens": first.output_tokens, "finish_reason": first.finish_reason,
        "engine_runs_s": [r.wall_s for r in eng], "server_runs_s": [r.wall_s for r in srv],
    }


def _row(level: dict[str, Any], target: float) -> list[Any]:
    ttfa = [level[k] if level[k] is not None else "-" for k in ("engine_ttfa_p50_s", "server_ttfa_p50_s")]
    return [level["n"], level["mode"], level["engine_wall_s"], level["server_wall_s"], f"{level['ratio']:.2f}x", *ttfa,
            level["engine_cpu_s"], level["server_cpu_s"], f"{level['cpu_ratio']:.2f}x", ("yes" if level["meets_target"] else "NO") + f" (<= {target}x)"]


def _warm_up(w: Workload, engine: Any, server: ServerProcess, clients: ClientProcess, batch: int) -> None:
    """First calls allocate, compile kernels and import lazily, on both sides and in both modes."""
    for streaming in (True, False):
        run_engine_load(engine, w.texts[:1], w.kwargs, outputs=w.outputs, streaming=streaming)
        clients.run(server.url, w.texts[:1], w.kwargs, outputs=w.outputs, streaming=streaming)
    if batch > 1:
        run_engine_load(engine, w.texts[:batch], w.kwargs, outputs=w.outputs)
        clients.run(server.url, w.texts[:batch], w.kwargs, outputs=w.outputs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=MODELS, default="orpheus")
    ap.add_argument("--size", default="bench", help="Orpheus config preset from bench/_orpheus.py")
    ap.add_argument("--n", default="1,4,16", help="concurrency levels (comma-separated)")
    ap.add_argument("--tokens", type=int, default=None,
                    help="output tokens per request: Orpheus / fake (default 140), Qwen3-Omni's Thinker (default 8)")
    ap.add_argument("--talker-tokens", type=int, default=40, help="Qwen3-Omni: talker_max_output_tokens (codec frames)")
    ap.add_argument("--outputs", default="audio", help="Qwen3-Omni: output_modalities, e.g. audio or text,audio")
    ap.add_argument("--steps", type=int, default=25, help="BAGEL: num_timesteps")
    ap.add_argument("--px", type=int, default=128, help="BAGEL: image width and height (tiny: at most 128)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds of the four arms per level")
    ap.add_argument("--omp-wait-policy", choices=("PASSIVE", "ACTIVE"), default=None,
                    help="OMP_WAIT_POLICY for both sides (default: as users get it, libgomp's default in process, "
                    "PASSIVE in mstar-server)")
    ap.add_argument("--skip-settings", action="store_true", help="do not compare the scheduler thread's settings")
    ap.add_argument("--tag", default="", help="suffix for the results file name")
    args = ap.parse_args(argv)
    if args.tokens is None:
        args.tokens = 8 if args.model == "qwen3_omni" else 140
    if args.omp_wait_policy:  # before torch loads (libgomp reads it once); the server process inherits it
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy
    info = machine_info()  # load average before the run
    started = time.monotonic()
    args.n = parse_ns(args.n)
    batch = max(args.n)

    settings = None if args.skip_settings else compare_engine_threads()
    if settings is not None:
        print("numeric settings on the scheduler thread (fake model):")
        for name, values in settings.items():
            print(f"  {name}: {values}")
    w = workload(args)
    engine = w.build_engine()  # on this, the main, thread
    levels: list[dict[str, Any]] = []
    hello: dict[str, Any] | None = None
    try:
        with ServerProcess(w.cli_args, setup=w.setup) as server, ClientProcess() as clients:
            _warm_up(w, engine, server, clients, batch)
            if settings is not None:  # the running processes' own bits, every thread (the model's included)
                settings["denormal bits, this process"] = process_denormal_bits(os.getpid())
                settings["denormal bits, server process"] = process_denormal_bits(server.pid)
                print(f"MXCSR flush bits: this process {settings['denormal bits, this process']}, "
                      f"server {settings['denormal bits, server process']}")
            for n in args.n:
                levels += _level(w, engine, server, clients, n, args.repeats)
            if w.model == "qwen3_omni":
                hello = _defaults_hello(engine, server, clients, args.repeats)
    finally:
        engine.close()
    load_end = os.getloadavg()
    rows = [_row(lv, w.target_ratio) for lv in levels]
    print(f"\nserver overhead ({w.desc.get('model')}, outputs {','.join(w.outputs)}, {w.kwargs}, median of {args.repeats})")
    print_table(HEADERS, rows)
    if hello is not None:
        print(f"text=Hello, defaults, non-streamed: in process {hello['engine_wall_s']:.2f} s, through the server "
              f"{hello['server_wall_s']:.2f} s ({hello['audio_s']:.2f} s of audio, {hello['output_tokens']} Thinker tokens, "
              f"finish {hello['finish_reason']})")
    print(f"load average: {info.get('loadavg_at_start')} at the start, {load_end} at the end; "
          f"{time.monotonic() - started:.0f} s in all\n")
    print(markdown_table(HEADERS, rows))
    path = write_results(f"server_overhead_{args.model}" + (f"_{args.tag}" if args.tag else ""), {
        "bench": "server_overhead", "command": "python " + " ".join(sys.argv), "machine": info, "model": w.desc,
        "outputs": list(w.outputs), "model_kwargs": w.kwargs, "server_command": server.command, "repeats": args.repeats,
        "target_ratio": w.target_ratio, "omp_wait_policy": args.omp_wait_policy, "thread_settings": settings, "levels": levels, "defaults_hello": hello,
    })
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
