"""Cutting text to speak into chunks: sentence ends first, never inside a word or a <tag>."""

from __future__ import annotations

import re

import pytest

from mstar.speech.chunking import MIN_CHUNK_CHARS, SentenceBuffer, chunk_text, split_sentences


def _words(text: str) -> list[str]:
    return text.split()


def test_short_text_is_one_chunk_stripped() -> None:
    assert chunk_text("  Hello there.  ", 400) == ["Hello there."]


def test_blank_text_gives_no_chunk() -> None:
    assert chunk_text("   \n ", 400) == []


def test_sentences_are_packed_greedily_up_to_the_limit() -> None:
    text = "One two three. Four five six. Seven eight nine. Ten eleven twelve."
    assert chunk_text(text, 32, min_chars=0) == ["One two three. Four five six.", "Seven eight nine.", "Ten eleven twelve."]


def test_every_chunk_respects_the_limit_and_the_words_come_back_in_order() -> None:
    sentence = "The quick brown fox jumps over the lazy dog, again and again. "
    text = sentence * 40
    chunks = chunk_text(text, 150, min_chars=0)
    assert len(chunks) > 10
    assert all(len(c) <= 150 for c in chunks)
    assert _words(" ".join(chunks)) == _words(text)


def test_chunks_end_at_sentence_ends_when_sentences_fit() -> None:
    text = " ".join(f"Sentence number {i} is here." for i in range(30))
    for chunk in chunk_text(text, 100):
        assert chunk.endswith(".")
        assert chunk.startswith("Sentence")


def test_a_long_sentence_is_cut_at_clause_ends_before_spaces() -> None:
    text = "alpha beta gamma delta, epsilon zeta eta theta, iota kappa lambda mu, nu xi omicron pi."
    chunks = chunk_text(text, 50, min_chars=0)
    assert chunks == ["alpha beta gamma delta, epsilon zeta eta theta,", "iota kappa lambda mu, nu xi omicron pi."]


def test_text_without_punctuation_is_cut_at_whitespace_never_inside_a_word() -> None:
    words = [f"word{i}" for i in range(200)]
    text = " ".join(words)
    chunks = chunk_text(text, 60, min_chars=0)
    assert all(len(c) <= 60 for c in chunks)
    assert [w for c in chunks for w in c.split()] == words


def test_a_word_longer_than_the_limit_stays_whole() -> None:
    url = "https://example.com/" + "x" * 100
    chunks = chunk_text(f"See {url} now", 40, min_chars=0)
    assert url in chunks
    assert "".join(chunks).replace(" ", "") == f"See{url}now"


def test_an_emotion_tag_is_never_split() -> None:
    text = ("I could not stop <laugh> laughing at that <chuckle> and then <sigh> it ended " * 6).strip()
    for max_chars in (16, 20, 25, 33, 47):
        chunks = chunk_text(text, max_chars, min_chars=0)
        tags = [t for c in chunks for t in re.findall(r"<[^>]*>?|[^<]*>", c) if t.startswith("<")]
        assert all(t in ("<laugh>", "<chuckle>", "<sigh>") for t in tags), (max_chars, chunks)
        assert " ".join(chunks).split() == text.split()


def test_a_tag_in_text_without_spaces_is_not_split() -> None:
    text = "你好" * 20 + "<laugh>" + "世界" * 20
    chunks = chunk_text(text, MIN_CHUNK_CHARS, min_chars=0)
    assert any("<laugh>" in c for c in chunks)
    assert "".join(chunks) == text


def test_cjk_sentence_ends_cut_without_whitespace() -> None:
    text = "今天天气很好。我们去公园吧！你觉得怎么样？好的"
    assert split_sentences(text) == ["今天天气很好。", "我们去公园吧！", "你觉得怎么样？", "好的"]
    chunks = chunk_text(text * 4, 20, min_chars=0)
    assert all(len(c) <= 20 for c in chunks)
    assert "".join(chunks) == text * 4


def test_cjk_without_punctuation_is_cut_between_characters() -> None:
    text = "汉字" * 60
    chunks = chunk_text(text, 50, min_chars=0)
    assert [len(c) for c in chunks] == [50, 50, 20]
    assert "".join(chunks) == text


def test_cjk_clause_marks_are_preferred_to_character_cuts() -> None:
    text = "这是第一部分的内容，" + "这是第二部分的内容，" + "这是第三部分"
    assert chunk_text(text, 22, min_chars=0) == ["这是第一部分的内容，这是第二部分的内容，", "这是第三部分"]


