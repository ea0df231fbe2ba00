"""How a runner is sized and placed: the one way serving settings reach a model runner.

``Engine(...)`` builds a :class:`RunnerSettings` from its keyword arguments and
``mstar-server`` from its flags; every runner receives it in its constructor
and resolves the fields left at ``None`` against its family's defaults with
:meth:`RunnerSettings.resolve`. Runners never read environment variables.

===================  ==========================================================
field                meaning
===================  ==========================================================
``device``           where the weights, the KV cache and the sampling live
``dtype``            the weights' and activations' dtype
``max_batch_size``   requests running at once; for the autoregressive families
                     this is also the number of KV cache slots
``max_seq_len``      positions per request in the KV cache (prompt + output)
``prefill_chunk``    prompt tokens prefilled per step, across requests, so that
                     running requests keep decoding while a long prompt loads
``cuda_graphs``      static-shape decode (CUDA graphs on CUDA, padding on CPU)
``kv_cache_tokens``  positions in the paged KV pool, shared by all requests
                     (default: every request at ``max_seq_len``, so the pool
                     never runs out; smaller pools admit and preempt by blocks)
``kv_block_size``    positions per KV block (the unit of allocation and of
                     prefix sharing)
``batch_invariant``  CPU fp32 only: compute every linear layer row by row in a
                     fixed shape, so a seeded request gives bitwise the same
                     output alone or in any batch (default on). Off, batched
                     decode and prefill run at ``F.linear`` speed (several times
                     faster per row at batch 8 and more) and results may differ
                     in the last bits with the batch (mstar/layers/invariant.py)
===================  ==========================================================

``tensor_parallel_size`` (not a sizing: the same for every family) is the number of
ranks the autoregressive backbones are sharded over, this process plus N - 1 worker
processes (mstar/parallel/); 1, the default, starts nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from mstar.errors import InvalidParameterError

__all__ = ["RunnerSettings", "Sizing"]

_SIZES = ("max_batch_size", "max_seq_len", "prefill_chunk", "kv_cache_tokens", "kv_block_size")
_FLAGS = ("cuda_graphs", "batch_invariant")


@dataclass(frozen=True, slots=True)
class Sizing:
    """A runner's resolved limits: its family defaults with the user's overrides applied."""

    max_batch_size: int
    max_seq_len: int
    prefill_chunk: int = 512
    cuda_graphs: bool = False
    kv_cache_tokens: int | None = None
    kv_block_size: int = 16
    batch_invariant: bool = True

    @property
    def kv_pool_tokens(self) -> int:
        """The KV pool's positions: ``kv_cache_tokens``, else room for every request at full length."""
        return self.kv_cache_tokens if self.kv_cache_tokens is not None else self.max_batch_size * self.max_seq_len


@dataclass(frozen=True, slots=True)
class RunnerSettings:
    """Serving settings for one runner; ``None`` means "the family's default"."""

    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    max_batch_size: int | None = None
    max_seq_len: int | None = None
    prefill_chunk: int | None = None
    cuda_graphs: bool | None = None
    kv_cache_tokens: int | None = None
    kv_block_size: int | None = None
    batch_invariant: bool | None = None
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        tp = self.tensor_parallel_size
        if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
            raise InvalidParameterError(
                f"tensor_parallel_size must be a positive integer, got {tp!r}", param="tensor_parallel_size"
            )
        for name in _SIZES:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise InvalidParameterError(f"{name} must be a positive integer, got {value!r}", param=name)
        for flag in _FLAGS:
            value = getattr(self, flag)
            if value is not None and not isinstance(value, bool):
                raise InvalidParameterError(f"{flag} must be true or false, got {value!r}", param=flag)

    def resolve(self, defaults: Sizing) -> Sizing:
        """``defaults`` with every field this object sets replacing the family's value."""
        overrides = {name: getattr(self, name) for name in (*_SIZES, *_FLAGS) if getattr(self, name) is not None}
        sizing = replace(defaults, **overrides)
        if sizing.kv_pool_tokens < sizing.max_seq_len:
            # One request at full length must always fit, or it could wait for blocks forever.
            raise InvalidParameterError(
                f"kv_cache_tokens ({sizing.kv_pool_tokens}) must hold at least one request at max_seq_len "
                f"({sizing.max_seq_len})",
                param="kv_cache_tokens",
            )
        return sizing

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"
