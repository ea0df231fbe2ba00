"""Batch-invariant matmuls on the CPU: a row's result does not depend on the other rows.

CPU BLAS libraries pick a kernel by the shapes: a single row (one request
decoding alone) goes through a matrix-vector path whose sums round
differently from the blocked kernel used for a batch, and very tall inputs
switch kernels again. The difference is in the last bits, but a sampled token
can flip on it, so a seeded request would change with its neighbours.

Measured with torch's CPU backend (MKL), ``weight @ rows.T`` gives bitwise
the same result for a row whatever the other rows, for every row count from
2 to 56 and every shape the models use; it is also faster than ``F.linear``
for small row counts (the weight streams once, as the tall operand). So rows
run in blocks of 2 to 48 (a lone row padded with a zero row). GPUs and other
dtypes take the plain ``F.linear`` path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BatchInvariantLinear", "invariant_linear"]

MIN_ROWS = 2
MAX_ROWS = 48


def invariant_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` whose rows (all leading dims flattened) are computed independently of each other."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return F.linear(x, weight, bias)
    lead = x.shape[:-1]
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    m = rows.shape[0]
    parts = []
    for start in range(0, max(m, 1), MAX_ROWS):
        block = rows[start : start + MAX_ROWS]
        n = block.shape[0]
        if n < MIN_ROWS:
            block = torch.cat([block, block.new_zeros(MIN_ROWS - n, block.shape[1])])
        parts.append(torch.mm(weight, block.T)[:, :n].T)
    out = (parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)).contiguous()
    if bias is not None:
        out = out + bias
    return out.reshape(*lead, weight.shape[0])


class BatchInvariantLinear(nn.Linear):
    """``nn.Linear`` (same parameters and checkpoint names) computed with :func:`invariant_linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return invariant_linear(x, self.weight, self.bias)
