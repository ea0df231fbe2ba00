"""The pi0.5 prompt: the task text plus the robot state discretised into 256 bins, and its tokenizers.

The format is openpi's: ``"Task: {task}, State: {bins};\\nAction: "`` with the
task stripped and ``_`` / newlines replaced by spaces, each state value
(normalised to [-1, 1]) replaced by its bin index 0..255, then tokenized
with a leading BOS.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from mstar.errors import WeightsError
from mstar.weights import hub_offline

__all__ = [
    "BOS_ID",
    "NEWLINE_ID",
    "ByteTokenizer",
    "HFTokenizer",
    "Tokenizer",
    "build_prompt",
    "discretize_state",
    "load_paligemma_tokenizer",
]

# PaliGemma (Gemma) ids the prompt uses.
BOS_ID = 2
NEWLINE_ID = 108
#: Gemma's byte-fallback tokens <0x00>..<0xFF> start here.
BYTE_BASE = 217

PALIGEMMA_TOKENIZER_REPO = "google/paligemma-3b-pt-224"


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without BOS/EOS."""
        ...


def discretize_state(state: Sequence[float], bins: int = 256) -> np.ndarray:
    """Bin indices 0..bins-1 of ``state`` on a uniform grid over [-1, 1].

    Values outside [-1, 1] (an un-normalised state) are clipped to the edge bins.
    """
    arr = np.clip(np.asarray(state, dtype=np.float64), -1.0, 1.0)
    edges = np.linspace(-1.0, 1.0, bins + 1)[:-1]
    return (np.digitize(arr, edges) - 1).astype(np.int64)


def build_prompt(task: str, state: Sequence[float], bins: int = 256) -> str:
    cleaned = task.strip().replace("_", " ").replace("\n", " ")
    state_str = " ".join(str(int(b)) for b in discretize_state(state, bins))
    return f"Task: {cleaned}, State: {state_str};\nAction: "


class ByteTokenizer:
    """Offline tokenizer for the tiny variant: one token per UTF-8 byte at Gemma's byte-fallback ids.

    BOS and "\\n" sit at PaliGemma's real ids (2 and 108),
    so prompts have the same layout as with the real tokenizer.
    """

    def __init__(self, vocab_size: int) -> None:
        if vocab_size < BYTE_BASE + 256:
            raise ValueError(f"the byte tokenizer needs a vocabulary of at least {BYTE_BASE + 256}, got {vocab_size}")
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return [NEWLINE_ID if b == 0x0A else BYTE_BASE + b for b in text.encode("utf-8")]


class HFTokenizer:
    """The real PaliGemma tokenizer from a ``tokenizer.json`` (the ``tokenizers`` library, no transformers)."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer as _Tok

        try:
            self._tok = _Tok.from_file(str(path))
        except Exception as exc:
            raise WeightsError(f"could not load the tokenizer {str(path)!r}: {exc}") from exc
        if self._tok.token_to_id("<bos>") != BOS_ID:
            raise WeightsError(f"{str(path)!r} is not a PaliGemma tokenizer (<bos> is not id {BOS_ID})")

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)


def load_paligemma_tokenizer(checkpoint_dir: Path) -> HFTokenizer:
    """The checkpoint's own ``tokenizer.json`` if it has one, else PaliGemma's from the local hub cache."""
    local = checkpoint_dir / "tokenizer.json"
    if local.is_file():
        return HFTokenizer(local)
    try:
        from huggingface_hub import hf_hub_download

        from mstar.progress import hub_tqdm_class

        file = hf_hub_download(
            PALIGEMMA_TOKENIZER_REPO, "tokenizer.json", local_files_only=hub_offline(), tqdm_class=hub_tqdm_class()
        )
        return HFTokenizer(Path(file))
    except WeightsError:
        raise
    except Exception as exc:
        raise WeightsError(
            f"pi05 needs the PaliGemma tokenizer: put tokenizer.json in {str(checkpoint_dir)!r} or make "
            f"{PALIGEMMA_TOKENIZER_REPO} available in the hub cache ({type(exc).__name__}: {exc})"
        ) from exc


def finite_floats(values: object) -> list[float] | None:
    """``values`` as a list of finite floats, or None if it is not one (bools are refused)."""
    if not isinstance(values, (list, tuple)):
        return None
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
            return None
        f = float(v)
        if not math.isfinite(f):
            return None
        out.append(f)
    return out
