"""Tokenizers for BAGEL: the checkpoint's Qwen2 tokenizer, or an offline byte-level stand-in.

The stand-in follows Qwen2's layout where it matters: ids 0-255 are the
single-byte tokens in the byte-to-unicode order of byte-level BPE (as in
Qwen2's vocabulary), and the special tokens sit at their real ids
(``<|im_start|>`` 151644, ``<|im_end|>`` 151645, ``<|vision_start|>`` 151652,
...). It has no merges, so text costs one token per UTF-8 byte.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from mstar.errors import WeightsError
from mstar.models.qwen_tokenizer import QWEN2_SPECIAL_TOKENS, SpecialByteEncoder, byte_level_chars

__all__ = ["ByteTokenizer", "HFTokenizer", "TextTokenizer", "load_tokenizer"]


class TextTokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def token_id(self, token: str) -> int | None: ...


class ByteTokenizer:
    """Offline byte-level tokenizer with Qwen2's special token ids."""

    def __init__(self) -> None:
        order = [b for b, _ in byte_level_chars()]
        id_of_byte = {b: i for i, b in enumerate(order)}
        self._encoder = SpecialByteEncoder(QWEN2_SPECIAL_TOKENS, [id_of_byte[b] for b in range(256)])
        self._byte_of_id = dict(enumerate(order))
        self._special_ids = dict(QWEN2_SPECIAL_TOKENS)
        self._special_names = {v: k for k, v in self._special_ids.items()}

    def encode(self, text: str) -> list[int]:
        return self._encoder.encode(text)

    def token_id(self, token: str) -> int | None:
        return self._special_ids.get(token)

    def decode(self, ids: list[int]) -> str:
        out: list[str] = []
        buf = bytearray()
        for i in ids:
            b = self._byte_of_id.get(i)
            if b is not None:
                buf.append(b)
                continue
            if buf:
                out.append(buf.decode("utf-8", errors="replace"))
                buf = bytearray()
            # Ids this byte-only vocabulary lacks (a tiny random model emits them) stay visible.
            out.append(self._special_names.get(i, f"<|{i}|>"))
        if buf:
            out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)


class HFTokenizer:
    """The checkpoint's tokenizer: ``tokenizer.json`` through ``tokenizers``, else ``vocab.json`` + ``merges.txt``."""

    def __init__(self, root: Path) -> None:
        from tokenizers import Tokenizer

        if (root / "tokenizer.json").is_file():
            self._tok = Tokenizer.from_file(str(root / "tokenizer.json"))
        else:
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(str(root)).backend_tokenizer

    def token_id(self, token: str) -> int | None:
        found = self._tok.token_to_id(token)
        return None if found is None else int(found)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return str(self._tok.decode(ids, skip_special_tokens=False))


def load_tokenizer(checkpoint_dir: Path) -> TextTokenizer:
    """The checkpoint's tokenizer (tiny weights use :class:`ByteTokenizer` instead)."""
    if not ((checkpoint_dir / "tokenizer.json").is_file() or (checkpoint_dir / "vocab.json").is_file()):
        raise WeightsError(f"no tokenizer (tokenizer.json or vocab.json + merges.txt) in {str(checkpoint_dir)!r}")
    try:
        return HFTokenizer(checkpoint_dir)
    except Exception as exc:
        raise WeightsError(f"could not load the tokenizer in {str(checkpoint_dir)!r}: {exc}") from exc
