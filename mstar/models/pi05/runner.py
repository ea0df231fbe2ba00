"""Serving Pi0.5: camera images + task text + robot state in, a chunk of robot actions out.

Each request walks two phases, and each scheduler step runs each phase once
for every request in it:

``prefill``  SigLIP over all new requests' images as one batch, then the VLM
             over their prefixes as one padded batch, into their KV slots.
``denoise``  one Euler step of the action expert for every request that is
             denoising, as one batch whatever step each is at (the flow time
             is per row); a request finishes after its ``num_steps`` steps.

Requests are batch-invariant: each draws its noise from its own seeded
generator, and padding never leaks across rows.

KV memory is paged: a request's slot holds its prefix and, while denoising,
the action chunk written after it (never kept). The pool holds
``kv_cache_tokens`` positions in blocks of ``kv_block_size`` (unset: every slot
at full length, which never runs out). A request is admitted only when the
blocks of its prefix plus one chunk fit beside what the admitted requests have
reserved, so a forward never finds the pool full; one that could not fit even
in an empty pool is refused by ``prepare``. The prefix is bidirectional and
starts with the camera images, so it is not shared through the prefix cache.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from mstar.errors import EmptyInputError, InvalidParameterError, InvalidRequestError, ShapeError
from mstar.layers.kv_cache import KVCache
from mstar.media import decode_image
from mstar.models.base import ModelRunner
from mstar.models.params import Param, validate_params
from mstar.models.pi05.config import FULL, TINY, Pi05Config, config_from_lerobot
from mstar.models.pi05.flow import euler_time, euler_update
from mstar.models.pi05.images import preprocess_image
from mstar.models.pi05.model import Pi05Model
from mstar.models.pi05.prompt import (
    BOS_ID,
    ByteTokenizer,
    Tokenizer,
    build_prompt,
    finite_floats,
    load_paligemma_tokenizer,
)
from mstar.models.pi05.weights import load_checkpoint, tiny_model
from mstar.request import Request, RequestInputs
from mstar.settings import RunnerSettings, Sizing
from mstar.stats import RunnerStats
from mstar.types import Progress, TensorChunk
from mstar.weights import TINY as TINY_WEIGHTS
from mstar.weights import resolve_checkpoint_dir

__all__ = ["Pi05Prepared", "Pi05Runner"]

MAX_NUM_STEPS = 1000


@dataclass(frozen=True, slots=True)
class Pi05Prepared:
    """What :meth:`Pi05Runner.prepare` builds in the caller's thread."""

    tokens: list[int]  # BOS + the tokenized prompt (task text and discretised robot state)
    pixels: torch.Tensor  # [cameras, 3, S, S] float32 in [-1, 1]


@dataclass(slots=True)
class _State:
    slot: int | None
    horizon: int
    num_steps: int
    x: torch.Tensor  # [chunk, action_dim] float32: noise at t=1, actions at t=0
    phase: Literal["prefill", "denoise"] = "prefill"
    step: int = 0
    kv_blocks: int = 0  # KV blocks reserved for its prefix and one chunk (given back at release)


def _sizing(cfg: Pi05Config, weights: str | None) -> Sizing:
    """KV slots (8 for the tiny variant, 16 otherwise), each long enough for the longest prefix plus a chunk."""
    return Sizing(max_batch_size=8 if weights == TINY_WEIGHTS else 16, max_seq_len=cfg.max_prefix_len + cfg.chunk_size)


