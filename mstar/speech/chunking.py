"""Cutting text to speak into sentence-aware chunks (torch-free).

A long text is spoken as several shorter prompts: text-to-speech language models lose their
way on long inputs, and short prompts can run side by side. :func:`chunk_text` cuts a whole
text; :class:`SentenceBuffer` cuts text that arrives in pieces (a WebSocket speech stream)
and hands out each sentence as soon as it is known to be complete.

Where a cut may fall, best first:

1. a **sentence end**: ``.``, ``!``, ``?`` or ``…`` (with any closing quotes or brackets)
   followed by whitespace, a full-width ``。``, ``！`` or ``？`` (no whitespace needed, as in
   CJK text), or a line break. A period after a common abbreviation (``Dr.``, ``e.g.``) or
   a single capital (an initial, ``J. Smith``) ends no sentence;
2. a **clause end**: ``,``, ``;``, ``:`` or a dash followed by whitespace, or a full-width
   ``，``, ``、``, ``；`` or ``：``;
3. **whitespace**;
4. between two characters of a script written without spaces (CJK, kana, hangul).

A cut never falls inside a word or inside a tag such as Orpheus' ``<laugh>``: text with
neither punctuation nor spaces (a 500-character URL) stays one over-long chunk rather than
being broken. Sentences are packed greedily into chunks of at most ``max_chars`` characters;
a last chunk shorter than ``min_chars`` joins the one before it (which may then exceed
``max_chars`` by less than ``min_chars``). Chunks are slices of the input with the whitespace
at their ends removed, so joining them with spaces gives back the text's words in order.
"""

from __future__ import annotations

import re

__all__ = ["DEFAULT_CHUNK_CHARS", "MIN_CHUNK_CHARS", "SentenceBuffer", "chunk_text", "split_sentences"]

#: Characters per chunk by default: a few sentences, well inside what TTS models speak well.
DEFAULT_CHUNK_CHARS = 400
#: The smallest ``max_chars`` accepted: below it most sentences would be cut at commas.
MIN_CHUNK_CHARS = 16

# A tag the model reads as a sound, not as words: Orpheus' <laugh>, <chuckle>, <sigh>, <gasp>...
_TAG = re.compile(r"<[A-Za-z][\w-]*>")
_CLOSERS = "\"'”’»)]}"
# Latin sentence ends need the whitespace after them: "3.5" and "e.g.x" end nothing.
_SENTENCE_END = re.compile(rf"[.!?…]+[{re.escape(_CLOSERS)}]*(?=\s)|[。！？]+[{re.escape(_CLOSERS)}」』]*|\n")
_CLAUSE_END = re.compile(r"[,;:–—]+(?=\s)|[，、；：]+")
_SPACE = re.compile(r"\s+")
_ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "mt", "vs", "e.g", "i.e", "cf", "approx", "a.m", "p.m"})


def _no_space_script(ch: str) -> bool:
    """True for characters of scripts written without spaces between words (CJK, kana, hangul)."""
    o = ord(ch)
    return (
        0x3040 <= o <= 0x30FF  # kana
        or 0x3400 <= o <= 0x9FFF  # CJK ideographs (and extension A)
        or 0xAC00 <= o <= 0xD7AF  # hangul syllables
        or 0xF900 <= o <= 0xFAFF  # compatibility ideographs
        or 0xFF00 <= o <= 0xFFEF  # full-width forms
        or 0x3000 <= o <= 0x303F  # CJK punctuation
    )


def _inside_tag(text: str, pos: int) -> bool:
    """True when a cut at ``pos`` would fall inside a ``<tag>``."""
    start = text.rfind("<", 0, pos)
    if start < 0:
        return False
    m = _TAG.match(text, start)
    return m is not None and start < pos < m.end()


def _abbreviation_before(text: str, end: int) -> bool:
    """True when the period ending at ``end`` closes an abbreviation or an initial, not a sentence."""
    if text[end - 1] != ".":
        return False
    words = text[:end].rstrip(".").split()
    word = words[-1].lstrip("(\"'“‘") if words else ""
    if len(word) == 1 and word.isupper() and word != "I":
        return True
    return word.lower() in _ABBREVIATIONS


def _cuts(text: str, start: int, end: int, level: int) -> list[int]:
    """Positions in ``text[start:end]`` where a cut of this ``level`` (0 = sentence end .. 3) may fall."""
    if level == 0:
        found = [m.end() for m in _SENTENCE_END.finditer(text, start, end) if not _abbreviation_before(text, m.end())]
    elif level == 1:
        found = [m.end() for m in _CLAUSE_END.finditer(text, start, end)]
    elif level == 2:
        found = [m.start() for m in _SPACE.finditer(text, start, end)]
    else:
        found = [
            i for i in range(start + 1, end) if _no_space_script(text[i - 1]) and _no_space_script(text[i])
        ]
    return [p for p in found if start < p < end and not _inside_tag(text, p)]


def _length(text: str, span: tuple[int, int]) -> int:
    return len(text[span[0] : span[1]].strip())


