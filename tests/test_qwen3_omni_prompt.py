"""The offline tokenizer keeps Qwen3-Omni's special-token ids, and the chat template keeps roles and media order."""

from __future__ import annotations

from pathlib import Path

import torch

from mstar.media import MediaItem
from mstar.models.qwen3_omni.config import FULL_CONFIG
from mstar.models.qwen3_omni.prompt import mrope_positions, normalise_messages, render_prompt
from mstar.models.qwen3_omni.tokenizer import ByteTokenizer
from mstar.request import RequestInputs


def test_special_tokens_sit_at_the_published_ids() -> None:
    tok = ByteTokenizer()
    th = FULL_CONFIG["thinker_config"]
    assert tok.token_id("<|im_start|>") == FULL_CONFIG["im_start_token_id"] == 151644
    assert tok.token_id("<|im_end|>") == FULL_CONFIG["im_end_token_id"] == 151645
    assert tok.token_id("<|audio_start|>") == th["audio_start_token_id"] == 151669
    assert tok.token_id("<|audio_pad|>") == th["audio_token_id"] == 151675
    assert tok.token_id("<|image_pad|>") == th["image_token_id"] == 151655
    assert tok.token_id("<|video_pad|>") == th["video_token_id"] == 151656
    assert tok.token_id("<|vision_start|>") == th["vision_start_token_id"] == 151652
    assert tok.token_id("<tts_pad>") == FULL_CONFIG["tts_pad_token_id"] == 151671
    assert tok.token_id("<tts_text_bos>") == FULL_CONFIG["tts_bos_token_id"] == 151672
    assert tok.token_id("<tts_text_eod>") == FULL_CONFIG["tts_eos_token_id"] == 151673
    assert tok.encode("user") == [FULL_CONFIG["user_token_id"]]
    assert tok.encode("assistant") == [FULL_CONFIG["assistant_token_id"]]


def test_text_round_trips_through_the_byte_tokenizer() -> None:
    tok = ByteTokenizer()
    text = "héllo wörld ✓"
    assert tok.decode_bytes(tok.encode(text)).decode() == text


def test_chat_template_keeps_roles_and_places_media_runs_in_order() -> None:
    tok = ByteTokenizer()
    inputs = RequestInputs(
        messages=[
            {"role": "system", "content": "S"},
            {"role": "user", "content": [{"type": "text", "text": "A"}, {"type": "audio"}, {"type": "image"}]},
        ],
        images=[MediaItem("a.png", b"", "image")],
        audio=[MediaItem("a.wav", b"", "audio")],
    )
    ids, order = render_prompt(normalise_messages(inputs), tok, {"audio": [3], "image": [2], "video": []})
    expect = (
        [151644, 8948, 198, ord("S"), 151645, 198]
        + [151644, 872, 198, ord("A"), 151669, 151675, 151675, 151675, 151670, 151652, 151655, 151655, 151653]
        + [151645, 198, 151644, 77091, 198]
    )
    assert ids == expect
    assert order == [("audio", 0), ("image", 0)]


def test_image_tokens_get_time_row_column_positions() -> None:
    ids = [1, 2, 9, 9, 9, 9, 3]  # text, text, a 1x(2x2) image run, text
    pos, delta = mrope_positions(
        ids,
        image_token=9,
        video_token=8,
        image_grids=[(1, 4, 4)],
        video_grids=[],
        video_second_per_grid=[],
        merge=2,
        position_id_per_seconds=13,
    )
    assert pos[:, :2].tolist() == [[0, 1], [0, 1], [0, 1]]
    assert pos[:, 2:6].tolist() == [[2, 2, 2, 2], [2, 2, 3, 3], [2, 3, 2, 3]]
    assert pos[:, 6].tolist() == [4, 4, 4]
    assert delta == 5 - len(ids)
    assert torch.equal(
        mrope_positions(
            [1, 2],
            image_token=9,
            video_token=8,
            image_grids=[],
            video_grids=[],
            video_second_per_grid=[],
            merge=2,
            position_id_per_seconds=13,
        )[0],
        torch.tensor([[0.0, 1.0]] * 3),
    )


def test_checkpoint_tokenizer_json_is_used_with_its_special_ids(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from mstar.models.qwen3_omni.tokenizer import SPECIAL_TOKENS, HFTokenizer, load_tokenizer

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update(SPECIAL_TOKENS)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, HFTokenizer)
    ids = loaded.encode("<|im_start|>héllo ✓<|im_end|>")
    assert ids[0] == 151644 and ids[-1] == 151645
    assert loaded.token_id("<|audio_pad|>") == 151675
    assert loaded.decode_bytes(ids).decode() == "héllo ✓"
