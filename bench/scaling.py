"""The same concurrent load on 1 and 2 Ray Serve replicas, and at tensor-parallel 1 and 2.

Replicas: a local Ray cluster, tiny Orpheus on every replica (one Engine each, ``--cpus-per-replica``
CPUs reserved, so Ray gives each engine that many torch threads), the ingress on loopback; ``--requests``
NDJSON streams of ``--max-tokens`` output tokens, ``--concurrency`` at a time, through HTTP after one
warm-up request. Aggregate tokens/s = all output tokens / wall time of the run; ms/step = the run's wall
time over the model steps each replica took (mean over the replicas that ran: the time one step of a
batch takes, with everything else on the machine).

Tensor parallel: ``measure_tp(model, tp_size, requests=, max_tokens=, concurrency=)`` from
``bench/_scaling_tp.py`` runs the same load on one in-process Engine at each size (it reports
``tokens_per_s`` and ``step_ms``); a row says "not available" with the reason when it cannot run.

    python bench/scaling.py                                    # replicas 1,2 and tp 1,2
    python bench/scaling.py --requests 8 --concurrency 4 --max-tokens 84 --replicas 1,2 --tp 1,2
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import time
from typing import Any

import _common  # noqa: F401  (sys.path, offline env)
from _common import machine_info, parse_ns, print_table, write_results


def replica_rows(args: argparse.Namespace) -> list[list[Any]]:
    import ray
    import requests
    from ray import serve

    from mstar.serve_ray import APP_NAME, build_app, deploy
    from mstar.serve_ray.proxy_headers import PROXY_CALLBACK, PROXY_CALLBACK_ENV

    os.environ[PROXY_CALLBACK_ENV] = PROXY_CALLBACK
    counts = parse_ns(args.replicas)
    ray.init(address="local", num_cpus=max(counts) * args.cpus_per_replica + 1, include_dashboard=False,
             _node_ip_address="127.0.0.1", log_to_driver=False, configure_logging=False)
    rows: list[list[Any]] = []
    base = f"http://127.0.0.1:{args.port}"
    kwargs = {"max_output_tokens": args.max_tokens}
    try:
        for n in counts:
            app = build_app("orpheus", replicas=n, num_cpus=args.cpus_per_replica, replica_concurrency=args.concurrency,
                            engine_kwargs={"weights": "tiny", "device": "cpu", "max_batch_size": args.concurrency})
            deploy(app, port=args.port)
            ingress = serve.get_app_handle(APP_NAME)
            while len(ingress.stats.remote().result()["replicas"]) < n:
                time.sleep(0.2)

            def one(i: int) -> int:
                body = {"text": f"Scaling run, sentence number {i}.", "model_kwargs": kwargs}
                with requests.post(f"{base}/generate", json=body, stream=True, timeout=600) as resp:
                    resp.raise_for_status()
                    last = json.loads([line for line in resp.iter_lines() if line][-1])
                if last["modality"] != "done":
                    raise RuntimeError(f"request {i} failed: {last}")
                return int(last["metadata"]["usage"]["output_tokens"])

            one(-1)  # warm-up
            time.sleep(1.0)  # let the replicas report their step counts
            before = {r: s["steps"] for r, s in ingress.stats.remote().result()["replicas"].items()}
            start = time.perf_counter()
            with cf.ThreadPoolExecutor(args.concurrency) as pool:
                tokens = sum(pool.map(one, range(args.requests)))
            wall = time.perf_counter() - start
            time.sleep(1.0)
            after = {r: s["steps"] for r, s in ingress.stats.remote().result()["replicas"].items()}
            steps = [after[r] - before.get(r, 0) for r in after if after[r] > before.get(r, 0)]
            step_ms = sum(wall / s for s in steps) / len(steps) * 1000 if steps else float("nan")
            rows.append([f"{n} replica{'s' if n > 1 else ''}", args.requests, args.concurrency, tokens,
                         round(wall, 2), round(tokens / wall, 1), round(step_ms, 1)])
            serve.delete(APP_NAME)
    finally:
        serve.shutdown()
        ray.shutdown()
    return rows


def tp_rows(args: argparse.Namespace) -> list[list[Any]]:
    try:
        from _scaling_tp import measure_tp  # type: ignore[import-not-found]
    except ImportError as exc:
        return [[f"tp {n}", args.requests, args.concurrency, f"not available: {exc}", "", "", ""]
                for n in parse_ns(args.tp)]
    rows: list[list[Any]] = []
    for n in parse_ns(args.tp):
        try:
            got = measure_tp("orpheus", n, requests=args.requests, max_tokens=args.max_tokens,
                             concurrency=args.concurrency)
        except Exception as exc:  # one size failing must not hide the others
            rows.append([f"tp {n}", args.requests, args.concurrency, f"not available: {type(exc).__name__}: {exc}",
                         "", "", ""])
            continue
        rows.append([f"tp {n}", args.requests, args.concurrency, got.get("tokens", ""), got.get("wall_s", ""),
                     round(float(got["tokens_per_s"]), 1), round(float(got["step_ms"]), 1)])
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=8, help="requests per configuration")
    ap.add_argument("--concurrency", type=int, default=4, help="requests in flight at once")
    ap.add_argument("--max-tokens", type=int, default=84, help="output tokens per request (7 per audio frame)")
    ap.add_argument("--replicas", default="1,2", help="replica counts (comma-separated; empty: skip)")
    ap.add_argument("--tp", default="1,2", help="tensor-parallel sizes (comma-separated; empty: skip)")
    ap.add_argument("--cpus-per-replica", type=float, default=1.0)
    ap.add_argument("--port", type=int, default=18431, help="loopback port of Ray Serve's proxy")
    args = ap.parse_args(argv)
    info = machine_info()
    rows = (replica_rows(args) if args.replicas else []) + (tp_rows(args) if args.tp else [])
    headers = ["setup", "requests", "concurrency", "output tokens", "wall s", "tokens/s", "ms/step"]
    print_table(headers, rows)
    path = write_results("scaling", {"machine": info, "args": vars(args), "headers": headers, "rows": rows})
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
