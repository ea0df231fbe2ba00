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
from collections.abc import Callable, Sequence

import torch

from mstar.layers.attention import AttnBatch
from mstar.layers.kv_cache import KVCache

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
    given to a request.
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
    ) -> None:
        self.cache = cache
        self.scratch = scratch_slot
        self.context_block = context_block
        self.buckets = [1]
        while self.buckets[-1] < max_batch:
            self.buckets.append(min(self.buckets[-1] * 2, max_batch))
        self.compiled = compile
        if compile:
            # The cache is written in place inside the graph: its storage must stay where it is.
            torch._dynamo.mark_static_address(cache.k)
            torch._dynamo.mark_static_address(cache.v)
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
        batch = AttnBatch.build(cache, all_slots, [1] * padded, device=device)
        # Context padded to a whole block (masked), so its shape changes once per block.
        ctx = min(cache.max_len, -(-batch.kv_len // self.context_block) * self.context_block)
        keys = torch.arange(ctx, device=device)
        mask = (keys[None, None, None, :] <= batch.positions[:, None, :, None]).expand(padded, 1, 1, ctx)
        table = cache.table(all_slots, -(-ctx // cache.block_size), device=device)
        batch = dataclasses.replace(batch, kv_len=ctx, mask=mask, table=table)
        ids = torch.zeros(padded, 1, dtype=torch.long)
        ids[:n, 0] = torch.tensor(list(tokens), dtype=torch.long)
        logits = self.forward(ids.to(device), cache, batch)
        batch.commit(cache)
        cache.lengths[self.scratch] = 0
        # A replayed graph reuses its output buffer: hand out a copy.
        return logits[:n].clone() if self.compiled else logits[:n]
