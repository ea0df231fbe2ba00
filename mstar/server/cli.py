"""``mstar-server``: serve one model over HTTP."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from mstar.media_limits import DEFAULT_LIMITS, MediaLimits

__all__ = ["build_parser", "load_failure_message", "main", "media_limits"]

# The media-cap flags: (flag, type, help); each sets the MediaLimits field of the same name.
_MEDIA_FLAGS: tuple[tuple[str, type, str], ...] = (
    ("--max-image-pixels", int, "pixels (width x height) of an image or a video frame"),
    ("--max-image-side", int, "pixels on the longer side of an image or a video frame"),
    ("--max-audio-seconds", float, "duration of an audio input (and of a video's audio track)"),
    ("--max-video-seconds", float, "duration of a video"),
    ("--max-video-frames", int, "frames in a video"),
    ("--max-decoded-mb", float, "MiB one input decodes to (RGBA pixels, mono float32 samples, RGB frames)"),
)


class _HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to a flag's help, unless the help already says its default
    (in words: "cuda if available", "$MSTAR_API_KEY") or there is none to say."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mstar-server",
        description="Serve one mstar model: native POST /generate (JSON or NDJSON), GET /health, GET /ready, "
        "POST /cancel/{request_id}, and OpenAI-compatible routes under /v1 for models that have an adapter.",
        formatter_class=_HelpFormatter,
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
    sizing.add_argument("--tensor-parallel-size", type=int, default=1,
                        help="shard the model's backbone over N ranks on this machine (N-1 worker processes; "
                        "one GPU per rank on CUDA); see docs/scaling.md")
    p.add_argument("--upload-dir", type=Path, default=None,
                   help="where request media is saved while a request runs; files are deleted when it ends "
                   "(default: a fresh temporary directory)")
    p.add_argument("--max-upload-mb", type=float, default=25.0, help="largest accepted media file; bigger gets 413")
    caps = p.add_argument_group(
        "media caps", "what one media input may decode to, checked from its header and while decoding; over a cap "
        "gets 413 (mstar.media_limits.MediaLimits; unset keeps the default shown)"
    )
    for flag, kind, help_text in _MEDIA_FLAGS:
        caps.add_argument(flag, type=kind, default=getattr(DEFAULT_LIMITS, _field(flag)), help=help_text)
    p.add_argument("--max-concurrent", type=int, default=16, help="requests running on the model at once")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting for a slot; beyond this the server answers 429 with Retry-After")
    p.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds a client has to send a whole request body; a slower one gets 408 (0 disables)")
    p.add_argument("--allow-remote-media", action="store_true",
                   help="let requests reference http(s) media URLs; only public addresses are fetched "
                   "(private, loopback, link-local ... are refused on every redirect hop), size- and time-capped")
    p.add_argument("--shutdown-grace-s", type=float, default=30.0,
                   help="on SIGTERM the server stops admitting (/ready and new requests answer 503) and gives "
                   "running requests this many seconds to finish, then ends the rest with an error and exits 0; "
                   "a second SIGTERM or Ctrl+C ends the grace period at once")
    p.add_argument("--public-metrics", action="store_true",
                   help="serve GET /metrics without the API key (by default it needs it, like every route but "
                   "/health; Prometheus can send it with authorization: {credentials: KEY})")
    p.add_argument("--api-key", default=os.environ.get("MSTAR_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every route but /health (default: $MSTAR_API_KEY, "
                   "else no auth)")
    p.add_argument("--speech-chunk-chars", type=int, default=400,
                   help="text-to-speech models speak a longer text as sentence-aligned chunks of at most this "
                   "many characters, run side by side and streamed in order (0 speaks every text as one prompt)")
    replicas = p.add_argument_group(
        "replicas (Ray Serve)", "serve on several replicas, one Engine each, with Ray Serve (pip install 'mstar[ray]'; "
        "see docs/scaling.md); the server then admits --replica-concurrency times the most replicas"
    )
    replicas.add_argument("--replicas", type=int, default=None,
                          help="replicas to run (a fixed count; with --min/--max-replicas, the count to start with)")
    replicas.add_argument("--ray-address", default=None,
                          help="join this Ray cluster ('auto', or HEAD_IP:6379) instead of starting one on this machine")
    replicas.add_argument("--min-replicas", type=int, default=None, help="autoscaling: the fewest replicas")
    replicas.add_argument("--max-replicas", type=int, default=None, help="autoscaling: the most replicas")
    replicas.add_argument("--target-ongoing-requests", type=float, default=None,
                          help="autoscaling: the requests per replica Ray Serve scales to keep")
    replicas.add_argument("--replica-concurrency", type=int, default=None,
                          help="requests one replica runs at once (default: --max-batch-size, else 16)")
    replicas.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs Ray reserves for each replica")
    replicas.add_argument("--gpus-per-replica", type=float, default=None,
                          help="GPUs Ray reserves for each replica (default: one per tensor-parallel rank when the "
                          "cluster has GPUs and --device is not cpu, else none)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"], help="log verbosity")
    return p


def media_limits(args: argparse.Namespace) -> MediaLimits:
    """The media caps the flags ask for; InvalidParameterError if one is not positive."""
    return MediaLimits(**{_field(flag): getattr(args, _field(flag)) for flag, _, _ in _MEDIA_FLAGS})


def _field(flag: str) -> str:
    return flag.removeprefix("--").replace("-", "_")


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
    if args.shutdown_grace_s < 0:
        print("mstar-server: --shutdown-grace-s must be >= 0", file=sys.stderr)
        return 2
    try:
        limits = media_limits(args)
    except MStarError as exc:
        print(f"mstar-server: --{(exc.param or '').replace('_', '-')}: {exc}", file=sys.stderr)
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
            tensor_parallel_size=args.tensor_parallel_size,
            media_limits=limits,
            speech_chunk_chars=args.speech_chunk_chars,
        )

    config = ServerConfig(
        upload_dir=args.upload_dir,
        max_upload_mb=args.max_upload_mb,
        max_concurrent=args.max_concurrent,
        max_queue=args.max_queue,
        allow_remote_media=args.allow_remote_media,
        api_key=args.api_key,
        body_timeout=args.body_timeout or None,
        shutdown_grace_s=args.shutdown_grace_s,
        public_metrics=args.public_metrics,
    )
    from mstar.serve_ray.cli import serve_replicas, wants_replicas

    if wants_replicas(args):  # Ray Serve's proxy serves the same app instead of uvicorn here
        return serve_replicas(args, config, limits)
    failed: list[BaseException] = []

    def load_or_stop():  # type: ignore[no-untyped-def]
        try:
            return load()
        except BaseException as exc:
            # A server whose model cannot load would answer 503 forever: stop it and say why (below).
            failed.append(exc)
            server.should_exit = True
            raise

    # The model loads on a background thread: /health answers at once, /ready says 503 until loaded.
    app = create_app(load_or_stop, model=args.model, config=config)
    from mstar.server.drain import DrainingServer

    # uvicorn's own wait for open connections is a backstop: the drain has ended every request by then.
    server = DrainingServer(
        uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5),
        state=app.state["mstar"],
    )
    server.run()
    if failed:
        print(load_failure_message(args.model, failed[0]), file=sys.stderr)
        return 1
    return 0


def load_failure_message(model: str, exc: BaseException) -> str:
    """The last line a server whose model failed to load prints, in the CLI's spelling (``--weights``)."""
    from mstar.errors import MStarError, WeightsError
    from mstar.weights import CLI_WEIGHTS_HINT, WEIGHTS_HINT

    text = str(exc).replace(WEIGHTS_HINT, CLI_WEIGHTS_HINT)
    if not isinstance(exc, MStarError):
        text = f"{type(exc).__name__}: {text}"
    if isinstance(exc, WeightsError) and CLI_WEIGHTS_HINT not in text:
        text += f" {CLI_WEIGHTS_HINT}"
    return f"mstar-server: model {model!r} could not be loaded, so the server stopped: {text}"


if __name__ == "__main__":
    sys.exit(main())
