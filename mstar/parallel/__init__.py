"""Tensor parallelism over ``torch.distributed``: one model sharded across the ranks of this machine.

``Engine(model, tensor_parallel_size=N)`` makes the Engine's process rank 0 (the scheduler and the
runner stay there) and starts ``N - 1`` worker processes; each autoregressive backbone forward is
broadcast as a compact step and run by every rank on its shard (Megatron-style column/row
linears, one all-reduce per attention and per MLP block). See docs/scaling.md.

Modules: ``group`` (process groups and collectives), ``layers`` (parallel layers), ``shard``
(the sharding plan and slice loading), ``step`` (the step message), ``worker`` (the worker loop),
``host`` (rank 0's side), ``spec`` (what a worker builds), ``rank0`` (what rank 0's loader
leaves unread).
"""

from __future__ import annotations

from mstar.parallel.host import ShardedKVCache, TensorParallel, start_tensor_parallel
from mstar.parallel.rank0 import NOTHING, Deferred, deferred
from mstar.parallel.spec import BackboneSpec

__all__ = ["NOTHING", "BackboneSpec", "Deferred", "ShardedKVCache", "TensorParallel", "deferred", "start_tensor_parallel"]
