"""V-JEPA 2-AC: an action-conditioned world model over V-JEPA 2 latents.

Every frame is encoded on its own, as a two-frame tubelet of itself (as the
release's planner does), into ``tokens_per_frame = (crop / 16) ** 2`` latents
of width ``hidden``, then layer-normalised (no affine): the space in which the
predictor was trained and in which the planner measures distances.

Request: ``Engine("vjepa2_ac").generate(video=..., images=..., output_modalities=("latent",), **kw)``
with model kwargs:

- ``mode``: ``"rollout"`` (default), ``"score"`` or ``"encode"``.
- ``states`` (rollout, score): the robot's end-effector state at each context
  frame, ``[C, 7]`` (``[7]`` for one frame): ``x, y, z`` (m), extrinsic ``xyz``
  Euler angles (rad), gripper closedness in [0, 1]. ``C`` sets the context:
  the last ``C`` frames of ``video`` (a ``ShapeError`` if it has fewer).
  The actions between context frames are derived from these states
  (the DROID loader's ``poses_to_diffs``).
- ``actions``: end-effector deltas applied from the last context frame, one
  per predicted frame: rollout ``[T, 7]``; score ``[N, T, 7]`` candidate
  sequences (``[T, 7]`` is one candidate). ``C + T - 1`` may not exceed the
  predictor's trained length (32 frames for the release).
- ``extrinsics``: camera pose ``[C, 6]`` (or ``[6]``), only for a predictor
  trained with extrinsics; the release checkpoint was not (``use_extrinsics``
  is False), so passing them is an ``InvalidParameterError``.
- ``goal_latent`` (score, optional): a goal already in latent space,
  ``[tokens_per_frame, hidden]`` (for example the last frame of an ``encode``
  result); otherwise the goal is ``images[0]`` or, failing that, the last
  frame of ``video[1]``.

Inputs: ``video[0]`` is the context clip (``mode="encode"`` also accepts a
single image). The goal image is encoded like a context frame.

Outputs (one ``TensorChunk`` of modality ``"latent"``, float32):

- ``encode``: ``[F, tokens_per_frame, hidden]``, the normalised latents of
  every frame of the clip.
- ``rollout``: ``[T, tokens_per_frame, hidden]``, the predicted (normalised)
  latents of the ``T`` frames after the context, autoregressively: each
  prediction is fed back as the next frame's input, with the state advanced by
  the action (the planner's ``compute_new_pose``). Metadata carries the
  predicted ``states`` ``[T, 7]``.
- ``score``: ``[N]``, the planner's objective for each candidate: the mean
  absolute difference (L1) between the final predicted frame's latents and
  the goal's. Lower is better; metadata ``best`` is the argmin.

Batching: one step encodes up to 64 frames of the requests in their encode
phase (one encoder forward: each frame is a clip of the same shape; a longer
clip continues in the next step), and advances by
one frame the autoregressive rollouts that are at the same length (context
plus frames so far), candidates and requests stacked as batch rows. The
runner's ``activity`` counts them as components ``"encoder"`` (rows: frames)
and ``"predictor"`` (rows: rollouts).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from mstar.errors import InvalidParameterError, InvalidRequestError, ShapeError
from mstar.models.base import ModelRunner
from mstar.models.params import Param
from mstar.models.vjepa2.checkpoint import load_ac
from mstar.models.vjepa2.inputs import decode_frames, float_array
from mstar.models.vjepa2.pose import next_pose, pose_deltas
from mstar.models.vjepa2.preprocess import normalize, resize_center_crop
from mstar.registry import get_model_info
from mstar.request import Request, RequestInputs
from mstar.settings import RunnerSettings
from mstar.types import TensorChunk

__all__ = ["ACPrepared", "VJEPA2ACRunner"]

MAX_CANDIDATES = 1024
MAX_ENCODE_FRAMES = 256  # bounds an encode result (256 x 256 x 1408 float32 is 369 MB for the release)
MAX_FRAMES_PER_ENCODE = 64  # frames (each a 2-frame clip) per encoder forward
MAX_ROWS_PER_PREDICT = 512  # rollouts (candidates) per predictor forward


_EMPTY = torch.zeros(0)


@dataclass(frozen=True, slots=True)
class ACPrepared:
    """A checked request (:meth:`VJEPA2ACRunner.prepare`): the frames to encode and the rollout's inputs."""

    mode: str
    frames: torch.Tensor  # uint8 [F, 3, crop, crop]: context (and goal as the last frame for score)
    context: int
    has_goal_frame: bool
    actions: torch.Tensor = _EMPTY  # [N, C - 1 + T, 7]
    states: torch.Tensor = _EMPTY  # [N, C, 7]
    extrinsics: torch.Tensor | None = None  # [N, C - 1 + T, 6]
    goal: torch.Tensor | None = None  # [P, D], given as goal_latent
    steps: int = 0


