"""Decode steps with static shapes, for CUDA graphs: batch and context padded to buckets.

A CUDA graph replays a fixed sequence of kernels on fixed addresses and
shapes, which removes the per-kernel launch cost that dominates a decode step
at small batch sizes. A decode step's shapes vary with the number of running
requests and with the longest context, so here:

* the batch is padded up to a bucket size (1, 2, 4, 8, ... ``max_batch``);
  padding rows use one reserved *scratch* slot of the cache and are dropped;
* the attended context is padded up to a multiple of ``context_block``
  positions (masked), so it changes shape once per block, not every step;
* the KV cache tensors are marked as static addresses, so the in-place cache
  writes happen inside the graph on the real cache.

The model is then wrapped with ``torch.compile(mode="reduce-overhead")``,
which records one CUDA graph per (batch bucket, context bucket) and replays
it. The padding logic is device-independent (and tested on CPU without
compilation); compilation is only requested on CUDA. Opt-in: runners enable
it when asked (``Engine(..., cuda_graphs=True)``, see mstar/settings.py), eager decoding stays the
default.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence

import torch

from mstar.layers import attention
from mstar.layers.attention import AttnBatch
from mstar.layers.kv_cache import KVCache

log = logging.getLogger("mstar.graphed_decode")

__all__ = ["BucketedDecoder", "bucket_for"]


def bucket_for(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket holding ``n`` rows (``n`` itself past the largest bucket)."""
    for b in buckets:
        if n <= b:
            return b
    return n


class BucketedDecoder:
    """One-token decode forward for a batch of slots, at bucketed shapes (optionally compiled).

    ``model(input_ids [B, 1], cache, batch) -> logits [B, V]`` is any decoder
    with the shared cache/attention contract (e.g. :class:`~mstar.layers.llama.LlamaForCausalLM`).
    ``scratch_slot`` is a cache slot reserved for padding rows; it is never
    given to a request. ``per_batch_only`` (default: when decode attention goes
    to the paged kernel) keeps every shape independent of the context.
    """

    def __init__(
        self,
        model: Callable[..., torch.Tensor],
        cache: KVCache,
        scratch_slot: int,
        *,
        max_batch: int,
        context_block: int = 256,
        compile: bool = False,
        per_batch_only: bool | None = None,
    ) -> None:
        self.cache = cache
        self.scratch = scratch_slot
        self.context_block = context_block
        self.buckets = [1]
        while self.buckets[-1] < max_batch:
            self.buckets.append(min(self.buckets[-1] * 2, max_batch))
        self.compiled = compile
        # With the paged decode kernel, attention reads each row's length from a device tensor, so the
        # context needs no padding to buckets: every block-table row is full width and a step's shapes
        # depend on its batch bucket alone (one graph per bucket). Without it the masked SDPA path
        # needs the context padded, and graphs are per (batch, context) bucket.
        probe = torch.empty(1, 1, 1, cache.k.shape[-1], device=cache.k.device)
        self.per_batch_only = attention.use_paged_kernel(probe, cache.k[0], None) if per_batch_only is None else per_batch_only
        self.shapes: set[tuple[int, int]] = set()
        if compile:
            # The cache is written in place inside the graph: its storage must stay where it is.
            torch._dynamo.mark_static_address(cache.k)
            torch._dynamo.mark_static_address(cache.v)
            # Room for every graph this decoder can ask for, so none silently falls back to eager.
            contexts = 1 if self.per_batch_only else -(-cache.max_len // context_block)
            limit = len(self.buckets) * contexts + 2
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, limit)
            self.forward: Callable[..., torch.Tensor] = torch.compile(model, mode="reduce-overhead", dynamic=False)
        else:
            self.forward = model

    def __call__(self, tokens: Sequence[int], slots: Sequence[int]) -> torch.Tensor:
        """Append one token per slot and return the logits [len(slots), V]; commits the real rows."""
        cache = self.cache
        device = cache.k.device
        n = len(slots)
        padded = bucket_for(n, self.buckets)
        pad = padded - n
        cache.lengths[self.scratch] = 0
        all_slots = [*slots, *([self.scratch] * pad)]
        built = batch = AttnBatch.build(cache, all_slots, [1] * padded, device=device)
        if self.per_batch_only:
            # Full-width tables, lengths in batch.context_lens; no host-side per-row lists in the graph.
            ctx = cache.blocks_per_slot * cache.block_size
            table = cache.table(all_slots, cache.blocks_per_slot, device=device)
            batch = dataclasses.replace(batch, kv_len=ctx, mask=None, table=table, starts=[])
        else:
            # Context padded to a whole block (masked), so its shape changes once per block.
            ctx = min(cache.max_len, -(-batch.kv_len // self.context_block) * self.context_block)
            keys = torch.arange(ctx, device=device)
            mask = (keys[None, None, None, :] <= batch.positions[:, None, :, None]).expand(padded, 1, 1, ctx)
            table = cache.table(all_slots, -(-ctx // cache.block_size), device=device)
            batch = dataclasses.replace(batch, kv_len=ctx, mask=mask, table=table)
        if self.compiled and (padded, ctx) not in self.shapes:
            self.shapes.add((padded, ctx))
            log.info("decode graph %d: batch bucket %d, context %d positions", len(self.shapes), padded, ctx)
        ids = torch.zeros(padded, 1, dtype=torch.long)
        ids[:n, 0] = torch.tensor(list(tokens), dtype=torch.long)
        logits = self.forward(ids.to(device), cache, batch)
        built.commit(cache)
        cache.lengths[self.scratch] = 0
        # A replayed graph reuses its output buffer: hand out a copy.
        return logits[:n].clone() if self.compiled else logits[:n]
