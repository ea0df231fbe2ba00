"""A tensor-parallel worker: rank ``r > 0``, started by rank 0 with the spawn context.

It builds its shard of every backbone (reading only its slices of the checkpoint), tells rank 0
it is ready, joins the process group, then loops: wait for a step header on its pipe, receive the
step's tensors, run the same forward as rank 0 on its shard (the collectives inside keep the ranks
in step), repeat. It keeps its own KV-cache storage (its share of the key/value heads) with the
block layout rank 0 manages, applying the block copies rank 0 announces.

The pipe is also how the worker's life is tied to rank 0's: when rank 0 goes away the pipe ends
and the worker exits. A step that fails reports its error on the pipe and exits the process, which
closes its connections so rank 0's collective fails at once instead of waiting for a timeout.
"""

from __future__ import annotations

import inspect
import os
import traceback
from multiprocessing.connection import Connection
from typing import Any

import torch
from torch import nn

from mstar.layers.invariant import set_batch_invariance
from mstar.layers.kv_cache import KVCache
from mstar.parallel.group import Comm, join_group
from mstar.parallel.shard import from_safetensors, load_shard, params_on_meta, shard_module
from mstar.parallel.spec import BackboneSpec
from mstar.parallel.step import Op, code_dtype, decode_header, materialize, parse_ints, receive_tensors

__all__ = ["build_worker_backbone", "main"]


def build_worker_backbone(spec: BackboneSpec, comm: Comm, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """This rank's shard of ``spec``'s backbone: built with meta parameters, sharded, then filled
    with its slices of the checkpoint; the rank-0-only submodules are dropped."""
    with params_on_meta():
        module = spec.builder()(spec.config)
    for name in spec.skip:
        owner, _, leaf = name.rpartition(".")
        setattr(module.get_submodule(owner), leaf, None)
    plan = shard_module(module, comm)
    load_shard(module, plan, from_safetensors(spec.files, spec.prefix, comm.rank, comm.world), device=device, dtype=dtype)
    for sub in module.modules():  # rotary tables and such: computed on the CPU, kept in their dtype
        for key, buf in list(sub._buffers.items()):
            if buf is not None:
                sub._buffers[key] = buf.to(device)
    return module.eval()


def main(
    rank: int,
    world: int,
    port: int,
    conn: Connection,
    specs: list[BackboneSpec],
    device: str,
    dtype_code: int,
    batch_invariant: bool,
    threads: int,
    timeout_s: float,
) -> None:
    """The worker process's entry point (see the module docstring)."""
    dev = torch.device(device)
    try:
        torch.set_num_threads(threads)
        set_batch_invariance(batch_invariant)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        # The group's ranks hold only their layers' communicator; building the shards first
        # keeps rank 0 from waiting in the rendezvous while a worker is still loading.
        placeholder = Comm(rank, world, dev)
        modules = [build_worker_backbone(spec, placeholder, dev, code_dtype(dtype_code)) for spec in specs]
        conn.send_bytes(b"loaded")
        comm = join_group(port, rank, world, dev, timeout_s)
        placeholder.pg = comm.pg
    except BaseException:
        conn.send_bytes(("error: " + traceback.format_exc()).encode())
        return
    _serve(conn, placeholder, specs, modules)


def _serve(conn: Connection, comm: Comm, specs: list[BackboneSpec], modules: list[nn.Module]) -> None:
    caches: dict[int, KVCache] = {}
    methods = [getattr(type(m), spec.method) for m, spec in zip(modules, specs, strict=True)]
    names = [list(inspect.signature(fn).parameters) for fn in methods]
    while True:
        try:
            ints = parse_ints(conn.recv_bytes())
        except (EOFError, OSError):
            return  # rank 0 is gone
        try:
            if ints[0] == Op.SHUTDOWN:
                return
            if ints[0] == Op.NEW_CACHE:
                cache_id, layers, slots, max_len, heads, dim, block, blocks, dt = ints[1:10]
                caches[cache_id] = KVCache(
                    num_layers=layers, num_slots=slots, max_len=max_len, num_kv_heads=heads, head_dim=dim,
                    device=comm.device, dtype=code_dtype(dt), block_size=block, num_blocks=blocks,
                )
                continue
            if ints[0] == Op.FAIL:
                raise RuntimeError("injected worker failure (Op.FAIL)")
            step = decode_header(ints)
            tensors = receive_tensors(comm, step.slots)
            for cache_id, src, dst in step.copies:
                cache = caches[cache_id]
                cache.k[:, dst] = cache.k[:, src]
                cache.v[:, dst] = cache.v[:, src]
            kwargs: dict[str, Any] = {
                names[step.backbone][i]: materialize(v, tensors, caches) for i, v in step.args
            }
            with torch.inference_mode():
                methods[step.backbone](modules[step.backbone], **kwargs)
        except BaseException:
            try:
                conn.send_bytes(("error: " + traceback.format_exc()).encode())
            finally:
                # Exiting closes this rank's connections: the other ranks' collectives fail now.
                os._exit(1)
