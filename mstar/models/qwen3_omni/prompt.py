"""Chat prompts for Qwen3-Omni: the chat template, media placeholders and 3-D (MRoPE) positions.

A request becomes ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message,
then ``<|im_start|>assistant\\n``. Media parts expand to their placeholder runs
(``<|vision_start|><|image_pad|>*n<|vision_end|>``,
``<|audio_start|><|audio_pad|>*n<|audio_end|>``, and the video equivalent),
``n`` being the number of embeddings the encoder yields for that item. A
video heard with its audio track (``use_audio_in_video``) becomes
``<|vision_start|><|audio_start|>`` + one run mixing ``<|video_pad|>`` and
``<|audio_pad|>`` in time order (:func:`audio_video_layout`) +
``<|audio_end|><|vision_end|>``, as the reference processor writes it.

Prefix caching (the Thinker's, see :func:`text_prefix_len`): the keys and
values of a prompt token depend on every token before it, on the media
embeddings scattered into placeholder runs and on the 3-D positions. Only the
part of a prompt *before its first media placeholder* is named in the prefix
cache: there every token is an ordinary text token (its embedding is its id's)
and :func:`mrope_positions` gives it the plain position ``i`` on all three
axes, whatever follows. So equal token ids mean equal keys and values, and a
hash of the ids is a sound name. Text-only chat history and system prompts are
cached whole; a prompt with media shares only the text that precedes them.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mstar.errors import InvalidRequestError
from mstar.models.qwen3_omni.processor import VisualPatches
from mstar.models.qwen3_omni.tokenizer import TextTokenizer
from mstar.request import RequestInputs

__all__ = [
    "ChatPart",
    "audio_video_layout",
    "mrope_positions",
    "normalise_messages",
    "prompt_positions",
    "render_prompt",
    "text_prefix_len",
]

ROLES = ("system", "user", "assistant")
MEDIA = ("image", "audio", "video")

#: A message as a role and its ordered parts: ("text", str) or (modality, index into that modality's items).
ChatPart = tuple[str, Any]


@dataclass(slots=True)
class _Message:
    role: str
    parts: list[ChatPart]


def normalise_messages(inputs: RequestInputs) -> list[_Message]:
    """Messages with media parts resolved to item indices; checks roles and part counts."""
    counts = {"image": len(inputs.images), "audio": len(inputs.audio), "video": len(inputs.video)}
    used = dict.fromkeys(MEDIA, 0)
    out: list[_Message] = []
    if inputs.messages:
        for i, msg in enumerate(inputs.messages):
            if not isinstance(msg, dict) or "role" not in msg:
                raise InvalidRequestError(
                    f"messages[{i}] must be an object with 'role' and 'content'", param="messages"
                )
            role = str(msg["role"]).lower()
            if role not in ROLES:
                raise InvalidRequestError(
                    f"messages[{i}].role must be one of {', '.join(ROLES)}; got {msg['role']!r}", param="messages"
                )
            content = msg.get("content")
            parts: list[ChatPart] = []
            if content is None:
                pass
            elif isinstance(content, str):
                parts.append(("text", content))
            elif isinstance(content, list):
                for j, part in enumerate(content):
                    kind = part.get("type") if isinstance(part, dict) else None
                    if kind == "text":
                        parts.append(("text", str(part.get("text", ""))))
                    elif kind in MEDIA:
                        if used[kind] >= counts[kind]:
                            raise InvalidRequestError(
                                f"messages[{i}].content[{j}] refers to {kind} #{used[kind] + 1}, but only "
                                f"{counts[kind]} {kind} item(s) were given",
                                param="messages",
                            )
                        parts.append((kind, used[kind]))
                        used[kind] += 1
                    else:
                        raise InvalidRequestError(
                            f"messages[{i}].content[{j}].type must be text, image, audio or video; got {kind!r}",
                            param="messages",
                        )
            else:
                raise InvalidRequestError(
                    f"messages[{i}].content must be a string or a list of parts", param="messages"
                )
            out.append(_Message(role, parts))
    if inputs.text:
        out.append(_Message("user", [("text", inputs.text)]))
    # Media not referenced by any part goes in front of the last user message, in order.
    extra: list[ChatPart] = [(kind, k) for kind in MEDIA for k in range(used[kind], counts[kind])]
    if extra:
        users = [m for m in out if m.role == "user"]
        if users:
            users[-1].parts[:0] = extra
        else:
            out.append(_Message("user", extra))
    if not any(m.role == "user" for m in out):
        raise InvalidRequestError("the conversation needs at least one user message", param="messages")
    return out


_OPEN = {"image": "<|vision_start|>", "video": "<|vision_start|>", "audio": "<|audio_start|>"}
_PAD = {"image": "<|image_pad|>", "video": "<|video_pad|>", "audio": "<|audio_pad|>"}
_CLOSE = {"image": "<|vision_end|>", "video": "<|vision_end|>", "audio": "<|audio_end|>"}


def audio_video_layout(
    video: VisualPatches, audio_tokens: int, *, merge: int, position_id_per_seconds: float
) -> list[bool]:
    """The order of a video's tokens and its audio track's: True for a video token, False for an audio one.

    Both are placed on one time axis counted in position ids: audio token ``j`` sits at ``j``
    (one per 80 ms at 12.5 ids a second), the tokens of temporal group ``t`` of the video at
    ``t * second_per_grid * position_id_per_seconds``. Tokens go out in time order, a video
    token before an audio token at the same time; what is left of either follows at the end.
    """
    gt, gh, gw = video.grid_thw
    per_group = (gh // merge) * (gw // merge)
    step = float(video.second_per_grid) * float(position_id_per_seconds)
    out: list[bool] = []
    v = a = 0
    total = gt * per_group
    while v < total and a < audio_tokens:
        if (v // per_group) * step <= a:
            out.append(True)
            v += 1
        else:
            out.append(False)
            a += 1
    out += [True] * (total - v) + [False] * (audio_tokens - a)
    return out


def render_prompt(
    messages: Sequence[_Message],
    tokenizer: TextTokenizer,
    token_counts: dict[str, list[int]],
    video_audio: Mapping[int, Sequence[bool]] | None = None,
) -> tuple[list[int], list[tuple[str, int]]]:
    """Token ids of the whole prompt, and the media items in order of appearance.

    ``video_audio`` maps a video's index to its :func:`audio_video_layout` when the video is
    heard with its audio track; the other videos (and all without it) get plain video runs.
    """
    ids: list[int] = []
    order: list[tuple[str, int]] = []
    tracks = video_audio or {}
    for msg in messages:
        text = f"<|im_start|>{msg.role}\n"
        for kind, value in msg.parts:
            if kind == "text":
                text += value
            elif kind == "video" and value in tracks:
                ids += tokenizer.encode(text)
                text = ""
                vid, aud = tokenizer.token_id(_PAD["video"]), tokenizer.token_id(_PAD["audio"])
                ids += [tokenizer.token_id(_OPEN["video"]), tokenizer.token_id(_OPEN["audio"])]
                ids += [vid if is_video else aud for is_video in tracks[value]]
                ids += [tokenizer.token_id(_CLOSE["audio"]), tokenizer.token_id(_CLOSE["video"])]
                order.append((kind, value))
            else:
                ids += tokenizer.encode(text)
                text = ""
                n = token_counts[kind][value]
                ids += [tokenizer.token_id(_OPEN[kind])] + [tokenizer.token_id(_PAD[kind])] * n
                ids.append(tokenizer.token_id(_CLOSE[kind]))
                order.append((kind, value))
        ids += tokenizer.encode(text + "<|im_end|>\n")
    ids += tokenizer.encode("<|im_start|>assistant\n")
    return ids, order


def mrope_positions(
    ids: Sequence[int],
    *,
    image_token: int,
    video_token: int,
    image_grids: Sequence[tuple[int, int, int]],
    video_grids: Sequence[tuple[int, int, int]],
    video_second_per_grid: Sequence[float],
    merge: int,
    position_id_per_seconds: float,
    audio_token: int | None = None,
) -> tuple[torch.Tensor, float]:
    """3-D positions [3, L] (float) and the decode offset ``max + 1 - L``.

    Text and audio advance all axes by one per token. A run of image/video
    tokens gets (time, row, column) positions offset from the position the
    run starts at; the next token continues from the run's maximum + 1.
    A video run may have its audio track's tokens (``audio_token``) mixed in
    (:func:`audio_video_layout`): from the same start, the video tokens take
    the video's positions in order and the audio tokens ``start + j``; the
    next token continues after the stream the run ends with.
    Without images or videos this is plain ``0..L-1`` on every axis.
    """
    n = len(ids)
    if not image_grids and not video_grids:
        return torch.arange(n, dtype=torch.float32)[None].expand(3, -1).clone(), 0.0
    pos = torch.zeros(3, n, dtype=torch.float32)
    nxt = 0.0
    i = 0
    img = vid = 0
    while i < n:
        tok = ids[i]
        if tok in (image_token, video_token):
            if tok == image_token:
                gt, gh, gw = image_grids[img]
                t_step = float(position_id_per_seconds)
                img += 1
            else:
                gt, gh, gw = video_grids[vid]
                t_step = float(video_second_per_grid[vid]) * float(position_id_per_seconds)
                vid += 1
            h, w = gh // merge, gw // merge
            count = gt * h * w
            t_idx = (torch.arange(gt, dtype=torch.float32) * t_step).view(-1, 1).expand(-1, h * w).reshape(-1)
            h_idx = torch.arange(h, dtype=torch.float32).view(1, -1, 1).expand(gt, -1, w).reshape(-1)
            w_idx = torch.arange(w, dtype=torch.float32).view(1, 1, -1).expand(gt, h, -1).reshape(-1)
            block = torch.stack([t_idx, h_idx, w_idx]) + nxt
            # The run: this item's tokens, and in a video the audio track's tokens mixed among them.
            end, heard = i, 0
            while end < n and (ids[end] == tok or (tok == video_token and ids[end] == audio_token)):
                heard += ids[end] != tok
                end += 1
            if end - i - heard != count:
                kind = "image" if tok == image_token else "video"
                raise ValueError(f"a {kind} run holds {end - i - heard} tokens; its grid {(gt, gh, gw)} gives {count}")
            if heard:
                run = torch.tensor(ids[i:end])
                audio = torch.arange(heard, dtype=torch.float32)[None].expand(3, -1) + nxt
                pos[:, i:end][:, run == tok] = block
                pos[:, i:end][:, run != tok] = audio
                # The reference continues after the stream the run ends with: one past the last audio
                # token when the track outlasts the frames, even where a frame's rows reach further.
                nxt = (float(block.max()) if ids[end - 1] == tok else float(audio.max())) + 1.0
            else:
                pos[:, i:end] = block
                nxt = float(block.max()) + 1.0
            i = end
        else:
            pos[:, i] = nxt
            nxt += 1.0
            i += 1
    return pos, float(pos.max()) + 1.0 - n


def prompt_positions(
    thinker_cfg: dict[str, Any], ids: Sequence[int], images: Sequence[VisualPatches], videos: Sequence[VisualPatches]
) -> tuple[torch.Tensor, float]:
    """:func:`mrope_positions` of ``ids`` under the Thinker's config; ``images``/``videos`` are its visual runs in order.

    The Thinker's prompt and the Talker's (its user turns) are both positioned this way. Before the
    first image or video run the positions are ``0..k-1`` on every axis (see :func:`text_prefix_len`).
    """
    return mrope_positions(
        ids,
        image_token=thinker_cfg["image_token_id"],
        video_token=thinker_cfg["video_token_id"],
        image_grids=[i.grid_thw for i in images],
        video_grids=[v.grid_thw for v in videos],
        video_second_per_grid=[v.second_per_grid for v in videos],
        merge=thinker_cfg["vision_config"]["spatial_merge_size"],
        position_id_per_seconds=thinker_cfg["position_id_per_seconds"],
        audio_token=thinker_cfg["audio_token_id"],
    )


def text_prefix_len(ids: Sequence[int], media_tokens: Collection[int]) -> int:
    """The number of leading tokens of ``ids`` before the first media placeholder (all of them if none).

    ``media_tokens`` are the placeholder ids (audio, image and video pads). That prefix is
    what the Thinker's prefix cache may name and reuse: its tokens embed as themselves and sit
    at sequential positions (see the module docstring), so their keys and values depend on
    the ids alone. Start/end markers (``<|vision_start|>`` ...) are ordinary text tokens.
    """
    for i, tok in enumerate(ids):
        if tok in media_tokens:
            return i
    return len(ids)