def test_abbreviations_and_initials_and_decimals_end_no_sentence() -> None:
    text = "Dr. Smith met J. R. Tolkien at 3.5 p.m. on Main St. today. Then they left, e.g. quickly."
    assert split_sentences(text) == ["Dr. Smith met J. R. Tolkien at 3.5 p.m. on Main St. today.", "Then they left, e.g. quickly."]


def test_closing_quotes_and_brackets_stay_with_their_sentence() -> None:
    text = 'He said "stop!" Then (quietly.) she left.'
    assert split_sentences(text) == ['He said "stop!"', "Then (quietly.)", "she left."]


def test_line_breaks_end_sentences() -> None:
    assert split_sentences("Roses are red\nViolets are blue\n\nThe end") == ["Roses are red", "Violets are blue", "The end"]


def test_a_short_tail_joins_the_chunk_before_it() -> None:
    text = "A" * 10 + " " + "b" * 30 + ". " + "c" * 42 + ". Ok."
    assert chunk_text(text, 45, min_chars=0)[-1] == "Ok."
    merged = chunk_text(text, 45, min_chars=5)
    assert merged[-2:] == ["A" * 10 + " " + "b" * 30 + ".", "c" * 42 + ". Ok."]


def test_the_default_tail_is_a_quarter_of_the_limit() -> None:
    text = "x" * 90 + ". " + "y" * 90 + ". Short end."
    assert chunk_text(text, 100)[-1].endswith("y. Short end.")


@pytest.mark.parametrize("bad", [0, 5, MIN_CHUNK_CHARS - 1, 2.5, True, "400"])
def test_bad_sizes_are_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="max_chars"):
        chunk_text("Hello there.", bad)  # type: ignore[arg-type]


def test_a_min_chars_above_the_limit_is_refused() -> None:
    with pytest.raises(ValueError, match="min_chars"):
        chunk_text("Hello there.", 40, min_chars=41)


def test_a_2000_character_paragraph_gives_chunks_near_the_default_size() -> None:
    sentence = "Streaming speech should sound natural even when the text is very long indeed. "
    text = (sentence * 30)[:2000]
    chunks = chunk_text(text)
    assert len(chunks) == 5
    assert all(300 <= len(c) <= 400 for c in chunks[:-1])
    assert _words(" ".join(chunks)) == _words(text)


# ---------------------------------------------------------------------- streamed text


def test_buffer_hands_out_a_sentence_once_the_space_after_it_arrives() -> None:
    buf = SentenceBuffer(100)
    assert buf.feed("Hello there.") == []
    assert buf.feed(" How") == ["Hello there."]
    assert buf.feed(" are you?") == []
    assert buf.flush() == "How are you?"
    assert buf.flush() is None


def test_buffer_fed_word_by_word_gives_the_sentences_in_order() -> None:
    text = "First sentence here. Second one follows! And a third? Tail without end"
    buf = SentenceBuffer(100)
    out: list[str] = []
    for word in text.split(" "):
        out += buf.feed(word + " ")
    assert out == ["First sentence here.", "Second one follows!", "And a third?"]
    assert buf.flush() == "Tail without end"


def test_buffer_hands_out_cjk_sentences_at_once() -> None:
    buf = SentenceBuffer(100)
    assert buf.feed("你好。我") == ["你好。"]
    assert buf.flush() == "我"


def test_buffer_cuts_a_run_on_at_a_complete_word_only() -> None:
    buf = SentenceBuffer(20)
    out: list[str] = []
    for piece in ["one two three four fi", "ve six seven eight nine ten"]:
        out += buf.feed(piece)
    assert all(len(s) <= 20 for s in out)
    assert " ".join([*out, buf.flush() or ""]).split() == "one two three four five six seven eight nine ten".split()
    assert "fi" not in out and not any(s.endswith(" fi") for s in out)


def test_buffer_keeps_a_stray_mark_for_the_next_sentence() -> None:
    buf = SentenceBuffer(100)
    assert buf.feed(". Hello world. ") == [". Hello world."]


def test_buffer_does_not_cut_an_unfinished_tag() -> None:
    buf = SentenceBuffer(MIN_CHUNK_CHARS)
    out = buf.feed("ha ha ha ha ha <lau")
    out += buf.feed("gh> ha ha ha ha ha ha. ")
    assert all("<lau" not in s or "<laugh>" in s for s in out)
    assert " ".join(out).split() == "ha ha ha ha ha <laugh> ha ha ha ha ha ha.".split()
