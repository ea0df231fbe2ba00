"""The sharding plan: which dimension of each backbone parameter is split, and each rank's slice.

:func:`shard_module` replaces a backbone's layers in place by the parallel layers of
:mod:`mstar.parallel.layers` (on the meta device) and returns the plan: every parameter name,
with its :class:`Split` or None when every rank holds it whole. The same plan then fills the
parameters from the checkpoint, each rank (rank 0 included) reading only its slices
(:func:`from_safetensors`, through ``safe_open(...).get_slice(name)[...]``). Names never change, so a rank's ``state_dict`` names are
the checkpoint's.

What is split (Megatron's layout): attention query heads and key/value heads (q/k/v column,
o row), the gated MLP's intermediate features (gate/up column, down row), each MoE expert's
intermediate features (the same split inside every expert, with one all-reduce for the whole
block), and the vocabulary of the embedding and LM head when the backbone owns them. Norms and
MoE routers are replicated. Key/value heads need ``num_kv_heads % world == 0``; with more ranks
than key/value heads (``world % num_kv_heads == 0``) each rank holds the one key/value head its
query heads read, replicated on ``world // num_kv_heads`` ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from mstar.errors import InvalidParameterError, WeightsError
from mstar.layers.invariant import BatchInvariantLinear
from mstar.layers.moe import SparseMoE
from mstar.parallel.group import Comm
from mstar.parallel.layers import (
    ColumnParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
    shard_range,
)

__all__ = [
    "Plan",
    "ShardPlan",
    "Split",
    "from_safetensors",
    "load_shard",
    "params_on_meta",
    "shard_module",
]


@dataclass(frozen=True, slots=True)
class Split:
    """One parameter's cut: dimension ``dim`` holds ``parts`` blocks (2 for a fused gate/up) of
    ``units`` units of ``unit`` elements each (heads of ``head_dim``); a rank takes its units of
    every block. ``uneven`` (vocabularies) gives each rank ``ceil(units / world)``, the last fewer."""

    dim: int
    units: int
    unit: int = 1
    parts: int = 1
    uneven: bool = False

    def unit_range(self, rank: int, world: int) -> tuple[int, int]:
        if self.uneven:
            return shard_range(self.units, rank, world)
        if self.units % world == 0:
            per = self.units // world
            return rank * per, (rank + 1) * per
        if world % self.units == 0:  # more ranks than heads: each holds one, replicated
            u = rank // (world // self.units)
            return u, u + 1
        raise InvalidParameterError(
            f"{self.units} heads or features cannot be split over {world} ranks (need one to divide the other)",
            param="tensor_parallel_size",
        )

    def ranges(self, rank: int, world: int) -> list[tuple[int, int]]:
        """Element ranges along ``dim`` this rank holds, one per block."""
        a, b = self.unit_range(rank, world)
        block = self.units * self.unit
        return [(p * block + a * self.unit, p * block + b * self.unit) for p in range(self.parts)]

    def local(self, rank: int, world: int) -> int:
        a, b = self.unit_range(rank, world)
        return (b - a) * self.unit * self.parts


#: Parameter name -> its split, or None when replicated.
Plan = dict[str, Split | None]


@dataclass(frozen=True, slots=True)
class ShardPlan:
    """What :func:`shard_module` decided: the splits of the parameters to load, and the tied
    parameters (``(kept, alias)``: a head sharing its embedding) re-pointed after loading."""

    splits: Plan
    ties: tuple[tuple[str, str], ...] = ()


def shard_module(module: nn.Module, comm: Comm, *, skip: Sequence[str] = ()) -> ShardPlan:
    """Swap ``module``'s layers for parallel ones (parameters on meta) and return the plan.

    ``skip`` names submodules left whole and out of the plan (they run on rank 0 only, outside
    the tensor-parallel forward; workers drop them).
    """
    ties = tied_parameters(module)
    plan: Plan = {}
    _walk(module, "", comm, set(skip), plan)
    for name, _ in module.named_parameters():
        if not any(name == s or name.startswith(s + ".") for s in skip):
            plan.setdefault(name, None)
    for _, alias in ties:
        plan.pop(alias, None)
    retie(module, ties)  # the parallel layers got their own placeholders: share them again
    return ShardPlan(plan, tuple(ties))


def _walk(parent: nn.Module, prefix: str, comm: Comm, skip: set[str], plan: Plan) -> None:
    for name, child in list(parent.named_children()):
        path = prefix + name
        if path in skip:
            continue
        if isinstance(child, SparseMoE):
            _shard_moe(child, path + ".", comm, plan)
        elif _heads(child) is not None:
            _shard_attention(child, path + ".", comm, plan)
        elif _is_gated_mlp(child):
            _shard_mlp(child, path + ".", comm, plan, reduce=True)
        elif isinstance(child, nn.Embedding):
            emb = VocabParallelEmbedding(child.num_embeddings, child.embedding_dim, comm)
            parent.add_module(name, emb)
            plan[path + ".weight"] = Split(0, child.num_embeddings, uneven=True)
        elif isinstance(child, nn.Linear) and name == "lm_head":
            if child.bias is not None:
                raise WeightsError("a vocabulary-parallel LM head with a bias is not supported")
            head = ParallelLMHead(
                child.in_features, child.out_features, comm, invariant=isinstance(child, BatchInvariantLinear)
            )
            parent.add_module(name, head)
            plan[path + ".weight"] = Split(0, child.out_features, uneven=True)
        else:
            _walk(child, path + ".", comm, skip, plan)


def _heads(m: nn.Module) -> tuple[str, str] | None:
    """The head-count attributes of an attention block with q/k/v/o projections (GQAttention's
    ``num_heads``/``num_kv_heads``, BAGEL's ``n_heads``/``n_kv``), or None for other modules."""
    if not all(isinstance(getattr(m, p, None), nn.Linear) for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
        return None
    for heads, kv in (("num_heads", "num_kv_heads"), ("n_heads", "n_kv")):
        if isinstance(getattr(m, heads, None), int) and isinstance(getattr(m, kv, None), int):
            return heads, kv
    return None


def _shard_attention(m: nn.Module, prefix: str, comm: Comm, plan: Plan) -> None:
    heads_attr, kv_attr = _heads(m) or ("", "")
    hq, hkv, dim = getattr(m, heads_attr), getattr(m, kv_attr), int(cast(Any, m).head_dim)
    q_split, kv_split = Split(0, hq, dim), Split(0, hkv, dim)
    o_split = Split(1, hq, dim)
    rank, world = comm.rank, comm.world
    # BAGEL's generation twins (``q_proj_moe_gen`` ...) share the heads of the understanding weights.
    for sfx in ("", "_moe_gen"):
        if getattr(m, "q_proj" + sfx, None) is None:
            continue
        for proj, split in (("q_proj", q_split), ("k_proj", kv_split), ("v_proj", kv_split)):
            lin = getattr(m, proj + sfx)
            setattr(m, proj + sfx, ColumnParallelLinear.like(lin, split.local(rank, world)))
            plan[f"{prefix}{proj}{sfx}.weight"] = split
            if lin.bias is not None:
                plan[f"{prefix}{proj}{sfx}.bias"] = split
        o = getattr(m, "o_proj" + sfx)
        setattr(m, "o_proj" + sfx, RowParallelLinear.like(o, o_split.local(rank, world), comm))
        plan[f"{prefix}o_proj{sfx}.weight"] = o_split
    setattr(m, heads_attr, q_split.local(rank, world) // dim)
    setattr(m, kv_attr, kv_split.local(rank, world) // dim)


def _is_gated_mlp(m: nn.Module) -> bool:
    return all(isinstance(getattr(m, p, None), nn.Linear) for p in ("gate_proj", "up_proj", "down_proj"))


def _shard_mlp(m: nn.Module, prefix: str, comm: Comm, plan: Plan, *, reduce: bool) -> None:
    inter = cast(nn.Linear, m.get_submodule("gate_proj")).out_features
    col, row = Split(0, inter), Split(1, inter)
    local = col.local(comm.rank, comm.world)
    for proj in ("gate_proj", "up_proj"):
        lin = cast(nn.Linear, m.get_submodule(proj))
        setattr(m, proj, ColumnParallelLinear.like(lin, local))
        plan[f"{prefix}{proj}.weight"] = col
        if lin.bias is not None:
            plan[f"{prefix}{proj}.bias"] = col
    down = cast(nn.Linear, m.get_submodule("down_proj"))
    m.down_proj = RowParallelLinear.like(down, local, comm, reduce=reduce)
    plan[f"{prefix}down_proj.weight"] = row


def _shard_moe(m: SparseMoE, prefix: str, comm: Comm, plan: Plan) -> None:
    """Every expert keeps its place and holds this rank's slice of its intermediate features (expert
    parallelism would move whole experts instead; the slice keeps routing local and the same on
    every rank). Experts and the shared expert add partial sums; one all-reduce completes them."""
    experts = m.experts
    num, two_inter, hidden = experts.gate_up_proj.shape
    inter = two_inter // 2
    gate_up, down = Split(1, inter, parts=2), Split(2, inter)
    local = down.local(comm.rank, comm.world)
    experts.gate_up_proj = nn.Parameter(torch.empty(num, 2 * local, hidden, device="meta"), requires_grad=False)
    experts.down_proj = nn.Parameter(torch.empty(num, hidden, local, device="meta"), requires_grad=False)
    plan[prefix + "experts.gate_up_proj"] = gate_up
    plan[prefix + "experts.down_proj"] = down
    if m.shared_expert is not None:
        _shard_mlp(m.shared_expert, prefix + "shared_expert.", comm, plan, reduce=False)
    if comm.world > 1:
        m.register_forward_hook(lambda _m, _args, out: comm.all_reduce(out))


# ----------------------------------------------------------------------------- filling


#: Reads one parameter's slice for this rank: (checkpoint name, split or None) -> CPU tensor.
Reader = Callable[[str, "Split | None"], torch.Tensor]


def from_safetensors(files: Sequence[str], prefix: str, rank: int, world: int) -> Reader:
    """Slices read straight from the checkpoint files: a rank reads only the bytes it keeps."""
    from safetensors import safe_open

    where: dict[str, Any] = {}
    for f in files:
        handle = safe_open(f, framework="pt", device="cpu")
        for key in handle.keys():  # noqa: SIM118 - safe_open has keys(), not iteration
            where[key] = handle

    def read(name: str, split: Split | None) -> torch.Tensor:
        key = prefix + name
        if key not in where:
            raise WeightsError(f"the checkpoint has no tensor {key!r} for this tensor-parallel rank")
        sl = where[key].get_slice(key)
        if split is None:
            return sl[:].clone()
        lead = (slice(None),) * split.dim
        parts = [sl[(*lead, slice(a, b))] for a, b in split.ranges(rank, world)]
        # A slice is a view into the file's mapping of the whole tensor: copy it out, so the rank
        # holds (and later touches) only its own bytes, not a view that pins the full tensor.
        return parts[0].clone(memory_format=torch.contiguous_format) if len(parts) == 1 else torch.cat(parts, dim=split.dim)

    return read


def load_shard(module: nn.Module, plan: ShardPlan, read: Reader, *, device: torch.device, dtype: torch.dtype) -> None:
    """Fill every planned parameter of ``module`` with its slice (checking the shape) on ``device``."""
    for name, split in plan.splits.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        want = tuple(owner._parameters[leaf].shape)  # type: ignore[union-attr]
        t = read(name, split)
        if tuple(t.shape) != want:
            raise WeightsError(f"{name}: this rank's slice has shape {tuple(t.shape)}, the sharded model expects {want}")
        t = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        owner._parameters[leaf] = nn.Parameter(t, requires_grad=False)
    retie(module, list(plan.ties))


def tied_parameters(module: nn.Module) -> list[tuple[str, str]]:
    """(kept, alias) names of parameters that are one tensor (a head tied to its embedding)."""
    first: dict[int, str] = {}
    ties = []
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) in first:
            ties.append((first[id(p)], name))
        else:
            first[id(p)] = name
    return ties


def retie(module: nn.Module, ties: list[tuple[str, str]]) -> None:
    """Point each alias back at its kept parameter (both were sharded alike: same vocabulary rows)."""
    for kept, alias in ties:
        owner, _, leaf = alias.rpartition(".")
        setattr(module.get_submodule(owner), leaf, module.get_parameter(kept))


@contextmanager
def params_on_meta() -> Iterator[None]:
    """Build modules whose parameters land on the meta device while buffers (rotary tables) are
    computed for real: a worker then materialises only its slices."""
    original = nn.Module.register_parameter

    def register(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.detach().to("meta"), requires_grad=False)
        original(self, name, param)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]
