"""Batch-invariant matmuls on the CPU: a row's result does not depend on the other rows.

Why plain ``F.linear`` is not enough: CPU BLAS libraries pick a kernel by the
shapes, and kernels round differently. With torch's MKL on an AMD EPYC (Zen 4)
``torch.mm(weight, rows.T)`` takes one kernel for 1 to 3 rows, a four-row
kernel (plus the first kernel for a remainder) for 4 to 11 rows, and a third,
blocked kernel from 12 rows on; ``F.linear`` does the same with a different
single-row path. Each gives different last bits, so a request decoding alone
and the same request in a batch of 3, 4 or 17 get different logits, and a
sampled token can flip. Which row counts share a kernel depends on the CPU and
the BLAS build (on an Intel CPU 2 to 56 rows happened to agree), so no row-count
rule measured on one machine holds on another. The results also depend on the
memory alignment of the operands (a single row at a misaligned address rounds
differently).

What is done instead, invariant by construction: every BLAS call has the same
shape, ``BLOCK_ROWS`` rows. The rows are copied into a fresh zero-filled buffer
whose blocks all start on a 64-byte boundary, the last block padded with zero
rows, and each block is one ``torch.mm(weight, block.T)``: the same kernel, the
same operand layout and alignment, whatever the number of rows. A row's result
then depends on nothing but the row, the weight and its position inside the
block. That last dependence is the one thing left to the BLAS (all of a
kernel's columns normally share one reduction order), so it is *checked*, not
assumed: the first time a weight shape (and alignment, and thread count) is
seen, one row repeated in every position of a block must give bitwise the same
output in every position; if not, that weight falls back to one row per call,
which is invariant whatever the BLAS does (with a warning: it is slower).

The trade-off, measured on the AMD EPYC with 2 threads (see the report of the
change for the full table): four-row blocks keep batch-1 decode about as fast
as before (``torch.mm`` on a small block streams the weight once, and on the
large vocabulary heads, which dominate small models, it is 1.1-2x *faster*
than ``F.linear`` on one row), while cache-resident layers cost 1.4-1.8x a
one-row ``F.linear``. Larger inputs pay one weight pass per four rows: a batch
of 16 costs about 1.3x ``F.linear`` on 16 rows, and a long prefill on
compute-bound shapes 3-5x (the blocked many-row kernels are not used, since a
row would then round differently alone). Invariance holds for a fixed thread
count (on this machine 1 and 2 threads also agree).

GPUs, other dtypes and code being traced by ``torch.compile`` take the plain
``F.linear`` path.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BLOCK_ROWS", "BatchInvariantLinear", "invariant_linear"]

#: Rows in every BLAS call (the last block of an input is padded with zero rows).
BLOCK_ROWS = 4

_ALIGN_BYTES = 64
#: Per (weight shape, strides, alignment, threads, block rows): the block rows that passed the position check.
_checked_rows: dict[tuple[int, ...], int] = {}


def _aligned_zeros(numel: int, like: torch.Tensor) -> torch.Tensor:
    """A fresh zero-filled 1-D float buffer starting on a 64-byte boundary."""
    buf = torch.zeros(numel, dtype=like.dtype)
    if buf.data_ptr() % _ALIGN_BYTES == 0:
        return buf
    step = like.element_size()
    buf = torch.zeros(numel + _ALIGN_BYTES // step, dtype=like.dtype)
    off = (-buf.data_ptr() % _ALIGN_BYTES) // step
    return buf[off : off + numel]


def _blocks(rows: torch.Tensor, b: int) -> torch.Tensor:
    """``rows`` [m, k] laid out as [ceil(m / b), b, k] blocks, each contiguous, 64-byte aligned, zero padded."""
    m, k = rows.shape
    nb = -(-m // b)
    per = _ALIGN_BYTES // rows.element_size()
    stride = -(-(b * k) // per) * per  # block starts stay aligned whatever k is
    if m == nb * b and stride == b * k and rows.is_contiguous() and rows.data_ptr() % _ALIGN_BYTES == 0:
        return rows.view(nb, b, k)  # already in exactly that layout: no copy
    grid = _aligned_zeros(nb * stride, rows).as_strided((nb, b, k), (stride, k, 1))
    full = m // b
    if full:
        grid[:full].copy_(rows[: full * b].reshape(full, b, k))
    if m > full * b:
        grid[full, : m - full * b].copy_(rows[full * b :])
    return grid


def _block_rows(weight: torch.Tensor) -> int:
    """``BLOCK_ROWS`` if a block's output columns round alike for ``weight``, else 1 (checked once per key)."""
    b = BLOCK_ROWS
    if b == 1:
        return 1
    key = (*weight.shape, *weight.stride(), weight.data_ptr() % _ALIGN_BYTES, torch.get_num_threads(), b)
    known = _checked_rows.get(key)
    if known is not None:
        return known
    gen = torch.Generator().manual_seed(0)  # a private generator: the global RNG stream is left alone
    probe = torch.randn(1, weight.shape[1], generator=gen).expand(b, -1)
    with torch.no_grad():
        out = torch.mm(weight.detach(), _blocks(probe, b)[0].T)
    same = all(torch.equal(out[:, 0], out[:, j]) for j in range(1, b))
    if not bool(out[:, 0].ne(0).any()):
        return b  # a weight of zeros tells nothing (any order gives zeros): check again next time
    if not same:
        warnings.warn(
            f"invariant_linear: a {b}-row block rounds its columns differently for a {tuple(weight.shape)} weight "
            "on this CPU/BLAS; computing it one row per call (slower, still batch-invariant)",
            RuntimeWarning,
            stacklevel=3,
        )
    _checked_rows[key] = b if same else 1
    return _checked_rows[key]


def invariant_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` whose rows (all leading dims flattened) are computed independently of each other."""
    if (
        x.device.type != "cpu"
        or x.dtype != torch.float32
        or weight.dtype != torch.float32
        or x.numel() == 0
        or weight.numel() == 0
        or torch.compiler.is_compiling()
    ):
        return F.linear(x, weight, bias)
    lead = x.shape[:-1]
    rows = x.reshape(-1, x.shape[-1])
    m = rows.shape[0]
    b = _block_rows(weight)
    grid = _blocks(rows, b)
    parts = [torch.mm(weight, blk.T).T for blk in grid.unbind(0)]  # each [b, n]
    if m < len(parts) * b:
        parts[-1] = parts[-1][: m - (len(parts) - 1) * b]
    out = parts[0].contiguous() if len(parts) == 1 else torch.cat(parts, dim=0)
    if bias is not None:
        out = out + bias  # elementwise: the same for a row whatever its neighbours
    return out.reshape(*lead, weight.shape[0])


class BatchInvariantLinear(nn.Linear):
    """``nn.Linear`` (same parameters and checkpoint names) computed with :func:`invariant_linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return invariant_linear(x, self.weight, self.bias)
