"""``mstar-server``: serve one model over HTTP."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mstar-server",
        description="Serve one mstar model: native POST /generate (JSON or NDJSON), GET /health, GET /ready, "
        "POST /cancel/{request_id}, and OpenAI-compatible routes under /v1 for models that have an adapter.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, help="model family to serve (see mstar.list_models()), e.g. orpheus")
    p.add_argument("--weights", default=None,
                   help="local checkpoint directory, hub id, or 'tiny' for the small random-weight variant "
                   "(default: the model's published checkpoint)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind; the default accepts local connections only (use 0.0.0.0 to expose it)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    p.add_argument("--device", default=None, help="torch device, e.g. cuda, cuda:1 or cpu (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weights dtype (default: bfloat16 on GPU, float32 on CPU)")
    sizing = p.add_argument_group(
        "model sizing", "how the runner is sized (mstar.settings.RunnerSettings); unset keeps the model's default"
    )
    sizing.add_argument("--max-batch-size", type=int, default=None,
                        help="requests decoding at once on the model (for autoregressive models: KV cache slots)")
    sizing.add_argument("--max-seq-len", type=int, default=None,
                        help="KV positions per request: prompt plus output")
    sizing.add_argument("--prefill-chunk", type=int, default=None,
                        help="prompt tokens prefilled per step across requests")
    sizing.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                        help="static-shape decode captured as CUDA graphs")
    sizing.add_argument("--kv-cache-tokens", type=int, default=None,
                        help="positions in the paged KV pool shared by all requests")
    sizing.add_argument("--kv-block-size", type=int, default=None, help="positions per KV block")
    sizing.add_argument("--batch-invariant", action=argparse.BooleanOptionalAction, default=None,
                        help="CPU: seeded results independent of the batch (default on); off is faster when batching")
    p.add_argument("--upload-dir", type=Path, default=None,
                   help="where request media is saved while a request runs; files are deleted when it ends "
                   "(default: a fresh temporary directory)")
    p.add_argument("--max-upload-mb", type=float, default=25.0, help="largest accepted media file; bigger gets 413")
    p.add_argument("--max-concurrent", type=int, default=16, help="requests running on the model at once")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting for a slot; beyond this the server answers 429 with Retry-After")
    p.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds a client has to send a whole request body; a slower one gets 408 (0 disables)")
    p.add_argument("--allow-remote-media", action="store_true",
                   help="let requests reference http(s) media URLs; only public addresses are fetched "
                   "(private, loopback, link-local ... are refused on every redirect hop), size- and time-capped")
    p.add_argument("--api-key", default=os.environ.get("MSTAR_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every route but /health (default: $MSTAR_API_KEY, "
                   "else no auth)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"], help="log verbosity")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import uvicorn
    except ImportError:
        print("mstar-server needs the server extra: pip install 'mstar[server]'", file=sys.stderr)
        return 2
    from mstar.errors import MStarError
    from mstar.registry import get_model_info
    from mstar.server import ServerConfig, create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        get_model_info(args.model)
    except MStarError as exc:
        print(f"mstar-server: {exc}", file=sys.stderr)
        return 2
    for flag in ("max_batch_size", "max_seq_len", "prefill_chunk", "kv_cache_tokens", "kv_block_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            print(f"mstar-server: --{flag.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    if args.max_concurrent < 1 or args.max_queue < 0 or args.max_upload_mb <= 0:
        print("mstar-server: --max-concurrent must be >= 1, --max-queue >= 0 and --max-upload-mb > 0", file=sys.stderr)
        return 2

    def load():  # type: ignore[no-untyped-def]
        from mstar.engine import Engine

        return Engine(
            args.model,
            weights=args.weights,
            device=args.device,
            dtype=args.dtype,
            max_batch_size=args.max_batch_size,
            max_seq_len=args.max_seq_len,
            prefill_chunk=args.prefill_chunk,
            cuda_graphs=args.cuda_graphs,
            kv_cache_tokens=args.kv_cache_tokens,
            kv_block_size=args.kv_block_size,
            batch_invariant=args.batch_invariant,
        )

    config = ServerConfig(
        upload_dir=args.upload_dir,
        max_upload_mb=args.max_upload_mb,
        max_concurrent=args.max_concurrent,
        max_queue=args.max_queue,
        allow_remote_media=args.allow_remote_media,
        api_key=args.api_key,
        body_timeout=args.body_timeout or None,
    )
    # The model loads on a background thread: /health answers at once, /ready says 503 until loaded.
    app = create_app(load, model=args.model, config=config)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
