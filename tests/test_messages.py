"""OpenAI content parts in ``messages``: placed as placeholders, their media in order (mstar/messages.py)."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from mstar import errors
from mstar.media import MediaItem
from mstar.messages import MediaRef, inline_media, place_media

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 8
WAV = b"RIFF\x00\x00\x00\x00WAVEfmt "


def _url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def _user(*parts: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": list(parts)}]


def test_openai_parts_become_placeholders_with_their_media_between_the_given_items() -> None:
    given = {"image": ["A", "B"]}
    msgs = _user({"type": "image"}, {"type": "image_url", "image_url": {"url": "X"}}, {"type": "text", "text": "t"})
    out, media = place_media(msgs, given, lambda ref: ref.url)
    assert out == _user({"type": "image"}, {"type": "image"}, {"type": "text", "text": "t"})
    # A for the placeholder, X for the part, then B which no part referred to (the model places it).
    assert media == {"image": ["A", "X", "B"], "audio": [], "video": []}


@pytest.mark.parametrize(
    "part, ref",
    [
        ({"type": "image_url", "image_url": {"url": "data:u"}}, MediaRef("image", "messages[0].content[0]", url="data:u")),
        ({"type": "image_url", "image_url": "data:u"}, MediaRef("image", "messages[0].content[0]", url="data:u")),
        ({"type": "input_image", "image_url": "data:u"}, MediaRef("image", "messages[0].content[0]", url="data:u")),
        ({"type": "video_url", "video_url": {"url": "data:v"}}, MediaRef("video", "messages[0].content[0]", url="data:v")),
        ({"type": "audio_url", "audio_url": {"url": "data:a"}}, MediaRef("audio", "messages[0].content[0]", url="data:a")),
        (
            {"type": "input_audio", "input_audio": {"data": "QUJD", "format": "WAV"}},
            MediaRef("audio", "messages[0].content[0]", data="QUJD", format="wav"),
        ),
    ],
)
def test_every_openai_part_shape_is_read(part: dict[str, Any], ref: MediaRef) -> None:
    seen: list[MediaRef] = []
    place_media(_user(part), {}, lambda r: seen.append(r) or "item")
    assert seen == [ref]


def test_a_resolver_answering_none_keeps_the_part() -> None:
    part = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    out, media = place_media(_user(part), {}, lambda ref: None)
    assert out == _user(part) and media["image"] == []


def test_an_unknown_part_type_is_refused_naming_the_accepted_ones() -> None:
    with pytest.raises(errors.MediaError, match=r"messages\[0\].content\[1\] has unsupported type 'file'; supported: text"):
        place_media(_user({"type": "text", "text": "x"}, {"type": "file"}), {}, lambda ref: None)


def test_a_placeholder_beyond_the_given_items_is_refused() -> None:
    with pytest.raises(errors.InvalidRequestError, match=r"refers to image #2, but only 1 image item\(s\) were given"):
        place_media(_user({"type": "image"}, {"type": "image"}), {"image": ["A"]}, lambda ref: None)


@pytest.mark.parametrize(
    "part, problem",
    [
        ({"type": "image_url"}, 'must carry its URL as "image_url"'),
        ({"type": "image_url", "image_url": {"url": 3}}, 'must carry its URL as "image_url"'),
        ({"type": "input_audio", "input_audio": "QUJD"}, "input_audio must be"),
        ({"type": "input_audio", "input_audio": {"data": "QUJD", "format": "../x"}}, "format must be a short name"),
    ],
)
def test_malformed_openai_parts_raise_media_error(part: dict[str, Any], problem: str) -> None:
    with pytest.raises(errors.MediaError, match=problem):
        place_media(_user(part), {}, lambda ref: None)


def test_inline_media_decodes_data_urls_and_input_audio() -> None:
    assert inline_media(MediaRef("image", "w", url=_url("image/png", PNG))) == MediaItem("image.bin", PNG, "image")
    ref = MediaRef("audio", "w", data=base64.b64encode(WAV).decode(), format="wav")
    assert inline_media(ref) == MediaItem("audio.wav", WAV, "audio")


@pytest.mark.parametrize(
    "url, problem",
    [
        ("https://example.com/a.png", "remote media URLs are not fetched in-process"),
        ("/etc/passwd", "must look like data:<mime>;base64,<payload>"),
        ("data:image/png,rawtext", "must look like data:<mime>;base64,<payload>"),
        ("data:image/png;base64,%%%", "data URL payload is not valid base64"),
        ("data:image/png;base64,", "data URL payload is empty"),
        (_url("audio/wav", WAV), "carries image media but its data URL says 'audio/wav'"),
    ],
)
def test_inline_media_refuses_what_it_cannot_decode_in_process(url: str, problem: str) -> None:
    with pytest.raises(errors.MediaError, match=problem):
        inline_media(MediaRef("image", "messages[0].content[0]", url=url))


def test_input_text_parts_are_read_as_text_parts() -> None:
    out, _ = place_media(_user({"type": "input_text", "text": "hi"}), {}, lambda ref: None)
    assert out == _user({"type": "text", "text": "hi"})
