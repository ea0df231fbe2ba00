"""Audio-token unpacking, prompt layout and tiny tokenizer of Orpheus."""

from __future__ import annotations

import torch

from mstar.models.orpheus.codes import CodeStream, split_window
from mstar.models.orpheus.config import STOP_TOKEN
from mstar.models.orpheus.prompt import build_prompt
from mstar.models.orpheus.tokenizer import ByteTokenizer, custom_token_id


def _token(position: int, code: int) -> int:
    return custom_token_id(10 + position * 4096 + code)


def test_audio_code_ids_follow_the_custom_token_layout() -> None:
    assert _token(0, 0) == 128266 and _token(6, 4095) == 128266 + 7 * 4096 - 1


def test_invalid_tokens_are_skipped_without_advancing_the_frame_position() -> None:
    s = CodeStream()
    assert s.push(_token(0, 5))
    assert not s.push(_token(0, 6))  # a position-0 code where position 1 is due
    assert not s.push(42)  # a text token
    assert not s.push(STOP_TOKEN)
    assert s.push(_token(1, 0))  # code 0 is valid
    assert s.codes == [5, 0]


def test_windows_become_ready_every_frame_from_the_fourth_and_split_into_three_streams() -> None:
    s = CodeStream()
    ready = []
    for i in range(42):
        assert s.push(_token(i % 7, i))
        ready.append(s.window_ready())
    assert [i + 1 for i, r in enumerate(ready) if r] == [28, 35, 42]
    coarse, middle, fine = split_window(torch.tensor([s.window()]))
    w = list(range(14, 42))
    assert coarse.tolist() == [[w[0], w[7], w[14], w[21]]]
    assert middle.tolist() == [[w[f * 7 + j] for f in range(4) for j in (1, 4)]]
    assert fine.tolist() == [[w[f * 7 + j] for f in range(4) for j in (2, 3, 5, 6)]]


def test_prompt_wraps_voice_and_text_with_the_orpheus_markers() -> None:
    ids = build_prompt(ByteTokenizer(), "tara", "Hi")
    assert ids == [128259, 128000, *b"tara: Hi", 128009, 128260, 128261, 128257]
