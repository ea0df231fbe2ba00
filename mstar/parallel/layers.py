"""Tensor-parallel layers (Megatron-style): column- and row-parallel linears, a vocabulary-parallel
embedding and LM head.

Each keeps the parameter names of the layer it replaces (``weight``, ``bias``), holding only this
rank's slice, so a sharded module's ``state_dict`` names match the checkpoint's. A column-parallel
linear splits the output features and needs no communication; the row-parallel linear after it
splits the input features and sums the partial outputs with one all-reduce. So an attention block
(q/k/v column, o row) and an MLP block (gate/up column, down row) each cost one all-reduce.

Matmuls go through :func:`~mstar.layers.invariant.invariant_linear` when the layer replaced was
batch-invariant, so the CPU's seeded results keep their independence from the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mstar.layers.invariant import BatchInvariantLinear, invariant_linear
from mstar.parallel.group import Comm

__all__ = ["ColumnParallelLinear", "ParallelLMHead", "RowParallelLinear", "VocabParallelEmbedding", "shard_range"]


def shard_range(size: int, rank: int, world: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of ``size`` held by ``rank``: ``ceil(size / world)`` each, the last ranks fewer."""
    per = -(-size // world)
    return min(rank * per, size), min((rank + 1) * per, size)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, invariant: bool) -> torch.Tensor:
    return invariant_linear(x, weight, bias) if invariant else F.linear(x, weight, bias)


def _empty(*shape: int) -> nn.Parameter:
    # Built on the meta device and filled by the loader (mstar/parallel/shard.py).
    return nn.Parameter(torch.empty(*shape, device="meta"), requires_grad=False)


class ColumnParallelLinear(nn.Module):
    """``out_local`` of the output features (this rank's rows of the weight); no communication."""

    def __init__(self, in_features: int, out_local: int, *, bias: bool, invariant: bool) -> None:
        super().__init__()
        self.in_features, self.out_features, self.invariant = in_features, out_local, invariant
        self.weight = _empty(out_local, in_features)
        self.bias = _empty(out_local) if bias else None

    @classmethod
    def like(cls, linear: nn.Linear, out_local: int) -> ColumnParallelLinear:
        return cls(linear.in_features, out_local, bias=linear.bias is not None, invariant=isinstance(linear, BatchInvariantLinear))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _linear(x, self.weight, self.bias, self.invariant)


class RowParallelLinear(nn.Module):
    """``in_local`` of the input features; the partial outputs are summed over ranks.

    ``reduce=False`` leaves the sum to the caller (a block that adds several partial results and
    reduces once); the bias, which must be counted once, is then added on rank 0 only.
    """

    def __init__(self, in_local: int, out_features: int, *, bias: bool, invariant: bool, comm: Comm, reduce: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features, self.invariant = in_local, out_features, invariant
        self.comm, self.reduce = comm, reduce
        self.weight = _empty(out_features, in_local)
        self.bias = _empty(out_features) if bias else None

    @classmethod
    def like(cls, linear: nn.Linear, in_local: int, comm: Comm, *, reduce: bool = True) -> RowParallelLinear:
        return cls(
            in_local, linear.out_features, bias=linear.bias is not None,
            invariant=isinstance(linear, BatchInvariantLinear), comm=comm, reduce=reduce,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _linear(x, self.weight, None, self.invariant)
        if self.reduce:
            out = self.comm.all_reduce(out)
            return out if self.bias is None else out + self.bias
        return out if self.bias is None or self.comm.rank != 0 else out + self.bias


class VocabParallelEmbedding(nn.Module):
    """This rank's rows ``[start, stop)`` of the vocabulary; ids outside them look up zeros, and one
    all-reduce assembles every token's embedding."""

    def __init__(self, num_embeddings: int, embedding_dim: int, comm: Comm) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.comm = num_embeddings, embedding_dim, comm
        self.start, self.stop = shard_range(num_embeddings, comm.rank, comm.world)
        self.weight = _empty(self.stop - self.start, embedding_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mine = (ids >= self.start) & (ids < self.stop)
        local = torch.where(mine, ids - self.start, torch.zeros_like(ids))
        out = F.embedding(local, self.weight) * mine[..., None].to(self.weight.dtype)
        return self.comm.all_reduce(out)


class ParallelLMHead(nn.Module):
    """This rank's vocabulary rows of the head; the logits are gathered on rank 0 (where sampling
    happens), or on every rank with ``gather_all``. Other ranks get their own slice back."""

    def __init__(self, in_features: int, vocab: int, comm: Comm, *, invariant: bool, gather_all: bool = False) -> None:
        super().__init__()
        self.in_features, self.vocab, self.comm = in_features, vocab, comm
        self.invariant, self.gather_all = invariant, gather_all
        self.start, self.stop = shard_range(vocab, comm.rank, comm.world)
        self.per_rank = -(-vocab // comm.world)
        self.weight = _empty(self.stop - self.start, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = _linear(x, self.weight, None, self.invariant)
        pad = self.per_rank - local.shape[-1]
        if pad:  # uneven vocabularies: every rank sends the same size
            local = F.pad(local, (0, pad))
        parts = self.comm.all_gather(local) if self.gather_all else self.comm.gather(local)
        if parts is None:
            return local[..., : self.stop - self.start]
        return torch.cat(parts, dim=-1)[..., : self.vocab]