class Pi05Runner(ModelRunner[Pi05Prepared, _State]):
    """The runner of the ``pi05`` family (see the module docstring).

    ``sizing.max_batch_size`` is the number of KV slots (requests running at
    once) and ``sizing.max_seq_len`` the positions of each: a request needs
    its prefix (``cfg.image_tokens`` per camera, 256 at 224 px, plus the
    prompt) and one action chunk; :meth:`prepare` refuses one that does not fit.
    """

    name = "pi05"
    params: ClassVar[Mapping[str, Param]] = {
        "robot_state": Param(
            list,
            type_name="list[float]",
            doc="the robot state normalised to [-1, 1]: 1 to 32 floats (required; values outside [-1, 1] are refused)",
        ),
        "num_steps": Param(
            int, default=None, min=1, max=MAX_NUM_STEPS, doc="Euler steps from noise to actions; default: the checkpoint's (10)"
        ),
        "action_horizon": Param(
            int, default=None, doc="actions returned, 1 to the checkpoint's chunk size; default: all of it (50)"
        ),
    }

    def __init__(self, *, weights: str | None, settings: RunnerSettings) -> None:
        super().__init__(weights=weights, settings=settings)
        self.model, self.cfg, self.tokenizer = _load(weights, self.device, self.dtype)
        cfg = self.cfg
        # The checkpoint's config.json may change the prefix length: size from the config actually loaded.
        self.sizing = size = settings.resolve(_sizing(cfg, weights))
        self.cache = KVCache(
            num_layers=cfg.vlm.depth,
            num_slots=size.max_batch_size,
            max_len=size.max_seq_len,
            num_kv_heads=cfg.vlm.num_kv_heads,
            head_dim=cfg.vlm.head_dim,
            device=self.device,
            dtype=self.model.dtype,
            block_size=size.kv_block_size,
            # None: every slot at full length, so the default pool never runs out.
            num_blocks=None if size.kv_cache_tokens is None else -(-size.kv_cache_tokens // size.kv_block_size) + 1,
        )
        #: KV blocks the admitted requests may take at worst (reserved at admit, given back at release).
        self.reserved_blocks = 0

    @classmethod
    def default_sizing(cls, weights: str | None, settings: RunnerSettings) -> Sizing:
        return _sizing(TINY if weights == TINY_WEIGHTS else FULL, weights)

    # ------------------------------------------------------------------ caller thread
    def validate(
        self, inputs: RequestInputs, output_modalities: tuple[str, ...], kwargs: Mapping[str, Any]
    ) -> dict[str, Any]:
        params = validate_params(self.params, kwargs)
        cfg = self.cfg
        expected_state = f"a list of floats of shape (d,) with 1 <= d <= {cfg.max_state_dim}, normalised to [-1, 1]"
        if params["robot_state"] is None:
            raise ShapeError(f"pi05 needs robot_state: {expected_state}", param="robot_state")
        state = finite_floats(params["robot_state"])
        if state is None:
            raise InvalidParameterError(
                f"robot_state must be {expected_state}; got {params['robot_state']!r}", param="robot_state"
            )
        if not 1 <= len(state) <= cfg.max_state_dim:
            raise ShapeError(f"robot_state has shape ({len(state)},); expected {expected_state}", param="robot_state")
        outside = [(i, v) for i, v in enumerate(state) if not -1.0 <= v <= 1.0]
        if outside:
            # The prompt bins the state over [-1, 1]; a value beyond would be clipped to an edge bin
            # and the policy would see a different state than the one sent.
            i, v = outside[0]
            raise InvalidParameterError(
                f"robot_state must be normalised to [-1, 1] (the policy reads it in {cfg.state_bins} bins over that range); "
                f"robot_state[{i}] = {v:g}" + (f" and {len(outside) - 1} more are outside" if len(outside) > 1 else ""),
                param="robot_state",
            )

        horizon = params["action_horizon"]
        horizon = cfg.chunk_size if horizon is None else horizon
        if not 1 <= horizon <= cfg.chunk_size:
            raise InvalidParameterError(
                f"action_horizon must be between 1 and {cfg.chunk_size} (the checkpoint's chunk size; the output has "
                f"shape (action_horizon, {cfg.action_dim})); got {horizon}",
                param="action_horizon",
            )
        params.update(robot_state=state, action_horizon=horizon, num_steps=params["num_steps"] or cfg.num_steps)
        return params

    def prepare(
        self, inputs: RequestInputs, output_modalities: tuple[str, ...], params: Mapping[str, Any]
    ) -> Pi05Prepared:
        cfg = self.cfg
        if inputs.messages:
            raise InvalidRequestError("pi05 takes the task instruction as text=..., not messages", param="messages")
        task = inputs.text or ""
        if not task.strip():
            raise EmptyInputError("pi05 needs the task instruction as text", param="text")
        if inputs.audio or inputs.video:
            raise InvalidRequestError(
                "pi05 takes camera images, task text and robot_state only", param="input_modalities"
            )

        size = cfg.vision.image_size
        n = len(inputs.images)
        if not 1 <= n <= cfg.max_cameras:
            raise ShapeError(
                f"pi05 takes 1 to {cfg.max_cameras} camera images (RGB [H, W, 3], resized with padding to "
                f"{size}x{size}); got {n}",
                param="images",
            )
        pixels = torch.stack(
            [
                preprocess_image(decode_image(item), size, name=f"image {i} ({item.name})")
                for i, item in enumerate(inputs.images)
            ]
        )
        tokens = [BOS_ID, *self.tokenizer.encode(build_prompt(task, params["robot_state"], cfg.state_bins))]
        if len(tokens) > cfg.max_text_tokens:
            raise InvalidParameterError(
                f"the prompt (task text and robot state) is {len(tokens)} tokens; pi05 accepts at most {cfg.max_text_tokens}",
                param="text",
            )
        needed = n * cfg.image_tokens + len(tokens) + cfg.chunk_size
        if needed > self.sizing.max_seq_len:
            raise InvalidRequestError(
                f"this request needs {needed} KV positions ({n} camera(s) x {cfg.image_tokens} image tokens, "
                f"{len(tokens)} prompt tokens and {cfg.chunk_size} action tokens); the engine was sized with "
                f"max_seq_len={self.sizing.max_seq_len}",
                param="max_seq_len",
            )
        prepared = Pi05Prepared(tokens=tokens, pixels=pixels)
        blocks = self._kv_blocks(prepared)
        if blocks > self.cache.usable_blocks:
            raise InvalidRequestError(
                f"this request needs {blocks} KV blocks of {self.cache.block_size} positions ({needed} positions); "
                f"the pool holds {self.cache.usable_blocks} (kv_cache_tokens={self.sizing.kv_pool_tokens})",
                param="kv_cache_tokens",
            )
        return prepared

    def _kv_blocks(self, p: Pi05Prepared) -> int:
        """Blocks a request takes: its prefix (images and prompt) and one action chunk after it."""
        positions = p.pixels.shape[0] * self.cfg.image_tokens + len(p.tokens) + self.cfg.chunk_size
        return -(-positions // self.cache.block_size)

    # ------------------------------------------------------------------ scheduler thread
    def admit(self, req: Request) -> bool:
        """Start ``req`` when a slot is free and its blocks fit beside what admitted requests reserved."""
        blocks = self._kv_blocks(self.prepared(req))
        if self.reserved_blocks + blocks > self.cache.usable_blocks:
            return False
        slot = self.cache.allocate()
        if slot is None:
            return False
        self.reserved_blocks += blocks
        gen = req.generator
        noise = torch.randn(
            (self.cfg.chunk_size, self.cfg.action_dim), generator=gen, device=gen.device, dtype=torch.float32
        )
        req.state = _State(
            slot=slot,
            horizon=req.params["action_horizon"],
            num_steps=req.params["num_steps"],
            x=noise.to(self.device),
            kv_blocks=blocks,
        )
        return True

    def step(self, reqs: list[Request]) -> None:
        new = [r for r in reqs if self.state(r).phase == "prefill"]
        if new:
            self._prefill(new)
        # Freshly prefilled requests take their first Euler step in the same batch as the others.
        ready = [r for r in reqs if not r.done and self.state(r).phase == "denoise"]
        if ready:
            self._denoise(ready)

    def release(self, req: Request) -> None:
        state = req.state
        if isinstance(state, _State) and state.slot is not None:
            self.cache.free(state.slot)
            state.slot = None
            self.reserved_blocks -= state.kv_blocks
            state.kv_blocks = 0

    def stats(self) -> RunnerStats:
        return RunnerStats.of_caches(self.cache, activity=self.activity)

    def close(self) -> None:
        self.cache.k = self.cache.v = torch.empty(0)

    # ------------------------------------------------------------------ phases
    def _prefill(self, reqs: list[Request]) -> None:
        prepared = [self.prepared(r) for r in reqs]
        pixels = torch.cat([p.pixels for p in prepared]).to(self.device)
        image_tokens = self.model.embed_images(pixels)
        prefixes, first = [], 0
        for req, p in zip(reqs, prepared, strict=True):
            n = p.pixels.shape[0]
            text = self.model.embed_text(torch.tensor(p.tokens, device=self.device))
            prefixes.append(torch.cat([image_tokens[first : first + n].flatten(0, 1), text]))
            first += n
            req.input_tokens = int(prefixes[-1].shape[0])
        states = [self.state(r) for r in reqs]
        self.model.prefill(prefixes, self.cache, [self._slot(s) for s in states])
        for s in states:
            s.phase = "denoise"
        self.activity.record("prefill", len(reqs))

    def _denoise(self, reqs: list[Request]) -> None:
        states = [self.state(r) for r in reqs]
        x = torch.stack([s.x for s in states])
        t = torch.tensor([euler_time(s.step, s.num_steps) for s in states], dtype=torch.float32, device=self.device)
        v = self.model.velocity(x, t, self.cache, [self._slot(s) for s in states])
        x = euler_update(x, v, torch.tensor([s.num_steps for s in states], device=self.device))
        self.activity.record("denoise", len(reqs))
        for i, (req, s) in enumerate(zip(reqs, states, strict=True)):
            s.x, s.step = x[i], s.step + 1
            req.emit(Progress(s.step, s.num_steps, "denoise"))
            if s.step >= s.num_steps:
                self._finish(req, s)

    def _finish(self, req: Request, s: _State) -> None:
        actions = s.x[: s.horizon].float().cpu().numpy()
        meta = {"action_horizon": s.horizon, "action_dim": self.cfg.action_dim, "num_steps": s.num_steps}
        req.emit(TensorChunk.from_numpy(actions, "action", meta))
        req.output_tokens = s.horizon
        req.finish("stop")

    @staticmethod
    def _slot(s: _State) -> int:
        if s.slot is None:
            raise RuntimeError("a pi05 request lost its KV slot before finishing")
        return s.slot


def _load(weights: str | None, device: torch.device, dtype: torch.dtype) -> tuple[Pi05Model, Pi05Config, Tokenizer]:
    if weights == TINY_WEIGHTS:
        return tiny_model(TINY, device=device, dtype=dtype), TINY, ByteTokenizer(TINY.vocab_size)
    path: Path = resolve_checkpoint_dir(
        weights or "lerobot/pi05_base", allow_patterns=["config.json", "model.safetensors", "tokenizer.json"]
    )
    cfg_file = path / "config.json"
    cfg = config_from_lerobot(cfg_file) if cfg_file.is_file() else FULL
    tokenizer = load_paligemma_tokenizer(path)
    return load_checkpoint(path, cfg, device=device, dtype=dtype), cfg, tokenizer
