"""The contract between the scheduler and a model family's runner.

A runner owns the model's components and a small state machine per request.
It is built once per Engine as ``Runner(weights=..., settings=RunnerSettings(...))``
and called from a single thread (the scheduler's), except for ``validate`` and
``prepare``, which run in the caller's thread before the request is queued:

1. ``validate``: check the user's ``model_kwargs`` and return them with
   defaults filled in (what ``Request.params`` holds; user-visible only).
2. ``prepare``: build the runner-private data of a request (prompt ids,
   decoded and preprocessed media) and raise typed errors early. The result
   is ``Request.prepared``, typed ``PreparedT``.
3. ``admit`` when the request may start: reserve resources (KV slots), set
   ``req.state`` (typed ``StateT``) and return True, or False to make it wait.
4. ``step`` over all running requests, repeatedly. One call runs each
   component once, batched over the requests that need it at that phase
   (prefill chunks, one decode token, a codec window, a denoising step), emits
   events and finishes requests that are done. Requests with
   ``cancel_requested`` never reach ``step``: the scheduler ends them first.
5. ``release`` once a request is done for any reason (idempotent).
6. ``stats`` returns the one :class:`~mstar.stats.RunnerStats` schema.

A runner that can attribute a failure to one request calls ``req.fail(exc)``
and carries on with the others; an exception escaping ``step`` fails only the
requests of that step and the Engine keeps serving.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar, Generic, TypeVar, cast

from mstar.layers.invariant import set_batch_invariance
from mstar.models.params import Param, validate_params
from mstar.request import Request, RequestInputs
from mstar.settings import RunnerSettings, Sizing
from mstar.stats import Activity, RunnerStats

__all__ = ["ModelRunner"]

PreparedT = TypeVar("PreparedT")
StateT = TypeVar("StateT")


class ModelRunner(ABC, Generic[PreparedT, StateT]):
    """Base class of every model family's runner.

    ``PreparedT`` is what :meth:`prepare` returns for a request, ``StateT``
    what :meth:`admit` stores in ``req.state``; :meth:`prepared` and
    :meth:`state` give them back typed.
    """

    name: ClassVar[str]
    #: model_kwargs this model honours, with defaults ("seed" and "timeout" are the Engine's).
    params: ClassVar[Mapping[str, Param]] = {}
    #: True for text to speech: the request's text is spoken word for word, so the Engine may speak
    #: a long text as sentence-aligned chunks run side by side (mstar/speech/chunked.py).
    speaks_text: ClassVar[bool] = False

    def __init__(self, *, weights: str | None, settings: RunnerSettings) -> None:
        self.weights = weights
        self.settings = settings
        self.device = settings.device
        self.dtype = settings.dtype
        #: Resolved limits; a family replaces it from :meth:`default_sizing` in its constructor.
        self.sizing: Sizing = settings.resolve(self.default_sizing(weights, settings))
        #: Batched calls per component, for :meth:`stats`.
        self.activity = Activity()

    @classmethod
    def default_sizing(cls, weights: str | None, settings: RunnerSettings) -> Sizing:
        """The family's limits when the user sets none (may depend on the weights and device)."""
        return Sizing(max_batch_size=64, max_seq_len=4096)

    # ------------------------------------------------------------------ caller's thread
    def validate(
        self,
        inputs: RequestInputs,
        output_modalities: tuple[str, ...],
        kwargs: Mapping[str, Any],
    ) -> dict[str, Any]:
        """Check the kwargs and return every accepted key with its value (defaults filled in)."""
        return validate_params(self.params, kwargs)

    def prepare(self, inputs: RequestInputs, output_modalities: tuple[str, ...], params: Mapping[str, Any]) -> PreparedT:
        """Build the runner-private data of a validated request; raise typed errors for bad input."""
        return cast(PreparedT, None)

    # ------------------------------------------------------------------ scheduler's thread
    def on_scheduler_thread(self) -> None:
        """Called once on the scheduler's thread before its first step: per-thread model settings."""
        set_batch_invariance(self.sizing.batch_invariant)

    def admit(self, req: Request) -> bool:
        """Reserve what ``req`` needs to start and set ``req.state``. Return False if it must wait."""
        return True

    @abstractmethod
    def step(self, reqs: list[Request]) -> None:
        """Advance every request in ``reqs`` by one step of its current phase."""

    def release(self, req: Request) -> None:  # noqa: B027 - optional hook
        """Free what ``req`` holds. Called once it is done, whatever the reason."""

    def stats(self) -> RunnerStats:
        """What this runner holds (KV) and has done (batched calls per component)."""
        return RunnerStats(activity=self.activity)

    def health(self) -> str | None:
        """None while the runner can serve, else why not (e.g. a tensor-parallel worker died)."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free model memory."""

    # ------------------------------------------------------------------ typed access
    def prepared(self, req: Request) -> PreparedT:
        """``req.prepared``, as this runner's :meth:`prepare` made it."""
        return cast(PreparedT, req.prepared)

    def state(self, req: Request) -> StateT:
        """``req.state``, as this runner's :meth:`admit` set it."""
        return cast(StateT, req.state)