@dataclass(slots=True)
class _State:
    """One request's progress: frames to encode, then rollout rows advancing one frame per step."""

    prep: ACPrepared
    states: torch.Tensor  # [N, C + k, 7], grows with the rollout
    goal: torch.Tensor | None  # [P, D]: goal_latent, or the encoded goal frame
    latents: torch.Tensor = _EMPTY  # [N, (C + k) * P, D], set once encoded
    done_steps: int = 0
    phase: str = "encode"  # then "predict", then "done"
    predicted: list[torch.Tensor] = field(default_factory=list)
    encoded: list[torch.Tensor] = field(default_factory=list)  # latents of the frames encoded so far


class VJEPA2ACRunner(ModelRunner[ACPrepared, _State]):
    """Encodes frames, rolls the AC predictor out over actions, and scores candidate action sequences."""

    name = "vjepa2_ac"
    params: ClassVar[Mapping[str, Param]] = {
        "mode": Param(str, "rollout", choices=("rollout", "score", "encode"), doc="what to compute"),
        "actions": Param(object, None, type_name="array", doc="[T, 7] (rollout) or [N, T, 7] (score) end-effector deltas"),
        "states": Param(object, None, type_name="array", doc="[C, 7] end-effector state at each context frame"),
        "extrinsics": Param(object, None, type_name="array", doc="[C, 6] camera pose per context frame (predictors trained with them)"),
        "goal_latent": Param(object, None, type_name="array", doc="[tokens_per_frame, hidden] goal in latent space (score)"),
    }

    def __init__(self, *, weights: str | None, settings: RunnerSettings) -> None:
        super().__init__(weights=weights, settings=settings)
        self.encoder, self.enc_cfg, self.predictor, self.cfg = load_ac(
            weights or get_model_info(self.name).hub_id, self.device, self.dtype
        )

    # ------------------------------------------------------------------ checking (caller thread)
    def prepare(
        self, inputs: RequestInputs, output_modalities: tuple[str, ...], params: Mapping[str, Any]
    ) -> ACPrepared:
        mode = params["mode"]
        cfg = self.cfg
        if mode == "encode":
            for key in ("actions", "states", "extrinsics", "goal_latent"):
                if params[key] is not None:
                    raise InvalidParameterError(f"{key} is not used with mode='encode'", param=key)
            items = inputs.video[:1] or inputs.images[:1]
            if len(inputs.video) + len(inputs.images) != 1:
                raise InvalidRequestError("mode='encode' takes exactly one video or image", param="video")
            frames = decode_frames(items[0], "video")
            if frames.shape[0] > MAX_ENCODE_FRAMES:
                raise ShapeError(
                    f"mode='encode' takes at most {MAX_ENCODE_FRAMES} frames ([T <= {MAX_ENCODE_FRAMES}, H, W, 3]); "
                    f"got {frames.shape[0]}",
                    param="video",
                )
            return ACPrepared(mode, self._prepare(frames), frames.shape[0], False)

        if len(inputs.video) < 1:
            raise InvalidRequestError(f"mode={mode!r} needs the context clip as video[0]", param="video")
        for key in ("actions", "states"):
            if params[key] is None:
                raise InvalidParameterError(f"mode={mode!r} needs {key}", param=key)
        a = cfg.action_dim
        states = float_array("states", params["states"], ("C", a))
        context = states.shape[0]
        if mode == "rollout":
            actions = float_array("actions", params["actions"], ("T", a))[None]
        else:
            actions = float_array("actions", params["actions"], ("N", "T", a))
            if actions.shape[0] > MAX_CANDIDATES:
                raise ShapeError(
                    f"at most {MAX_CANDIDATES} candidate sequences per request; got {actions.shape[0]}", param="actions"
                )
        horizon = actions.shape[1]
        if context + horizon - 1 > cfg.max_frames:
            raise ShapeError(
                f"context frames + action steps - 1 must be <= {cfg.max_frames} (the predictor's length); "
                f"got states [{context}, {a}] and actions with T={horizon}",
                param="actions",
            )
        extrinsics = self._extrinsics(params["extrinsics"], context)

        frames = decode_frames(inputs.video[0], "video")
        if frames.shape[0] < context:
            raise ShapeError(
                f"states describe {context} context frames, so the video must have at least {context} frames "
                f"(shape [T >= {context}, H, W, 3]); got {frames.shape[0]}",
                param="video",
            )
        frames = frames[frames.shape[0] - context :]

        goal_latent = None
        goal_frame: np.ndarray | None = None
        has_goal_frame = False
        if mode == "rollout":
            if params["goal_latent"] is not None or inputs.images or len(inputs.video) > 1:
                raise InvalidRequestError(
                    "a goal (images, video[1], goal_latent) is only used with mode='score'", param="images"
                )
        else:
            if params["goal_latent"] is not None:
                goal_latent = torch.from_numpy(
                    float_array("goal_latent", params["goal_latent"], (cfg.tokens_per_frame, cfg.embed_dim))
                )
            elif inputs.images or len(inputs.video) > 1:
                item = inputs.images[0] if inputs.images else inputs.video[1]
                goal_frame = decode_frames(item, "goal")[-1:]
                has_goal_frame = True
            else:
                raise InvalidRequestError(
                    "mode='score' needs a goal: images[0], video[1] (its last frame) or goal_latent", param="images"
                )

        state_t = torch.from_numpy(states)
        ctx_actions = pose_deltas(state_t) if context > 1 else torch.zeros(0, a)
        rows = actions.shape[0]
        seq = torch.cat([ctx_actions[None].expand(rows, -1, -1), torch.from_numpy(actions)], dim=1)
        pixels = self._prepare(frames)
        if goal_frame is not None:
            pixels = torch.cat([pixels, self._prepare(goal_frame)])
        return ACPrepared(
            mode,
            pixels,
            context,
            has_goal_frame,
            actions=seq,
            states=state_t[None].expand(rows, -1, -1).clone(),
            extrinsics=None if extrinsics is None else extrinsics[None].expand(rows, -1, -1).clone(),
            goal=goal_latent,
            steps=horizon,
        )

    def _extrinsics(self, value: Any, context: int) -> torch.Tensor | None:
        cfg = self.cfg
        if not cfg.use_extrinsics:
            if value is not None:
                raise InvalidParameterError(
                    "this V-JEPA 2-AC predictor was trained without camera extrinsics (use_extrinsics=False); "
                    "leave extrinsics out",
                    param="extrinsics",
                )
            return None
        if value is None:
            raise InvalidParameterError(
                f"this predictor needs extrinsics of shape [{context}, {cfg.extrinsics_dim}]", param="extrinsics"
            )
        ext = float_array("extrinsics", value, ("C", cfg.extrinsics_dim))
        if ext.shape[0] != context:
            raise ShapeError(
                f"extrinsics must have shape [{context}, {cfg.extrinsics_dim}] (one per context frame); got {list(ext.shape)}",
                param="extrinsics",
            )
        # The camera is held fixed over the rollout: repeat the last pose for the predicted frames.
        e = torch.from_numpy(ext)
        return torch.cat([e, e[-1:].expand(cfg.max_frames, -1)])

    def _prepare(self, frames: np.ndarray) -> torch.Tensor:
        return resize_center_crop(frames, self.enc_cfg.crop_size, self.enc_cfg.crop_size)

    # ------------------------------------------------------------------ scheduling
    def admit(self, req: Request) -> bool:
        prep = self.prepared(req)
        req.state = _State(prep, states=prep.states, goal=prep.goal)
        return True

    def step(self, reqs: list[Request]) -> None:
        encoding = [r for r in reqs if self.state(r).phase == "encode"]
        if encoding:
            self._encode_step(encoding)
        rolling = [r for r in reqs if not r.done and self.state(r).phase == "predict"]
        if rolling:
            self._predict_step(rolling)

    def _encode_step(self, reqs: list[Request]) -> None:
        # Fill one forward with up to MAX_FRAMES_PER_ENCODE frames, across requests; a long clip spans steps.
        budget = MAX_FRAMES_PER_ENCODE
        pieces: list[tuple[Request, _State, int, int]] = []
        for req in reqs:
            st = self.state(req)
            start = sum(int(x.shape[0]) for x in st.encoded)
            take = min(st.prep.frames.shape[0] - start, budget)
            pieces.append((req, st, start, start + take))
            budget -= take
            if budget == 0:
                break
        frames = torch.cat([st.prep.frames[a:b] for _, st, a, b in pieces]).to(self.device)
        latents = self.encode_frames(frames)
        self.activity.record("encoder", int(frames.shape[0]))
        offset = 0
        for req, st, a, b in pieces:
            st.encoded.append(latents[offset : offset + b - a])
            offset += b - a
            if b == st.prep.frames.shape[0]:
                self._encoded(req)

    def _encoded(self, req: Request) -> None:
        """Every frame of ``req`` is encoded: emit (encode mode) or set up the rollout rows."""
        st = self.state(req)
        lat = torch.cat(st.encoded)
        st.encoded = []
        req.input_tokens = int(lat.shape[0] * lat.shape[1])
        if st.prep.mode == "encode":
            self._emit(req, lat, {"mode": "encode", "frames": int(lat.shape[0])})
            return
        if st.prep.has_goal_frame:
            st.goal, lat = lat[-1], lat[:-1]
        st.latents = lat.flatten(0, 1)[None].expand(st.prep.actions.shape[0], -1, -1)
        st.phase = "predict"

    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 frames [F, 3, crop, crop] -> normalised latents [F, tokens_per_frame, hidden] (one forward)."""
        clips = normalize(frames, self.dtype).unsqueeze(1).expand(-1, self.enc_cfg.tubelet_size, -1, -1, -1)
        with torch.inference_mode():
            h = self.encoder(clips)
        return F.layer_norm(h, (h.shape[-1],))

    def _predict_step(self, reqs: list[Request]) -> None:
        length = self.state(reqs[0]).latents.shape[1]
        chosen: list[tuple[Request, _State]] = []
        rows = 0
        for req in reqs:
            st = self.state(req)
            if st.latents.shape[1] != length:
                continue
            n = st.latents.shape[0]
            if chosen and rows + n > MAX_ROWS_PER_PREDICT:
                break
            chosen.append((req, st))
            rows += n
        frames = length // self.cfg.tokens_per_frame
        dev, dt = self.device, self.dtype
        z = torch.cat([st.latents for _, st in chosen]).to(dev, dt)
        acts = torch.cat([st.prep.actions[:, :frames] for _, st in chosen]).to(dev, dt)
        states = torch.cat([st.states[:, :frames] for _, st in chosen]).to(dev, dt)
        ext = None
        if self.cfg.use_extrinsics:  # prepare() set extrinsics on every request then
            ext = torch.cat([_extrinsics_of(st)[:, :frames] for _, st in chosen]).to(dev, dt)
        with torch.inference_mode():
            out = self.predictor(z, acts, states, ext)[:, -self.cfg.tokens_per_frame :]
            nxt = F.layer_norm(out, (out.shape[-1],))
        self.activity.record("predictor", rows)
        offset = 0
        for req, st in chosen:
            n = st.latents.shape[0]
            new = nxt[offset : offset + n]
            offset += n
            st.latents = torch.cat([st.latents.to(dev, dt), new], dim=1)
            last_action = st.prep.actions[:, frames - 1]
            st.states = torch.cat([st.states, next_pose(st.states[:, -1], last_action)[:, None]], dim=1)
            st.done_steps += 1
            req.output_tokens += int(new.shape[1])
            if st.prep.mode == "rollout":
                st.predicted.append(new[0])
            if st.done_steps == st.prep.steps:
                self._finish_rollout(req, st)

    def _finish_rollout(self, req: Request, st: _State) -> None:
        if st.prep.mode == "rollout":
            meta = {
                "mode": "rollout",
                "context_frames": st.prep.context,
                "states": st.states[0, st.prep.context :].tolist(),
            }
            self._emit(req, torch.stack(st.predicted), meta)
            return
        final = st.latents[:, -self.cfg.tokens_per_frame :].float()
        assert st.goal is not None  # prepare() refuses a score request without a goal
        goal = st.goal.to(final.device, torch.float32)
        scores = (final - goal).abs().mean(dim=(1, 2))
        meta = {
            "mode": "score",
            "objective": "l1",
            "lower_is_better": True,
            "best": int(scores.argmin()),
            "steps": st.prep.steps,
            "context_frames": st.prep.context,
        }
        self._emit(req, scores, meta)

    def _emit(self, req: Request, tensor: torch.Tensor, meta: dict[str, Any]) -> None:
        cfg = self.cfg
        meta = {**meta, "tokens_per_frame": cfg.tokens_per_frame, "grid": [cfg.grid_size, cfg.grid_size]}
        req.emit(TensorChunk.from_numpy(tensor.float().cpu().numpy(), "latent", meta))
        self.state(req).phase = "done"
        req.finish("stop")

    def release(self, req: Request) -> None:
        req.state = None


def _extrinsics_of(st: _State) -> torch.Tensor:
    if st.prep.extrinsics is None:
        raise RuntimeError("a V-JEPA 2-AC request reached a predictor trained with extrinsics without them")
    return st.prep.extrinsics
