"""Pieces of the Qwen2-family byte-level tokenizers that BAGEL and Qwen3-Omni share.

Both families ship a 151k byte-level BPE that cannot be fetched offline, so
their tiny variants use a byte tokenizer without merges whose special tokens
sit at the published ids. What they share lives here: the Qwen2 special-token
table, GPT-2's byte <-> printable-character table, and the encoder that cuts
text at special pieces and spells the rest out byte by byte. The families
differ in where single bytes go (BAGEL: the byte-level BPE id order; Qwen3-Omni:
ids 0..255 as they are), which extra pieces they know, and how they decode, so
each passes its own table and keeps its own decoding.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

__all__ = ["QWEN2_SPECIAL_TOKENS", "SpecialByteEncoder", "byte_level_chars"]

#: The special tokens every Qwen2-vocabulary checkpoint has, at their real ids.
QWEN2_SPECIAL_TOKENS: dict[str, int] = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647,
    "<|box_start|>": 151648,
    "<|box_end|>": 151649,
    "<|quad_start|>": 151650,
    "<|quad_end|>": 151651,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
}


def byte_level_chars() -> list[tuple[int, str]]:
    """GPT-2's byte-level table, in vocabulary id order: (byte, the character that stands for it).

    Printable bytes stand for themselves and come first; the other bytes are
    mapped to the characters from U+0100 on, in byte order.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    rest = [b for b in range(256) if b not in printable]
    return [(b, chr(b)) for b in printable] + [(b, chr(256 + n)) for n, b in enumerate(rest)]


class SpecialByteEncoder:
    """Text to ids: each known piece (special token, whole word) as its id, every other byte as ``byte_ids[b]``."""

    def __init__(self, pieces: Mapping[str, int], byte_ids: Sequence[int]) -> None:
        if len(byte_ids) != 256:
            raise ValueError(f"byte_ids must give an id for each of the 256 bytes, got {len(byte_ids)}")
        self._pieces = dict(pieces)
        self._byte_ids = list(byte_ids)
        # Longest first, so a piece that starts with a shorter one is never cut by it.
        alternatives = sorted(self._pieces, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(re.escape(s) for s in alternatives) + ")")

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for part in self._split.split(text):
            if not part:
                continue
            piece = self._pieces.get(part)
            if piece is not None:
                ids.append(piece)
            else:
                ids.extend(self._byte_ids[b] for b in part.encode("utf-8"))
        return ids
