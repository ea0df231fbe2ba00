"""Results, events and buffers read well: short reprs anywhere, inline media in Jupyter."""

from __future__ import annotations

import base64
import io
import re
import subprocess
import sys
import wave

import numpy as np
import pytest

from mstar import _display
from mstar.types import (
    AudioBuffer,
    AudioChunk,
    ErrorChunk,
    Finished,
    GenerateResult,
    ImageChunk,
    Progress,
    TensorChunk,
    TextChunk,
    Usage,
)

PNG_1x1 = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
)
SPEECH = AudioBuffer(np.zeros(43_200, dtype="<i2").tobytes(), 24_000)  # 1.8 s, as in the issue
ACTIONS = TensorChunk.from_numpy(np.zeros((50, 32), np.float32), "action", {"horizon": 50})


def _big_result() -> GenerateResult:
    """Everything at once, and every string as long as the rules allow."""
    return GenerateResult(
        request_id="r" * 128,
        text="word " * 20_000,
        images=[PNG_1x1] * 3,
        audio=SPEECH,
        tensors=[ACTIONS, ACTIONS],
        seed=2**63 - 1,
        usage=Usage(10**9, 10**9, 10**9),
        finish_reason="cancelled",
        raw={"huge": "x" * 10**6},
    )


EVERYTHING = [
    TextChunk("x" * 100_000),
    ImageChunk(PNG_1x1, {"width": 1}),
    AudioChunk(SPEECH.pcm, 24_000, metadata={"k": "v" * 1000}),
    TensorChunk.from_numpy(np.zeros((4, 8, 16), np.float32), "latent", {f"key{i}": i for i in range(50)}),
    Progress(3, 50, "denoise" * 100),
    Finished("stop", Usage(1, 2, 3), 7, "q" * 128),
    ErrorChunk(500, "boom " * 1000, "internal"),
    Usage(1, 2, 3),
    SPEECH,
    _big_result(),
]


@pytest.mark.parametrize("obj", EVERYTHING, ids=lambda o: type(o).__name__)
def test_every_repr_is_under_300_characters(obj: object) -> None:
    assert len(repr(obj)) < 300, repr(obj)


def test_audio_repr_says_duration_rate_and_channels() -> None:
    assert repr(SPEECH) == "AudioBuffer(1.80 s, 24000 Hz, mono, 43200 samples)"
    assert repr(AudioChunk(b"\0\0" * 4800, 48_000, 2)) == "AudioChunk(0.05 s, 48000 Hz, stereo, 2400 samples)"


def test_tensor_repr_says_modality_dtype_and_shape() -> None:
    assert repr(ACTIONS) == "TensorChunk(action float32[50, 32], metadata: horizon)"


def test_image_repr_reads_the_png_size() -> None:
    assert repr(ImageChunk(PNG_1x1)) == f"ImageChunk(png 1x1, {len(PNG_1x1)} B)"
    assert repr(ImageChunk(b"nope")) == "ImageChunk(not a PNG, 4 B)"


def test_result_repr_names_finish_reason_seed_and_each_part() -> None:
    text = repr(_big_result())
    for part in ("finish_reason='cancelled'", f"seed={2**63 - 1}", "(100000 chars)", "1.80 s, 24000 Hz", "images=[png 1x1 +2]",
                 "action float32[50, 32] +1", "tokens=1000000000 in/1000000000 out"):
        assert part in text, part
    assert "huge" not in text  # the raw document is never shown


def _wav_from_html(markup: str) -> wave.Wave_read:
    match = re.search(r'<audio controls[^>]* src="data:audio/wav;base64,([A-Za-z0-9+/=]+)"', markup)
    assert match, markup[:200]
    return wave.open(io.BytesIO(base64.b64decode(match.group(1))))


def test_audio_plays_inline_as_a_wav_with_its_rate() -> None:
    with _wav_from_html(SPEECH._repr_html_()) as w:
        assert (w.getframerate(), w.getnchannels(), w.getnframes()) == (24_000, 1, 43_200)
    with _wav_from_html(AudioChunk(b"\1\0" * 100, 16_000)._repr_html_()) as w:
        assert (w.getframerate(), w.getnframes()) == (16_000, 100)


def test_long_audio_is_cut_in_the_player_and_the_caption_says_so() -> None:
    rate = 8_000
    long = AudioBuffer(b"\0\0" * int(rate * (_display.MAX_INLINE_AUDIO_SECONDS + 30)), rate)
    markup = long._repr_html_()
    with _wav_from_html(markup) as w:
        assert w.getnframes() == int(_display.MAX_INLINE_AUDIO_SECONDS * rate)
    assert f"first {_display.MAX_INLINE_AUDIO_SECONDS:g} s" in markup


def test_images_show_inline_as_png() -> None:
    assert ImageChunk(PNG_1x1)._repr_png_() == PNG_1x1
    assert ImageChunk(b"not a png")._repr_png_() is None  # Jupyter then falls back to the repr


def test_result_html_holds_text_images_player_and_tensor_shapes() -> None:
    res = GenerateResult("rid", text="<b>hi</b>", images=[PNG_1x1], audio=SPEECH, tensors=[ACTIONS], seed=3)
    markup = res._repr_html_()
    assert "&lt;b&gt;hi&lt;/b&gt;" in markup and "<b>hi</b>" not in markup  # text is escaped
    assert base64.b64encode(PNG_1x1).decode() in markup
    assert "<audio controls" in markup
    assert "action float32[50, 32]" in markup
    assert "seed 3" in markup


def test_result_html_caps_how_many_images_and_how_much_text_it_embeds() -> None:
    res = GenerateResult("rid", text="y" * (_display.MAX_INLINE_TEXT + 5), images=[PNG_1x1] * (_display.MAX_INLINE_IMAGES + 2))
    markup = res._repr_html_()
    assert markup.count("<img ") == _display.MAX_INLINE_IMAGES
    assert "2 more images" in markup and "(5 more characters)" in markup


def test_reprs_are_short_in_a_fresh_interpreter() -> None:
    # Nothing else imported first: the reprs must not depend on IPython or on state set up by other tests.
    code = (
        "import numpy as np, mstar\n"
        "from mstar.types import GenerateResult, AudioBuffer, TensorChunk, AudioChunk\n"
        "a = AudioBuffer(np.zeros(43200, dtype='<i2').tobytes(), 24000)\n"
        "t = TensorChunk.from_numpy(np.zeros((50, 32), np.float32), 'action')\n"
        "r = GenerateResult('x' * 64, text='t' * 10**5, audio=a, tensors=[t])\n"
        "print(max(len(repr(o)) for o in (a, t, r, AudioChunk(a.pcm, 24000))))\n"
        "import sys; print('IPython' in sys.modules, 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout.split()
    assert int(out[0]) < 300 and out[1:] == ["False", "False"]
