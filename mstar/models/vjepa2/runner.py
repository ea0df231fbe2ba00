"""V-JEPA 2: a video in, the encoder's patch latents out.

Request (``Engine("vjepa2").generate(video=..., output_modalities=("latent",))``):

- ``video``: one clip (any container PyAV decodes). Frames are resized and
  centre-cropped to the model's crop (256 for the published checkpoint) the
  way transformers' ``VJEPA2VideoProcessor`` does, so any frame size works.
- ``num_frames``: how many frames to encode, taken from the start of the clip
  after ``frame_step``; a multiple of the tubelet size (2), at most the frames
  the clip has (more is a ``ShapeError`` naming that count, never a silent cut).
  Unset: the checkpoint's ``frames_per_clip`` (64), or the whole clip when it is
  shorter, rounded down to whole tubelets (``metadata["frames"]`` says how many).
  A clip with fewer than 2 frames is a ``ShapeError``.
- ``frame_step`` (default 1): keep every k-th frame (the reference demo uses 2).

Output: one ``TensorChunk`` of modality ``"latent"``, float32, shape
``[tokens, hidden]`` with ``tokens = frames / 2 * (crop / 16) ** 2``: the
encoder's ``last_hidden_state`` (after its final LayerNorm), frame-major in
raster order. Metadata: ``frames`` (used), ``grid`` ``[T', H', W']``,
``tubelet_size``, ``patch_size``.

Batching: each step encodes one group of requests whose clips have the same
frame count in a single forward (at most ``MAX_CLIPS_PER_FORWARD`` clips);
other groups wait for the next step, so a cancel lands within one forward.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from mstar.errors import InvalidParameterError, InvalidRequestError, ShapeError
from mstar.models.base import ModelRunner
from mstar.models.params import Param
from mstar.models.vjepa2.checkpoint import load_encoder
from mstar.models.vjepa2.inputs import decode_frames
from mstar.models.vjepa2.preprocess import normalize, resize_center_crop
from mstar.registry import get_model_info
from mstar.request import Request, RequestInputs
from mstar.settings import RunnerSettings
from mstar.types import TensorChunk

__all__ = ["VJEPA2Runner"]

MAX_CLIPS_PER_FORWARD = 8


class VJEPA2Runner(ModelRunner[torch.Tensor, None]):
    """Encodes clips with the V-JEPA 2 ViT; same-shape clips share one forward.

    Stateless between steps: :meth:`prepare` decodes, resizes and crops the
    clip (uint8 ``[frames, 3, crop, crop]``), and one step encodes it. Each
    encoder forward is recorded as ``activity`` component ``"encoder"`` with
    one row per clip.
    """

    name = "vjepa2"
    params: ClassVar[Mapping[str, Param]] = {
        "num_frames": Param(
            int, None, min=2, max=512,
            doc="frames to encode from the clip's start: a multiple of 2, at most the clip's frames; "
            "default: frames_per_clip (64) or the whole clip if shorter",
        ),
        "frame_step": Param(int, 1, min=1, max=64, doc="keep every k-th frame before counting num_frames"),
    }

    def __init__(self, *, weights: str | None, settings: RunnerSettings) -> None:
        super().__init__(weights=weights, settings=settings)
        self.model, self.cfg = load_encoder(weights or get_model_info(self.name).hub_id, self.device, self.dtype)

    def prepare(
        self, inputs: RequestInputs, output_modalities: tuple[str, ...], params: Mapping[str, Any]
    ) -> torch.Tensor:
        if len(inputs.video) != 1:
            raise InvalidRequestError(
                f"vjepa2 encodes exactly one video per request; got {len(inputs.video)}", param="video"
            )
        cfg = self.cfg
        frames = decode_frames(inputs.video[0], "video")[:: params["frame_step"]]
        asked = params["num_frames"]
        if asked is not None:
            if asked % cfg.tubelet_size:
                raise InvalidParameterError(
                    f"num_frames must be a multiple of {cfg.tubelet_size} (the encoder's tubelet size); got {asked}",
                    param="num_frames",
                )
            if asked > frames.shape[0]:
                raise ShapeError(
                    f"num_frames={asked} but the clip has {frames.shape[0]} frames after "
                    f"frame_step={params['frame_step']}; ask for at most {frames.shape[0]}",
                    param="num_frames",
                )
        wanted = asked or cfg.frames_per_clip
        usable = min(wanted, frames.shape[0]) // cfg.tubelet_size * cfg.tubelet_size
        if usable < cfg.tubelet_size:
            raise ShapeError(
                f"the video must have at least {cfg.tubelet_size} frames (shape [T >= {cfg.tubelet_size}, H, W, 3] "
                f"after frame_step={params['frame_step']}); got {frames.shape[0]}",
                param="video",
            )
        shorter = int(cfg.crop_size * 256 / 224)
        return resize_center_crop(frames[:usable], cfg.crop_size, shorter)

    def step(self, reqs: list[Request]) -> None:
        first = self.prepared(reqs[0]).shape
        group = [r for r in reqs if self.prepared(r).shape == first][:MAX_CLIPS_PER_FORWARD]
        clips = torch.stack([self.prepared(r) for r in group]).to(self.device)
        with torch.inference_mode():
            latents = self.model(normalize(clips, self.dtype)).float().cpu().numpy()
        self.activity.record("encoder", len(group))
        cfg = self.cfg
        frames = int(first[0])
        meta = {
            "frames": frames,
            "grid": [frames // cfg.tubelet_size, cfg.grid_size, cfg.grid_size],
            "tubelet_size": cfg.tubelet_size,
            "patch_size": cfg.patch_size,
        }
        for req, lat in zip(group, latents, strict=True):
            req.input_tokens = int(lat.shape[0])
            req.output_tokens = int(lat.shape[0])
            req.emit(TensorChunk.from_numpy(lat, "latent", meta))
            req.finish("stop")
