"""Per-request data of a Qwen3-Omni request, shared by the runner and its Thinker and Talker stages.

``Encoded`` is what ``prepare`` builds in the caller's thread (``Request.prepared``);
``OmniState`` is what ``admit`` sets (``Request.state``) and the stages advance,
with a ``TalkerState`` when the request wants speech.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mstar.layers.sampling import SamplingParams
from mstar.models.qwen3_omni.processor import AudioFeatures, VisualPatches
from mstar.request import Request

__all__ = ["Encoded", "OmniState", "Pair", "TalkerState"]


@dataclass(slots=True)
class Encoded:
    """A validated request's prompt: token ids, 3-D positions, and preprocessed media in prompt order."""

    ids: list[int]
    positions: torch.Tensor  # [3, L] float
    delta: float
    audios: list[AudioFeatures]
    images: list[VisualPatches]
    videos: list[VisualPatches]


@dataclass(slots=True)
class TalkerState:
    speaker_id: int
    sampling: SamplingParams
    cp_sampling: SamplingParams
    max_tokens: int
    slot: int | None = None  # None once released
    kv_blocks: int = 0  # Talker KV blocks reserved for this request's worst case (given back at release)
    user_embeds: torch.Tensor | None = None  # [U, H_talker] user turns, projected
    positions: torch.Tensor | None = None  # [3, prefill_len]
    delta: float = 0.0
    started: bool = False
    step: int = 0  # decode steps taken (index into the trailing text)
    last_code: int | None = None
    last_hidden: torch.Tensor | None = None  # [H_talker] final-norm state of the last position
    history: list[int] = field(default_factory=list)  # sampled first-codebook tokens
    frames: list[list[int]] = field(default_factory=list)
    decoded_frames: int = 0  # frames already turned into audio
    done: bool = False
    finish_reason: str = "stop"  # "stop": the codec's end-of-speech; "length": the frame cap or the cache was full


@dataclass(slots=True)
class OmniState:
    enc: Encoded
    slot: int  # the Thinker's KV slot
    sampling: SamplingParams
    max_tokens: int
    emit_text: bool
    kv_blocks: int = 0  # Thinker KV blocks reserved for this request's worst case (given back at release)
    cached: int = 0  # leading prompt tokens found in the prefix cache: prefill starts after them
    prefilled: bool = False
    generated: list[int] = field(default_factory=list)  # Thinker tokens, the stop token included
    pending_bytes: bytes = b""  # an unfinished UTF-8 sequence, emitted with the next token
    thinker_done: bool = False
    finish_reason: str = "stop"  # the Thinker's: "stop" (its end token, or speech ended first), "length" (its cap)
    talker: TalkerState | None = None


#: A running request and its state, as the stages take them (sampling needs the request's generator).
Pair = tuple[Request, OmniState]
