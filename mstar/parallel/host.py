"""Rank 0's side of tensor parallelism: starts the workers, loads its shard of each backbone, and turns
every backbone forward into a step the workers mirror.

The Engine's process is rank 0; the scheduler and runner work as without tensor parallelism.
:meth:`TensorParallel.attach` shards a backbone in place (reading rank 0's slices from the
checkpoint, as the workers do) and replaces its seam method (``forward``
or ``forward_embeds``) on that instance by one that first announces the step (op code, the
arguments' tensors, the KV cache's id and pending block copies) and then runs the class's method
on rank 0's shard, the collectives inside keeping every rank in step. KV caches come from
:meth:`TensorParallel.new_cache`: rank 0 keeps the block management (allocation, prefix cache,
copy on write) and its share of the heads; each worker holds the same blocks for its heads.

Failures never hang the scheduler: every collective has a timeout, a dead worker's connections
fail the collective at once, and worker processes are checked before each step. Any failure
while ranks exchange a step leaves them out of step, so the group is marked failed: that step's
requests and every later one get :class:`~mstar.errors.WorkerFailedError`, and :meth:`health`
says why (the server's ``/ready`` then answers 503).
"""

from __future__ import annotations

import inspect
import logging
import os
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any

import torch
import torch.multiprocessing as mp
from torch import nn

from mstar.errors import InvalidParameterError, WeightsError, WorkerFailedError
from mstar.layers.kv_cache import KVCache
from mstar.parallel import worker
from mstar.parallel.group import COLLECTIVE_TIMEOUT_S, Comm, join_group, open_store
from mstar.parallel.shard import from_safetensors, load_shard, shard_module
from mstar.parallel.spec import BackboneSpec
from mstar.parallel.step import Op, dtype_code, encode_forward, header_bytes, send_tensors
from mstar.settings import RunnerSettings, Sizing

__all__ = ["ShardedKVCache", "TensorParallel", "start_tensor_parallel"]

log = logging.getLogger("mstar.parallel")

#: How long workers may take to build and load their shards.
START_TIMEOUT_S = 600.0


