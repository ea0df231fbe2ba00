"""An offline byte-level tokenizer with Qwen3-Omni's special tokens at their real ids.

The published tokenizer (a 151k BPE) cannot be fetched offline, so the tiny
variant uses this one: bytes are ids 0..255, a few words the model logic keys
on (``system``, ``user``, ``assistant``, newline) have their real ids, and every
special token (``<|im_start|>``, ``<|audio_pad|>``, ``<tts_pad>``, ...) sits at
its published id. With real weights the checkpoint's own ``tokenizer.json`` is
used instead (see :func:`load_tokenizer`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from mstar.models.qwen_tokenizer import QWEN2_SPECIAL_TOKENS, SpecialByteEncoder, byte_level_chars

__all__ = ["SPECIAL_TOKENS", "ByteTokenizer", "HFTokenizer", "TextTokenizer", "load_tokenizer"]

SPECIAL_TOKENS: dict[str, int] = {
    **QWEN2_SPECIAL_TOKENS,
    "<tool_call>": 151657,
    "</tool_call>": 151658,
    "<|fim_prefix|>": 151659,
    "<|fim_middle|>": 151660,
    "<|fim_suffix|>": 151661,
    "<|fim_pad|>": 151662,
    "<|repo_name|>": 151663,
    "<|file_sep|>": 151664,
    "<tool_response>": 151665,
    "</tool_response>": 151666,
    "<think>": 151667,
    "</think>": 151668,
    "<|audio_start|>": 151669,
    "<|audio_end|>": 151670,
    "<tts_pad>": 151671,
    "<tts_text_bos>": 151672,
    "<tts_text_eod>": 151673,
    "<tts_text_bos_single>": 151674,
    "<|audio_pad|>": 151675,
}
# Whole-word tokens whose real ids the model logic depends on (role detection for the Talker).
_WORDS: dict[str, int] = {"system": 8948, "user": 872, "assistant": 77091, "\n": 198}


class TextTokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode_bytes(self, ids: list[int]) -> bytes: ...
    def token_id(self, token: str) -> int: ...


class ByteTokenizer:
    """Bytes as ids 0..255, plus the special tokens and role words at their published ids."""

    def __init__(self) -> None:
        self._pieces: dict[str, int] = {**SPECIAL_TOKENS, **_WORDS}
        self._by_id: dict[int, bytes] = {i: s.encode() for s, i in self._pieces.items()}
        self._special = set(SPECIAL_TOKENS.values())
        self._encoder = SpecialByteEncoder(self._pieces, range(256))

    def encode(self, text: str) -> list[int]:
        return self._encoder.encode(text)

    def decode_bytes(self, ids: list[int]) -> bytes:
        out = bytearray()
        for i in ids:
            if 0 <= i < 256:
                out.append(i)
            elif i in self._by_id:
                if i not in self._special:
                    out += self._by_id[i]
            elif i >= 0:
                # Ids past the byte range (a random tiny model picks them) read as printable ASCII.
                out.append(32 + i % 95)
        return bytes(out)

    def token_id(self, token: str) -> int:
        return self._pieces[token]


class HFTokenizer:
    """The checkpoint's own byte-level BPE: ``tokenizer.json`` via ``tokenizers``, else vocab/merges via transformers."""

    def __init__(self, path: Path) -> None:
        if path.is_file():
            from tokenizers import Tokenizer

            self._tok: Any = Tokenizer.from_file(str(path))
            self._fast = True
        else:
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(str(path))
            self._fast = False
        self._special = set(SPECIAL_TOKENS.values())
        # GPT-2's byte <-> character table, to turn BPE pieces back into raw bytes for incremental decoding.
        self._byte_of = {ch: b for b, ch in byte_level_chars()}

    def encode(self, text: str) -> list[int]:
        if self._fast:
            return list(self._tok.encode(text, add_special_tokens=False).ids)
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode_bytes(self, ids: list[int]) -> bytes:
        out = bytearray()
        for i in ids:
            if i in self._special:
                continue
            piece = self._tok.id_to_token(i) if self._fast else self._tok.convert_ids_to_tokens(i)
            if piece is None:
                continue
            out += bytes(self._byte_of.get(ch, 0) for ch in piece)
        return bytes(out)

    def token_id(self, token: str) -> int:
        tid = self._tok.token_to_id(token) if self._fast else self._tok.convert_tokens_to_ids(token)
        return SPECIAL_TOKENS[token] if tid is None else int(tid)


def load_tokenizer(checkpoint_dir: Path | None) -> TextTokenizer:
    """The checkpoint's tokenizer when it ships one, else the offline byte tokenizer."""
    if checkpoint_dir is not None and (checkpoint_dir / "tokenizer.json").is_file():
        return HFTokenizer(checkpoint_dir / "tokenizer.json")
    if checkpoint_dir is not None and (checkpoint_dir / "vocab.json").is_file():
        return HFTokenizer(checkpoint_dir)
    return ByteTokenizer()
