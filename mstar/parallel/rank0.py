"""Rank 0's weight loading under tensor parallelism: the checkpoint tensors its loader leaves unread.

A worker builds its backbone with parameters on the meta device and reads only its slices of the
checkpoint (:func:`mstar.parallel.worker.build_worker_backbone`). Rank 0 does the same: the
family's loader asks :func:`deferred` which checkpoint names belong to a sharded backbone, builds
those parameters on the meta device and reads everything else (encoders, codecs, the embeddings
and heads a spec ``skip``s) as it does at ``tensor_parallel_size == 1``. Then
:meth:`~mstar.parallel.host.TensorParallel.attach` fills the meta parameters with rank 0's slices,
read straight from the safetensors files. So no rank ever holds a full copy of a sharded tensor.

At ``tensor_parallel_size == 1`` :func:`deferred` returns :data:`NOTHING`, which defers no name
and moves modules with a plain ``module.to``: single-rank loading is unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

from mstar.errors import WeightsError
from mstar.parallel.spec import BackboneSpec

__all__ = ["NOTHING", "Deferred", "deferred"]

M = TypeVar("M", bound=nn.Module)


@dataclass(frozen=True, slots=True)
class Deferred:
    """The checkpoint names of the sharded backbones' parameters, which rank 0 must not read whole.

    ``backbones`` holds each backbone's ``(prefix, skip)``: a name is deferred when it starts with
    the prefix and is not under one of the ``skip`` submodules (those stay whole on rank 0).
    """

    backbones: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.backbones)

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        for prefix, skip in self.backbones:
            if name.startswith(prefix):
                rest = name[len(prefix):]
                if not any(rest == s or rest.startswith(s + ".") for s in skip):
                    return True
        return False

    def unexpected_missing(self, missing: Sequence[str]) -> list[str]:
        """The names of ``missing`` (a ``load_state_dict`` report) that are not deferred."""
        return [n for n in missing if n not in self]

    def assign(self, module: nn.Module, state: Mapping[str, torch.Tensor], *, what: str) -> None:
        """Assign ``state`` (every tensor but the deferred ones) to ``module``, built with its parameters
        on the meta device. A missing name that is not deferred, or one the module lacks, is a
        :class:`~mstar.errors.WeightsError` naming it."""
        result = module.load_state_dict(state, strict=False, assign=True)
        missing = self.unexpected_missing(result.missing_keys)
        if missing or result.unexpected_keys:
            raise WeightsError(
                f"{what} does not match the model: {len(missing)} missing (e.g. {missing[:3]}), "
                f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:3]})"
            )

    def to(self, module: M, *, device: torch.device, dtype: torch.dtype | None = None) -> M:
        """``module.to(device=device, dtype=dtype)``, leaving parameters still on the meta device
        there (``attach`` fills them on the rank's device); exactly ``module.to`` when nothing is deferred."""
        if not self:
            return module.to(device=device, dtype=dtype)

        def move(t: torch.Tensor) -> torch.Tensor:
            if t.is_meta:
                return t
            return t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else None)

        return module._apply(move)


#: Defers nothing: every tensor is read whole (``tensor_parallel_size == 1``).
NOTHING = Deferred()


def deferred(tensor_parallel_size: int, specs: Callable[[], Sequence[BackboneSpec]]) -> Deferred:
    """What rank 0's loader leaves on the meta device: :data:`NOTHING` at one rank (``specs`` is
    then not even called), else the parameters of every backbone ``specs`` describes."""
    if tensor_parallel_size == 1:
        return NOTHING
    return Deferred(tuple((s.prefix, tuple(s.skip)) for s in specs()))
