"""From sampled token ids to SNAC code windows.

The model writes frames of 7 audio tokens. Position j of a frame carries
``<custom_token_{10 + j*4096 + code}>``; positions 0 / 1,4 / 2,3,5,6 feed
SNAC's coarse / middle / fine streams. A token that is not a valid code for
the position it would take is skipped and does not advance the position, as
in the reference decoder (which also skips non-audio tokens). Unlike the
reference, code 0 is accepted (it is a valid codebook entry; the reference's
``> 0`` test drops it) and codes >= 4096 are rejected per token instead of
voiding the whole window later.
"""

from __future__ import annotations

import torch

from mstar.models.orpheus.config import AUDIO_TOKEN_BASE, CODEBOOK_SIZE, CODES_PER_FRAME, WINDOW_FRAMES

__all__ = ["CodeStream", "split_window", "WINDOW_TOKENS"]

WINDOW_TOKENS = CODES_PER_FRAME * WINDOW_FRAMES  # 28


class CodeStream:
    """One request's accepted audio codes, in order."""

    __slots__ = ("codes",)

    def __init__(self) -> None:
        self.codes: list[int] = []

    def push(self, token: int) -> bool:
        """Accept ``token`` if it is an audio code for the next frame position; return whether it was."""
        pos = len(self.codes) % CODES_PER_FRAME
        code = token - AUDIO_TOKEN_BASE - pos * CODEBOOK_SIZE
        if 0 <= code < CODEBOOK_SIZE:
            self.codes.append(code)
            return True
        return False

    @property
    def frames(self) -> int:
        return len(self.codes) // CODES_PER_FRAME

    def window_ready(self) -> bool:
        """True right after a frame completes once at least a full window exists (the reference's cadence)."""
        n = len(self.codes)
        return n >= WINDOW_TOKENS and n % CODES_PER_FRAME == 0

    def window(self) -> list[int]:
        """The last 4 frames' codes (28 ints)."""
        return self.codes[-WINDOW_TOKENS:]


def split_window(windows: torch.Tensor) -> list[torch.Tensor]:
    """[B, 28] codes -> SNAC's three streams [B, 4], [B, 8], [B, 16] in time order."""
    w = windows.view(windows.shape[0], WINDOW_FRAMES, CODES_PER_FRAME)
    coarse = w[:, :, 0]
    middle = w[:, :, [1, 4]].reshape(w.shape[0], -1)
    fine = w[:, :, [2, 3, 5, 6]].reshape(w.shape[0], -1)
    return [coarse.contiguous(), middle, fine]
