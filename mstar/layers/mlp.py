"""The feed-forward blocks the model families share.

:class:`GatedMLP` is the gated form ``down(act(gate(x)) * up(x))`` of Llama,
Qwen and Gemma (``gate_proj``, ``up_proj``, ``down_proj``, no biases);
:class:`FeedForward` is the plain ViT form ``fc2(act(fc1(x)))`` with biases
(SigLIP, V-JEPA 2). Parameter names are those of the Hugging Face checkpoints,
so one class serves every family; what differs between families (the
activation, and whether projections take the batch-invariant CPU path) is a
constructor argument.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mstar.layers.invariant import BatchInvariantLinear

__all__ = ["Activation", "FeedForward", "GatedMLP", "gelu_tanh"]

Activation = Callable[[torch.Tensor], torch.Tensor]


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation (Gemma's and SigLIP's ``gelu_pytorch_tanh``)."""
    return F.gelu(x, approximate="tanh")


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))``, biases optional (off by default).

    ``linear`` picks the projection class: :class:`BatchInvariantLinear` (the
    default) for decoders whose seeded sampling must not depend on the batch,
    ``nn.Linear`` where a family was validated with plain matmuls.
    """

    def __init__(
        self,
        hidden: int,
        intermediate: int,
        *,
        act: Activation = F.silu,
        linear: type[nn.Linear] = BatchInvariantLinear,
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.act = act
        self.gate_proj = linear(hidden, intermediate, bias=bias)
        self.up_proj = linear(hidden, intermediate, bias=bias)
        self.down_proj = linear(intermediate, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class FeedForward(nn.Module):
    """``fc2(act(fc1(x)))`` with biases (exact GELU unless ``act`` says otherwise)."""

    def __init__(self, dim: int, hidden: int, *, act: Activation = F.gelu) -> None:
        super().__init__()
        self.act = act
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))
