"""What a worker needs to build one tensor-parallel backbone: plain data, sent once at start."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = ["BackboneSpec"]


@dataclass(frozen=True, slots=True)
class BackboneSpec:
    """One backbone of a model family, as every rank builds it.

    ``build`` ("package.module:function") is called with ``config`` and returns the unsharded
    module (workers build it with parameters on the meta device); ``method`` is the seam rank 0
    calls and every worker mirrors; the weights are read from the safetensors ``files`` under
    the name ``prefix``; ``skip`` names submodules that run on rank 0 only (outside ``method``:
    token embeddings and heads the runner applies itself), which workers drop.
    """

    build: str
    config: Any
    method: str
    files: tuple[str, ...]
    prefix: str = ""
    skip: tuple[str, ...] = ()

    def builder(self) -> Callable[[Any], nn.Module]:
        module, _, name = self.build.partition(":")
        fn: Callable[[Any], nn.Module] = getattr(importlib.import_module(module), name)
        return fn
