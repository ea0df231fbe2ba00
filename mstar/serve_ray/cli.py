"""``mstar-server --replicas N`` / ``--ray-address ADDR``: the CLI's Ray Serve branch.

:mod:`mstar.server.cli` parses the flags (its "replicas (Ray Serve)" group) and calls
:func:`serve_replicas` instead of starting uvicorn.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mstar.media_limits import MediaLimits
    from mstar.server.state import ServerConfig

__all__ = ["engine_kwargs", "serve_replicas", "wants_replicas"]

# The Engine keyword arguments the CLI's flags of the same name set (tensor_parallel_size when the CLI has it).
_ENGINE_FLAGS = ("weights", "device", "dtype", "max_batch_size", "max_seq_len", "prefill_chunk", "cuda_graphs",
                 "kv_cache_tokens", "kv_block_size", "batch_invariant", "speech_chunk_chars", "tensor_parallel_size")


def wants_replicas(args: argparse.Namespace) -> bool:
    """True when a flag of the replicas group asks for Ray Serve."""
    return any(getattr(args, name, None) is not None
               for name in ("replicas", "ray_address", "min_replicas", "max_replicas", "target_ongoing_requests"))


def engine_kwargs(args: argparse.Namespace, limits: MediaLimits) -> dict[str, Any]:
    """What each replica builds its Engine with: the flags the user set (unset ones keep the Engine's defaults)."""
    kwargs = {name: getattr(args, name) for name in _ENGINE_FLAGS if getattr(args, name, None) is not None}
    if kwargs.get("tensor_parallel_size") == 1:
        del kwargs["tensor_parallel_size"]
    kwargs["media_limits"] = limits
    return kwargs


def serve_replicas(args: argparse.Namespace, config: ServerConfig, limits: MediaLimits) -> int:
    """Run the Ray Serve application until interrupted; the exit status of ``mstar-server``."""
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError:
        print("mstar-server --replicas needs Ray Serve: pip install 'mstar[ray]'", file=sys.stderr)
        return 2
    from mstar.errors import MStarError
    from mstar.serve_ray.app import Scaling, run

    replicas = args.replicas if args.replicas is not None else (args.min_replicas or 1)
    try:
        Scaling(replicas, args.min_replicas, args.max_replicas, args.target_ongoing_requests).check()
    except MStarError as exc:
        print(f"mstar-server: --{(exc.param or 'replicas').replace('_', '-')}: {exc}", file=sys.stderr)
        return 2
    run(args.model, ray_address=args.ray_address, host=args.host, port=args.port, replicas=replicas,
        min_replicas=args.min_replicas, max_replicas=args.max_replicas,
        target_ongoing_requests=args.target_ongoing_requests, replica_concurrency=args.replica_concurrency,
        num_cpus=args.cpus_per_replica, num_gpus=args.gpus_per_replica, engine_kwargs=engine_kwargs(args, limits),
        server_config=config)
    return 0
