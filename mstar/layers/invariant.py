"""Batch-invariant matmuls on the CPU: a row's result does not depend on the other rows.

Why plain ``F.linear`` is not enough: CPU BLAS libraries pick a kernel by the
shapes, and kernels round differently. With torch's MKL on an AMD EPYC (Zen 4)
``torch.mm(weight, rows.T)`` takes one kernel for 1 to 3 rows, a four-row
kernel (plus the first one for a remainder) for 4 to 11 rows, and a blocked
kernel from 12 rows on; ``F.linear`` does the same with another one-row path.
Each gives different last bits, so a request decoding alone and the same
request in a batch of 3, 4 or 17 get different logits, and a sampled token can
flip. Which row counts share a kernel depends on the CPU and the BLAS build (on
an Intel CPU 2 to 56 rows happened to agree), so no row-count rule measured on
one machine holds on another. A one-row call also rounds differently when the
row does not start on the same boundary (measured: 8-byte steps, k=100).

What is done instead, invariant by construction: all the BLAS calls made for
one weight have the same shape, whatever the number of rows. A weight takes
``ROWS_PER_CALL`` rows per call, or ``WIDE_ROWS_PER_CALL`` if it has at least
``WIDE_OUTPUTS`` output features (vocabulary heads). Rows are fed from a
buffer whose blocks all start on a 64-byte boundary, the last block padded with
zero rows, and each block is one ``torch.mm(weight, block.T)``: the same kernel
and the same operand layout and alignment for every row. A row's result then
depends only on the row, the weight and, in blocks of several rows, its position
inside the block. That last dependence is left to the BLAS (a kernel's columns
normally share one reduction order), so it is *checked*, not assumed: the first
time a weight shape (with its alignment and the thread count) is seen, one row
repeated in every position of a block must give bitwise the same output in
every position; if not, that weight falls back to one row per call, which is
invariant whatever the BLAS does (with a warning: it is slower).

The trade-off, measured on the AMD EPYC (the numbers are in the change's
report). A batch-1 step costs what ``F.linear`` costs: ordinary layers make
exactly its one-row call (bitwise the same result), and a vocabulary head's
two-row ``torch.mm``, which streams the weight once, took 0.35-1.2x the time of
a one-row ``F.linear`` (it is the call the previous version made for a lone
row). Batches and prompts pay: on ordinary layers every row is its own call, so
8 rows cost 8 one-row calls where ``F.linear``'s many-row kernels need the time
of about 2.5, and a 64-token prefill took about 4x ``F.linear``'s time on
SmolLM2-135M shapes; heads take 2 rows per weight pass. The many-row kernels
cannot be used: a row would round differently alone. ``ROWS_PER_CALL = 4``
moves the balance: in the layers, rows in batches of 4 or more cost 1.5-2x
less each, and a batch-1 step 1.7-3x more. (MKL threads the many-row calls of
small weights, and those stall for milliseconds when the cores are shared;
it does not thread one-row calls of small weights.) Invariance holds for a
fixed thread count (on this machine 1 and 2 threads also agree).

GPUs, other dtypes and code being traced by ``torch.compile`` take the plain
``F.linear`` path, and so does a thread that turned invariance off with
:func:`batch_invariance` (``Engine(batch_invariant=False)``: batched CPU decode and
prefill at ``F.linear`` speed, at the price of results that may differ in the last bits
with the batch a request shares).
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ROWS_PER_CALL",
    "WIDE_OUTPUTS",
    "WIDE_ROWS_PER_CALL",
    "BatchInvariantLinear",
    "batch_invariance",
    "invariant_linear",
    "set_batch_invariance",
]

# Per thread: each Engine's scheduler thread runs its model under its own setting.
_mode = threading.local()


def set_batch_invariance(on: bool) -> None:
    """Turn batch invariance on or off for the calling thread (on by default)."""
    _mode.on = on


@contextmanager
def batch_invariance(on: bool) -> Iterator[None]:
    """Run a block with batch invariance on or off in this thread."""
    before = getattr(_mode, "on", True)
    _mode.on = on
    try:
        yield
    finally:
        _mode.on = before

#: Rows in every BLAS call of an ordinary weight: one, the call ``F.linear`` makes for a lone row.
ROWS_PER_CALL = 1
#: Rows in every BLAS call of a weight with at least ``WIDE_OUTPUTS`` output features (a vocabulary head).
WIDE_ROWS_PER_CALL = 2
WIDE_OUTPUTS = 32768

_ALIGN_BYTES = 64
#: Per (weight shape, strides, alignment, threads, rows): the rows per call that passed the position check.
_checked_rows: dict[tuple[int, ...], int] = {}


def _aligned(t: torch.Tensor) -> bool:
    return t.is_contiguous() and t.data_ptr() % _ALIGN_BYTES == 0


def _aligned_zeros(numel: int, like: torch.Tensor) -> torch.Tensor:
    """A fresh zero-filled 1-D buffer starting on a 64-byte boundary."""
    buf = torch.zeros(numel, dtype=like.dtype)
    if buf.data_ptr() % _ALIGN_BYTES == 0:
        return buf
    step = like.element_size()
    buf = torch.zeros(numel + _ALIGN_BYTES // step, dtype=like.dtype)
    off = (-buf.data_ptr() % _ALIGN_BYTES) // step
    return buf[off : off + numel]


def _padded_block(rows: torch.Tensor, b: int) -> torch.Tensor:
    """Up to ``b`` rows as one fresh, contiguous, 64-byte aligned [b, k] block, zero rows after them."""
    m, k = rows.shape
    block = F.pad(rows, (0, 0, 0, b - m))
    if _aligned(block) and block.data_ptr() != rows.data_ptr():
        return block
    block = _aligned_zeros(b * k, rows).view(b, k)
    block[:m].copy_(rows)
    return block


def _blocks(rows: torch.Tensor, b: int) -> list[torch.Tensor]:
    """``rows`` [m, k] as ceil(m / b) blocks [b, k], each contiguous and 64-byte aligned, the last zero padded."""
    m, k = rows.shape
    full = m // b
    blocks: list[torch.Tensor] = []
    if full:
        body = rows[: full * b]
        per = _ALIGN_BYTES // rows.element_size()
        if _aligned(body) and (b * k) % per == 0:
            grid = body.view(full, b, k)  # already laid out that way: no copy
        else:
            stride = -(-(b * k) // per) * per  # block starts stay aligned whatever k is
            grid = _aligned_zeros(full * stride, rows).as_strided((full, b, k), (stride, k, 1))
            grid.copy_(body.reshape(full, b, k))
        blocks.extend(grid.unbind(0))
    if m > full * b:
        blocks.append(_padded_block(rows[full * b :], b))
    return blocks


def _block_rows(weight: torch.Tensor) -> int:
    """The rows per call for ``weight``: its setting if a block's columns round alike (checked once per key), else 1."""
    b = WIDE_ROWS_PER_CALL if weight.shape[0] >= WIDE_OUTPUTS else ROWS_PER_CALL
    if b == 1:
        return 1
    key = (*weight.shape, *weight.stride(), weight.data_ptr() % _ALIGN_BYTES, torch.get_num_threads(), b)
    known = _checked_rows.get(key)
    if known is not None:
        return known
    gen = torch.Generator().manual_seed(0)  # a private generator: the global RNG stream is left alone
    probe = torch.randn(1, weight.shape[1], generator=gen).expand(b, -1)
    with torch.no_grad():
        out = torch.mm(weight.detach(), _padded_block(probe, b).T)
    if not bool(out[:, 0].ne(0).any()):
        return b  # a weight of zeros tells nothing (any order gives zeros): check again next time
    same = all(torch.equal(out[:, 0], out[:, j]) for j in range(1, b))
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
        or not getattr(_mode, "on", True)
    ):
        return F.linear(x, weight, bias)
    lead = x.shape[:-1]
    rows = x.reshape(-1, x.shape[-1])
    m = rows.shape[0]
    b = _block_rows(weight)
    if m <= b:  # e.g. a batch-1 decode step: one call
        block = rows if m == b and _aligned(rows) else _padded_block(rows, b)
        out = torch.mm(weight, block.T).T[:m].contiguous()
    else:
        parts = [torch.mm(weight, block.T).T for block in _blocks(rows, b)]  # each [b, n]
        parts[-1] = parts[-1][: m - (len(parts) - 1) * b]
        out = torch.cat(parts, dim=0)
    if bias is not None:
        out = out + bias  # elementwise: the same for a row whatever its neighbours
    return out.reshape(*lead, weight.shape[0])


class BatchInvariantLinear(nn.Linear):
    """``nn.Linear`` (same parameters and checkpoint names) computed with :func:`invariant_linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return invariant_linear(x, self.weight, self.bias)
