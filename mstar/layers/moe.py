"""Mixture-of-experts feed-forward blocks (Qwen3-MoE layout); the gated SiLU MLP lives in ``mlp``.

Parameter names follow the Hugging Face checkpoints: ``gate.weight`` (router),
``experts.gate_up_proj`` [E, 2I, H], ``experts.down_proj`` [E, H, I], and for
blocks with an always-on expert ``shared_expert.{gate,up,down}_proj`` plus
``shared_expert_gate``. Tokens are flattened, routed to their top-k experts,
and each expert runs once over all the tokens (of all requests) routed to it.
Matmuls go through the batch-invariant CPU path, so a request's result does not
depend on how many tokens of other requests share its experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mstar.layers.invariant import BatchInvariantLinear, invariant_linear
from mstar.layers.mlp import GatedMLP

__all__ = ["GatedMLP", "MoEExperts", "SparseMoE", "TopKRouter"]


class TopKRouter(nn.Module):
    """Softmax router; returns (weights [N, k], expert ids [N, k])."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, norm_topk_prob: bool) -> None:
        super().__init__()
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = invariant_linear(x, self.weight)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)
        top_w, top_i = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        return top_w.to(x.dtype), top_i


class MoEExperts(nn.Module):
    """All experts' weights stacked in two 3-D tensors."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))

    def forward(self, x: torch.Tensor, top_i: torch.Tensor, top_w: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        # Only experts some token picked run; each over exactly its tokens.
        for e in torch.unique(top_i).tolist():
            tok, slot = torch.where(top_i == e)
            gate, up = invariant_linear(x[tok], self.gate_up_proj[e]).chunk(2, dim=-1)
            y = invariant_linear(F.silu(gate) * up, self.down_proj[e]) * top_w[tok, slot, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out


class SparseMoE(nn.Module):
    """Routed experts, optionally plus a sigmoid-gated shared expert."""

    def __init__(
        self,
        hidden: int,
        intermediate: int,
        num_experts: int,
        top_k: int,
        *,
        norm_topk_prob: bool,
        shared_intermediate: int | None = None,
    ) -> None:
        super().__init__()
        self.gate = TopKRouter(hidden, num_experts, top_k, norm_topk_prob)
        self.experts = MoEExperts(hidden, intermediate, num_experts)
        self.shared_expert: GatedMLP | None = None
        self.shared_expert_gate: BatchInvariantLinear | None = None
        if shared_intermediate:
            self.shared_expert = GatedMLP(hidden, shared_intermediate)
            self.shared_expert_gate = BatchInvariantLinear(hidden, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        top_w, top_i = self.gate(flat)
        out = self.experts(flat, top_i, top_w)
        if self.shared_expert is not None and self.shared_expert_gate is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
        return out.reshape(shape)
