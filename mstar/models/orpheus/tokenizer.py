"""Text -> token ids: the checkpoint's own tokenizer, or an offline byte tokenizer for tiny weights.

Both put ``<|begin_of_text|>`` (128000) first, as the published Llama-3
tokenizer does, and both live in the same 156,940-id space, so prompt
assembly and the audio-token layout are identical for tiny and full runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from mstar.errors import WeightsError
from mstar.models.orpheus.config import BOS, CUSTOM_TOKEN_BASE

__all__ = ["ByteTokenizer", "CheckpointTokenizer", "TextTokenizer", "custom_token_id"]


def custom_token_id(n: int) -> int:
    """Id of ``<custom_token_n>``."""
    return CUSTOM_TOKEN_BASE + n


class TextTokenizer(Protocol):
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, starting with BOS."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 (the tiny model's vocabulary for text), plus BOS."""

    def encode(self, text: str) -> list[int]:
        return [BOS, *text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", "replace")


class CheckpointTokenizer:
    """The ``tokenizer.json`` shipped with a checkpoint, via the ``tokenizers`` library."""

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer

        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise WeightsError(f"no tokenizer.json in {str(path)!r}; the Orpheus checkpoint directory must contain it")
        try:
            self._tok = Tokenizer.from_file(str(file))
        except Exception as exc:
            raise WeightsError(f"could not read tokenizer {str(file)!r}: {exc}") from exc

    def encode(self, text: str) -> list[int]:
        ids = list(self._tok.encode(text).ids)
        # The Llama-3 post-processor adds BOS; a tokenizer.json without it still gets exactly one.
        return ids if ids[:1] == [BOS] else [BOS, *ids]

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)