class ShardedKVCache(KVCache):
    """Rank 0's KV cache under tensor parallelism: its share of the heads, plus a record of the
    block copies (copy on write) that the workers must repeat before the next forward."""

    def __init__(self, cache_id: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.cache_id = cache_id
        self.pending_copies: list[tuple[int, int, int]] = []

    def _copy_block(self, src: int, dst: int) -> None:
        super()._copy_block(src, dst)
        self.pending_copies.append((self.cache_id, src, dst))


class TensorParallel:
    """``world`` ranks on this machine: this process (rank 0) and ``world - 1`` spawned workers."""

    def __init__(
        self,
        world: int,
        specs: Sequence[BackboneSpec],
        *,
        device: torch.device,
        dtype: torch.dtype,
        batch_invariant: bool = True,
        timeout_s: float = COLLECTIVE_TIMEOUT_S,
    ) -> None:
        if world < 2:
            raise InvalidParameterError("tensor parallelism needs at least 2 ranks", param="tensor_parallel_size")
        self.world, self.specs = world, list(specs)
        self.device, self.dtype = _rank_device(device, 0), dtype
        self._failure: str | None = None
        self._closed = False
        self._caches: dict[int, ShardedKVCache] = {}
        self._attached: list[nn.Module] = []
        ctx = mp.get_context("spawn")  # never fork: torch's threads already exist in this process
        store = open_store(world, timeout_s)
        threads = max(1, (os.cpu_count() or 1) // world) if self.device.type == "cpu" else 1
        self._conns: list[Connection] = []
        self._procs: list[Any] = []
        try:
            for rank in range(1, world):
                parent, child = ctx.Pipe(duplex=True)
                proc = ctx.Process(
                    target=worker.main,
                    args=(rank, world, store.port, child, self.specs, str(_rank_device(device, rank)),
                          dtype_code(dtype), batch_invariant, threads, timeout_s),
                    name=f"mstar-tp-worker-{rank}",
                    daemon=True,
                )
                proc.start()
                child.close()
                self._conns.append(parent)
                self._procs.append(proc)
            self._await_loaded()
            self.comm: Comm = join_group(store, 0, world, self.device, timeout_s)
        except BaseException:
            self._kill()
            raise
        self._store = store

    # ------------------------------------------------------------------ set-up
    def _await_loaded(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        for rank, (conn, proc) in enumerate(zip(self._conns, self._procs, strict=True), start=1):
            while not conn.poll(0.2):
                if not proc.is_alive():
                    raise WorkerFailedError(f"tensor-parallel worker {rank} exited while loading (code {proc.exitcode})")
                if time.monotonic() > deadline:
                    raise WorkerFailedError(f"tensor-parallel worker {rank} did not load within {START_TIMEOUT_S:.0f} s")
            msg = _recv_text(conn)
            if msg != "loaded":
                raise WorkerFailedError(f"tensor-parallel worker {rank} failed to start: {msg}")

    def attach(self, module: nn.Module, backbone: int) -> nn.Module:
        """Shard rank 0's ``module`` in place as ``specs[backbone]`` says, and route its seam method
        through the workers. Returns ``module``.

        The family's loader left the backbone's parameters on the meta device (see
        :mod:`mstar.parallel.rank0`): like a worker, rank 0 reads only its slices of them from the
        checkpoint files. The ``skip`` submodules must already hold their weights.
        """
        spec = self.specs[backbone]
        loaded = [
            n for n, p in module.named_parameters()
            if not p.is_meta and not any(n == s or n.startswith(s + ".") for s in spec.skip)
        ]
        if loaded:
            raise WeightsError(
                f"rank 0 loaded {len(loaded)} sharded backbone tensors whole (e.g. {loaded[0]!r}); "
                "the family's loader must leave them on the meta device (mstar.parallel.rank0.deferred)"
            )
        plan = shard_module(module, self.comm, skip=spec.skip)
        reader = from_safetensors(spec.files, spec.prefix, 0, self.world)
        load_shard(module, plan, reader, device=self.device, dtype=self.dtype)
        method: Callable[..., Any] = getattr(type(module), spec.method)
        sig = inspect.signature(method)
        names = list(sig.parameters)

        def seam(*args: Any, **kwargs: Any) -> Any:
            bound = sig.bind(module, *args, **kwargs)
            wire = [(names.index(k), v) for k, v in bound.arguments.items() if k != names[0]]
            return self._run(backbone, wire, lambda: method(module, *args, **kwargs))

        # An instance attribute shadows the class's method, so every caller goes through the seam.
        object.__setattr__(module, spec.method, seam)
        self._attached.append(module)
        return module

    def new_cache(self, **kwargs: Any) -> ShardedKVCache:
        """A :class:`~mstar.layers.kv_cache.KVCache` (same keyword arguments, full head count) of
        which this rank holds its share of the key/value heads; every worker creates its share."""
        heads = int(kwargs.pop("num_kv_heads"))
        local = _local_kv_heads(heads, self.world)
        cache_id = len(self._caches)
        cache = ShardedKVCache(cache_id, num_kv_heads=local, **kwargs)
        self._check()
        head = [
            Op.NEW_CACHE, cache_id, cache.k.shape[0], cache.num_slots, cache.max_len, local, cache.k.shape[-1],
            cache.block_size, cache.num_blocks, dtype_code(cache.k.dtype),
        ]
        self._send_all(header_bytes(head))
        self._caches[cache_id] = cache
        return cache

    # ------------------------------------------------------------------ steps
    def _run(self, backbone: int, wire: list[tuple[int, Any]], local: Callable[[], Any]) -> Any:
        self._check()
        copies = [c for cache in self._caches.values() for c in cache.pending_copies]
        head, tensors = encode_forward(backbone, copies, wire, {id(c): i for i, c in self._caches.items()})
        try:
            self._send_all(header_bytes(head))
            for cache in self._caches.values():
                cache.pending_copies.clear()
            send_tensors(self.comm, tensors)
            return local()
        except WorkerFailedError:
            raise
        except Exception as exc:
            raise self._fail(f"a tensor-parallel step failed: {type(exc).__name__}: {exc}") from exc

    def inject_failure(self, rank: int = 1) -> None:
        """Test seam: worker ``rank`` fails its next step (it raises, reports and exits)."""
        self._conns[rank - 1].send_bytes(header_bytes([Op.FAIL]))

    def _send_all(self, data: bytes) -> None:
        for rank, conn in enumerate(self._conns, start=1):
            try:
                conn.send_bytes(data)
            except OSError as exc:
                raise self._fail(f"tensor-parallel worker {rank} is gone ({exc})") from exc

    def _check(self) -> None:
        if self._failure is not None:
            raise WorkerFailedError(self._failure)
        if self._closed:
            raise WorkerFailedError("the tensor-parallel group is closed")
        for rank, proc in enumerate(self._procs, start=1):
            if not proc.is_alive():
                raise self._fail(f"tensor-parallel worker {rank} died (exit code {proc.exitcode})")

    def _fail(self, reason: str) -> WorkerFailedError:
        """Mark the group failed (ranks are out of step now), stop the workers, and say why."""
        told = [m for conn in self._conns if (m := _poll_text(conn)) is not None]
        if told:
            reason = f"{reason}; worker said: {told[0].strip().splitlines()[-1]}"
        if self._failure is None:
            self._failure = reason
            log.error("%s", reason)
        self._kill()
        return WorkerFailedError(self._failure)

    # ------------------------------------------------------------------ health and shutdown
    def health(self) -> str | None:
        """None while every rank can serve, else why not."""
        if self._failure is not None:
            return self._failure
        for rank, proc in enumerate(self._procs, start=1):
            if not proc.is_alive():
                return f"tensor-parallel worker {rank} died (exit code {proc.exitcode})"
        return None

    @property
    def pids(self) -> list[int]:
        """The worker processes' ids (for tests and operators)."""
        return [p.pid for p in self._procs if p.pid is not None]

    def close(self, timeout: float = 10.0) -> None:
        """Stop the workers (asking first, then terminating); idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._failure is None:
            for conn in self._conns:
                try:
                    conn.send_bytes(header_bytes([Op.SHUTDOWN]))
                except OSError:
                    pass
        deadline = time.monotonic() + timeout
        for proc in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        self._kill()

    def _kill(self) -> None:
        for proc in self._procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self._procs:
            proc.join(5.0)
            if proc.is_alive():
                proc.kill()
                proc.join(5.0)
        for conn in self._conns:
            conn.close()


def start_tensor_parallel(
    settings: RunnerSettings, sizing: Sizing, specs: Callable[[], Sequence[BackboneSpec]]
) -> TensorParallel | None:
    """The group a runner's ``settings`` ask for, or None at ``tensor_parallel_size == 1`` (nothing
    is started or even described: ``specs`` is called only when workers start). Static-shape
    (CUDA-graph) decode is not combined with it yet."""
    if settings.tensor_parallel_size == 1:
        return None
    if sizing.cuda_graphs:
        raise InvalidParameterError(
            "cuda_graphs cannot be combined with tensor_parallel_size > 1 yet", param="cuda_graphs"
        )
    return TensorParallel(
        settings.tensor_parallel_size, specs(), device=settings.device, dtype=settings.dtype,
        batch_invariant=sizing.batch_invariant,
    )


def _local_kv_heads(heads: int, world: int) -> int:
    if heads % world == 0:
        return heads // world
    if world % heads == 0:
        return 1
    raise InvalidParameterError(
        f"{heads} key/value heads cannot be split over {world} ranks (need one to divide the other)",
        param="tensor_parallel_size",
    )


def _rank_device(device: torch.device, rank: int) -> torch.device:
    """One device per rank: CUDA rank r uses ``cuda:r`` (counting from the Engine's device)."""
    if device.type != "cuda":
        return device
    first = device.index or 0
    return torch.device("cuda", first + rank)


def _recv_text(conn: Connection) -> str:
    return conn.recv_bytes().decode(errors="replace")


def _poll_text(conn: Connection, wait: float = 0.5) -> str | None:
    try:
        return _recv_text(conn) if not conn.closed and conn.poll(wait) else None
    except (EOFError, OSError):
        return None
