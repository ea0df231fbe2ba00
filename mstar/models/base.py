"""The contract between the scheduler and a model family's runner.

A runner owns the model's components and a small state machine per request
(kept in ``Request.state``). The scheduler calls it from a single thread:

1. ``validate`` (in the caller's thread, before the request is queued):
   check inputs and kwargs, decode media, and raise typed errors early.
2. ``admit`` when the request may start: reserve resources (KV slots); return
   False to make it wait.
3. ``step`` over all running requests, repeatedly. One call runs each
   component once, batched over the requests that need it at that phase
   (prefill chunks, one decode token, a codec window, a denoising step), emits
   events and finishes requests that are done. Requests with
   ``cancel_requested`` never reach ``step``: the scheduler ends them first.
4. ``release`` once a request is done for any reason (idempotent).

A runner that can attribute a failure to one request calls ``req.fail(exc)``
and carries on with the others; an exception escaping ``step`` fails only the
requests of that step and the Engine keeps serving.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from mstar.models.params import Param, validate_params
from mstar.registry import ModelInfo, get_model_info
from mstar.request import Request, RequestInputs

__all__ = ["ModelRunner"]


class ModelRunner(ABC):
    """Base class of every model family's runner."""

    name: ClassVar[str]
    #: model_kwargs this model honours, with defaults ("seed" and "timeout" are the Engine's).
    params: ClassVar[Mapping[str, Param]] = {}

    def __init__(self, *, weights: str | None, device: torch.device, dtype: torch.dtype) -> None:
        self.device = device
        self.dtype = dtype
        self.weights = weights

    @property
    def info(self) -> ModelInfo:
        return get_model_info(self.name)

    def validate(
        self,
        inputs: RequestInputs,
        output_modalities: tuple[str, ...],
        kwargs: Mapping[str, Any],
    ) -> dict[str, Any]:
        """Check the inputs and return the full kwargs (defaults filled in).

        Subclasses extend this to check media, voices and sizes; they may
        stash decoded inputs in the returned dict under keys starting with
        ``_`` for ``step`` to use.
        """
        return validate_params(self.params, kwargs)

    def admit(self, req: Request) -> bool:
        """Reserve what ``req`` needs to start. Return False if it must wait."""
        return True

    @abstractmethod
    def step(self, reqs: list[Request]) -> None:
        """Advance every request in ``reqs`` by one step of its current phase."""

    def release(self, req: Request) -> None:  # noqa: B027 - optional hook
        """Free what ``req`` holds. Called once it is done, whatever the reason."""

    def stats(self) -> dict[str, Any]:
        """Resource accounting (for example KV slots held); used by tests and benchmarks."""
        return {}

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free model memory."""