def _pack(text: str, start: int, end: int, max_chars: int, level: int) -> list[tuple[int, int]]:
    """Spans covering ``text[start:end]``, each at most ``max_chars`` long where the cut levels allow."""
    if _length(text, (start, end)) <= max_chars or level > 3:
        return [(start, end)]
    cuts = _cuts(text, start, end, level)
    if not cuts:
        return _pack(text, start, end, max_chars, level + 1)
    bounds = [start, *cuts, end]
    pieces = [(a, b) for a, b in zip(bounds, bounds[1:], strict=False) if a < b]
    spans: list[tuple[int, int]] = []
    current: tuple[int, int] | None = None
    for piece in pieces:
        if _length(text, piece) > max_chars:
            if current is not None:
                spans.append(current)
                current = None
            spans.extend(_pack(text, piece[0], piece[1], max_chars, level + 1))
            continue
        if current is None:
            current = piece
        elif _length(text, (current[0], piece[1])) <= max_chars:
            current = (current[0], piece[1])
        else:
            spans.append(current)
            current = piece
    if current is not None:
        spans.append(current)
    return spans


def _check_sizes(max_chars: int, min_chars: int | None) -> int:
    if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < MIN_CHUNK_CHARS:
        raise ValueError(f"max_chars must be an integer >= {MIN_CHUNK_CHARS}, got {max_chars!r}")
    tail = max_chars // 4 if min_chars is None else min_chars
    if isinstance(tail, bool) or not isinstance(tail, int) or not 0 <= tail <= max_chars:
        raise ValueError(f"min_chars must be an integer in [0, max_chars], got {min_chars!r}")
    return tail


def chunk_text(text: str, max_chars: int = DEFAULT_CHUNK_CHARS, *, min_chars: int | None = None) -> list[str]:
    """Cut ``text`` into chunks of at most ``max_chars`` characters at the best boundaries (see
    the module docstring); a last chunk under ``min_chars`` (default ``max_chars // 4``) joins
    the previous one. Blank text gives ``[]``; text within ``max_chars`` gives ``[text.strip()]``.
    """
    tail = _check_sizes(max_chars, min_chars)
    spans = [s for s in _pack(text, 0, len(text), max_chars, 0) if _length(text, s)]
    if len(spans) > 1 and _length(text, spans[-1]) < tail:
        spans[-2:] = [(spans[-2][0], spans[-1][1])]
    return [text[a:b].strip() for a, b in spans]


def split_sentences(text: str) -> list[str]:
    """The sentences of ``text`` (level-1 cuts only, no packing), blank ones dropped."""
    bounds = [0, *_cuts(text, 0, len(text), 0), len(text)]
    return [s for a, b in zip(bounds, bounds[1:], strict=False) if (s := text[a:b].strip())]


class SentenceBuffer:
    """Text arriving in pieces, handed out a sentence at a time as soon as each is complete.

    :meth:`feed` returns the sentences completed by the new text (a Latin sentence end is
    complete once the whitespace after it has arrived); a run longer than ``max_chars``
    without a sentence end is cut at a clause end or a space that has fully arrived, so
    speech never waits for an endless sentence. :meth:`flush` returns what is left. Pieces
    shorter than ``min_chars`` (a stray ``"."``) are kept and joined to the next sentence.
    """

    __slots__ = ("_buf", "max_chars", "min_chars")

    def __init__(self, max_chars: int = DEFAULT_CHUNK_CHARS, *, min_chars: int = 2) -> None:
        _check_sizes(max_chars, min_chars)
        self.max_chars = max_chars
        self.min_chars = min_chars
        self._buf = ""

    @property
    def pending(self) -> str:
        """The text received but not yet handed out."""
        return self._buf

    def feed(self, text: str) -> list[str]:
        """Add ``text``; return the sentences it completed, in order."""
        self._buf += text
        out: list[str] = []
        while True:
            piece = self._take_sentence() or self._take_overflow()
            if piece is None:
                return out
            out.append(piece)

    def flush(self) -> str | None:
        """Everything still buffered, as one piece (None when only whitespace is left)."""
        rest, self._buf = self._buf.strip(), ""
        return rest or None

    def _take(self, end: int) -> str:
        piece, self._buf = self._buf[:end].strip(), self._buf[end:]
        return piece

    def _take_sentence(self) -> str | None:
        for cut in _cuts(self._buf, 0, len(self._buf), 0):
            if len(self._buf[:cut].strip()) >= self.min_chars:
                return self._take(cut)
        return None

    def _take_overflow(self) -> str | None:
        buf = self._buf
        if len(buf.strip()) <= self.max_chars:
            return None
        # Only text followed by a space is known to hold whole words: the last word may still grow
        # (a character of a script written without spaces is whole by itself).
        if buf[-1].isspace() or _no_space_script(buf[-1]):
            complete = len(buf)
        else:
            complete = max((m.start() for m in _SPACE.finditer(buf)), default=0)
        if not buf[:complete].strip():
            return None
        return self._take(_pack(buf, 0, complete, self.max_chars, 1)[0][1])
