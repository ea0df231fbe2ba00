"""Qwen3-Omni (tiny, fp32) matches transformers' Qwen3OmniMoeForConditionalGeneration with the same weights."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
import torch

from mstar.request import RequestInputs

pytestmark = pytest.mark.slow


def _png(w: int, h: int, seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _wav(seconds: float, seed: int) -> bytes:
    import soundfile as sf

    rng = np.random.default_rng(seed)
    t = np.arange(int(16000 * seconds)) / 16000
    x = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(t.shape)
    buf = io.BytesIO()
    sf.write(buf, x.astype(np.float32), 16000, format="WAV")
    return buf.getvalue()


def _mp4(frames: int, size: int, fps: int) -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        rng = np.random.default_rng(3)
        for _ in range(frames):
            img = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


@pytest.fixture(scope="module")
def engine() -> Any:
    import mstar

    eng = mstar.Engine("qwen3_omni", weights="tiny", device="cpu")
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def reference(engine: Any) -> Any:
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeForConditionalGeneration

    from mstar.models.qwen3_omni.config import TINY_CONFIG, build_hf_config

    with torch.device("meta"):
        ref = Qwen3OmniMoeForConditionalGeneration(build_hf_config(TINY_CONFIG))
    state = {k: v.detach().clone() for k, v in engine.runner.model.state_dict().items()}
    ref.load_state_dict(state, strict=True, assign=True)
    # Non-persistent buffers were created on meta: take the values our (CPU-built) modules computed.
    ours = dict(engine.runner.model.named_buffers())
    for name, _ in list(ref.named_buffers()):
        owner, _, leaf = name.rpartition(".")
        mod = ref.get_submodule(owner)
        if name in ours:
            mod._buffers[leaf] = ours[name].clone()
    _fill_rotary(ref)
    return ref.eval()


def _fill_rotary(ref: Any) -> None:
    """Rotary tables of the reference's own text stacks (our modules name them differently)."""
    for mod in ref.modules():
        if hasattr(mod, "inv_freq") and hasattr(mod, "rope_type") and mod.inv_freq.device.type == "meta":
            inv, _ = mod.compute_default_rope_parameters(mod.config)
            mod.inv_freq = inv
            mod.original_inv_freq = inv.clone()


def _encode(runner: Any, inputs: RequestInputs, **params: Any) -> Any:
    """The runner's prepared prompt (ids, positions, preprocessed media) for ``inputs``."""
    return runner.prepare(inputs, ("text",), params)


@torch.inference_mode()
def _prompt_logits(runner: Any, inputs: RequestInputs, **params: Any) -> torch.Tensor:
    """Thinker logits [L, V] at every prompt position, run through the Thinker stage on a spare KV slot."""
    from mstar.layers.sampling import SamplingParams
    from mstar.models.qwen3_omni.state import OmniState

    enc = _encode(runner, inputs, **params)
    thinker = runner.thinker
    slot = thinker.allocate()
    assert slot is not None, "no free KV slot"
    try:
        st = OmniState(enc=enc, slot=slot, sampling=SamplingParams(), max_tokens=1, emit_text=False)
        out, lens = thinker.forward_prompts([st])
        return runner.model.thinker.lm_head(out.hidden[0, : lens[0]])
    finally:
        thinker.free(slot)


def _compare_prompt(engine: Any, reference: Any, inputs: RequestInputs, **extra: Any) -> None:
    runner = engine.runner
    ours = _prompt_logits(runner, inputs)
    enc = _encode(runner, inputs)
    ids = torch.tensor([enc.ids])
    with torch.inference_mode():
        ref = reference.thinker(input_ids=ids, attention_mask=torch.ones_like(ids), **extra).logits[0]
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-3)


def test_thinker_text_logits_match_transformers(engine: Any, reference: Any) -> None:
    _compare_prompt(
        engine,
        reference,
        RequestInputs(
            messages=[
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Hello, who are you?"},
            ]
        ),
    )


def test_thinker_image_logits_match_transformers(engine: Any, reference: Any) -> None:
    inputs = RequestInputs(text="What is this?", images=[_item("image", "a.png", _png(80, 48, 1))])
    enc = _encode(engine.runner, inputs)
    img = enc.images[0]
    _compare_prompt(engine, reference, inputs, pixel_values=img.pixels, image_grid_thw=torch.tensor([img.grid_thw]))


def test_thinker_audio_logits_match_transformers(engine: Any, reference: Any) -> None:
    inputs = RequestInputs(text="Transcribe.", audio=[_item("audio", "a.wav", _wav(2.3, 2))])
    mel = _encode(engine.runner, inputs).audios[0].mel
    _compare_prompt(
        engine,
        reference,
        inputs,
        input_features=mel[None],
        feature_attention_mask=torch.ones(1, mel.shape[1], dtype=torch.long),
    )


def test_thinker_video_logits_match_transformers(engine: Any, reference: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from mstar.models.qwen3_omni import processor

    # A small pixel budget keeps the tiny run fast; the layout (2 temporal groups, 2x2 merges) is what matters.
    monkeypatch.setattr(processor, "VIDEO_MIN_PIXELS", 64 * 64)
    inputs = RequestInputs(text="Describe.", video=[_item("video", "v.mp4", _mp4(4, 64, 2))])
    vid = _encode(engine.runner, inputs).videos[0]
    _compare_prompt(
        engine,
        reference,
        inputs,
        pixel_values_videos=vid.pixels,
        video_grid_thw=torch.tensor([vid.grid_thw]),
        video_second_per_grid=torch.tensor([vid.second_per_grid]),
    )


def _reference_placeholder(video: Any, audio_tokens: int, position_id_per_seconds: float) -> str:
    """The placeholder transformers' processor writes for a video heard with its audio track."""
    from types import SimpleNamespace

    from transformers.models.qwen3_omni_moe.processing_qwen3_omni_moe import Qwen3OmniMoeProcessor

    proc = SimpleNamespace(
        video_processor=SimpleNamespace(merge_size=2),
        audio_bos_token="<|audio_start|>",
        audio_eos_token="<|audio_end|>",
        video_token="<|video_pad|>",
        audio_token="<|audio_pad|>",
    )
    return str(
        Qwen3OmniMoeProcessor.replace_video_with_audio_token(
            proc,  # type: ignore[arg-type]
            {"video_grid_thw": [torch.tensor(video.grid_thw)], "video_second_per_grid": [video.second_per_grid]},
            0,
            {"num_audio_tokens": [audio_tokens]},
            0,
            position_id_per_seconds=position_id_per_seconds,
        )
    )


@pytest.mark.parametrize("seconds", [2.0, 6.0], ids=["track-as-long-as-the-frames", "track-outlasting-the-frames"])
def test_thinker_video_with_its_audio_track_matches_transformers(
    engine: Any, reference: Any, monkeypatch: pytest.MonkeyPatch, seconds: float
) -> None:
    from mstar.models.qwen3_omni import processor
    from tests.helpers.media import make_mp4_with_audio

    monkeypatch.setattr(processor, "VIDEO_MIN_PIXELS", 64 * 64)
    runner = engine.runner
    th = runner.cfg["thinker_config"]
    inputs = RequestInputs(text="Describe.", video=[_item("video", "v.mp4", make_mp4_with_audio(4, 64, 2, seconds=seconds))])
    enc = runner.prepare(inputs, ("text",), {"use_audio_in_video": True})
    (vid,), (track,) = enc.videos, enc.audios
    # Input ids: the reference processor's interleaving inside the chat template's video slot.
    placeholder = _reference_placeholder(vid, track.num_tokens, th["position_id_per_seconds"])
    prompt = f"<|im_start|>user\n<|vision_start|>{placeholder}<|vision_end|>Describe.<|im_end|>\n<|im_start|>assistant\n"
    assert enc.ids == runner.tokenizer.encode(prompt)
    audio_pad = th["audio_token_id"]
    assert 0 < enc.ids.count(audio_pad) == track.num_tokens
    ids = torch.tensor([enc.ids])
    mel = track.mel
    grid, spg = torch.tensor([vid.grid_thw]), torch.tensor([vid.second_per_grid])
    # 3-D positions and the decode offset: the reference's get_rope_index.
    ref_pos, ref_delta = reference.thinker.get_rope_index(
        ids, None, grid, torch.ones_like(ids), True, torch.tensor([mel.shape[1]]), spg
    )
    torch.testing.assert_close(enc.positions, ref_pos[:, 0].float(), rtol=0, atol=0)
    assert enc.delta == float(ref_delta[0, 0])
    # Logits at every prompt position.
    ours = _prompt_logits(runner, inputs, use_audio_in_video=True)
    with torch.inference_mode():
        ref = reference.thinker(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            input_features=mel[None],
            feature_attention_mask=torch.ones(1, mel.shape[1], dtype=torch.long),
            pixel_values_videos=vid.pixels,
            video_grid_thw=grid,
            video_second_per_grid=spg,
            use_audio_in_video=True,
        ).logits[0]
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-3)


def test_greedy_thinker_text_matches_transformers_generate(engine: Any, reference: Any) -> None:
    inputs = RequestInputs(text="Count to three.")
    res = engine.generate(text="Count to three.", thinker_temperature=0.0, max_output_tokens=6)
    ids = torch.tensor([_encode(engine.runner, inputs).ids])
    with torch.inference_mode():
        seq = reference.thinker.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False
        )
    expect = engine.runner.tokenizer.decode_bytes(seq[0, ids.shape[1] :].tolist()).decode("utf-8", errors="replace")
    assert res.text == expect


def test_greedy_talker_codes_and_audio_match_transformers_generate(engine: Any, reference: Any) -> None:
    runner = engine.runner
    seen: dict[str, list[torch.Tensor]] = {"ours": [], "ref": []}
    hook = runner.model.code2wav.register_forward_pre_hook(lambda _m, args: seen["ours"].append(args[0].clone()))
    old_chunk = runner.talker.code2wav_chunk
    runner.talker.code2wav_chunk = 300  # the reference decodes in 300-frame chunks; match it exactly
    try:
        res = engine.generate(
            text="Say hi.",
            output_modalities=("text", "audio"),
            thinker_temperature=0.0,
            talker_temperature=0.0,
            code_predictor_temperature=0.0,
            max_output_tokens=5,
            talker_max_output_tokens=20,
            voice="Ethan",
        )
    finally:
        runner.talker.code2wav_chunk = old_chunk
        hook.remove()
    ids = torch.tensor([_encode(runner, RequestInputs(text="Say hi.")).ids])
    orig = reference.code2wav.chunked_decode

    def spy(codes: torch.Tensor, **kw: Any) -> torch.Tensor:
        seen["ref"].append(codes.clone())
        return orig(codes, **kw)

    reference.code2wav.chunked_decode = spy
    try:
        with torch.inference_mode():
            _seq, wav = reference.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                speaker="Ethan",
                thinker_max_new_tokens=5,
                thinker_do_sample=False,
                talker_do_sample=False,
                talker_max_new_tokens=20,
            )
    finally:
        del reference.code2wav.chunked_decode
    assert len(seen["ours"]) == 1 and len(seen["ref"]) == 1
    torch.testing.assert_close(seen["ours"][0], seen["ref"][0], rtol=0, atol=0)
    assert res.audio is not None and res.audio.sample_rate == 24000
    ours_pcm = res.audio.to_numpy().astype(np.int32)
    ref_pcm = np.round(wav.reshape(-1).float().clamp(-1, 1).numpy() * 32767).astype(np.int32)
    assert ours_pcm.shape == ref_pcm.shape
    assert np.abs(ours_pcm - ref_pcm).max() <= 2


def test_greedy_thinker_with_an_image_matches_transformers_generate(engine: Any, reference: Any) -> None:
    image = _png(96, 64, 9)
    res = engine.generate(text="What is it?", images=("a.png", image), thinker_temperature=0.0, max_output_tokens=5)
    enc = _encode(engine.runner, RequestInputs(text="What is it?", images=[_item("image", "a.png", image)]))
    ids = torch.tensor([enc.ids])
    with torch.inference_mode():
        seq = reference.thinker.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=5,
            do_sample=False,
            pixel_values=enc.images[0].pixels,
            image_grid_thw=torch.tensor([enc.images[0].grid_thw]),
        )
    expect = engine.runner.tokenizer.decode_bytes(seq[0, ids.shape[1] :].tolist()).decode("utf-8", errors="replace")
    assert res.text == expect


@pytest.mark.parametrize("modality", ["audio", "image"])
def test_greedy_talker_codes_match_transformers_for_a_media_prompt(engine: Any, reference: Any, modality: str) -> None:
    runner = engine.runner
    media = {"audio": ("audio", "a.wav", _wav(1.2, 5)), "image": ("images", "a.png", _png(64, 64, 6))}[modality]
    seen: list[torch.Tensor] = []
    hook = runner.model.code2wav.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    old_chunk = runner.talker.code2wav_chunk
    runner.talker.code2wav_chunk = 300
    try:
        engine.generate(
            text="Answer aloud.",
            output_modalities=("audio",),
            thinker_temperature=0.0,
            talker_temperature=0.0,
            code_predictor_temperature=0.0,
            max_output_tokens=4,
            talker_max_output_tokens=12,
            **{media[0]: (media[1], media[2])},
        )
    finally:
        runner.talker.code2wav_chunk = old_chunk
        hook.remove()
    kind = "image" if modality == "image" else "audio"
    enc = _encode(runner, RequestInputs(text="Answer aloud.", **{media[0]: [_item(kind, media[1], media[2])]}))
    ids = torch.tensor([enc.ids])
    extra: dict[str, Any] = {}
    if modality == "audio":
        mel = enc.audios[0].mel
        extra = {"input_features": mel[None], "feature_attention_mask": torch.ones(1, mel.shape[1], dtype=torch.long)}
    else:
        extra = {"pixel_values": enc.images[0].pixels, "image_grid_thw": torch.tensor([enc.images[0].grid_thw])}
    ref_codes: list[torch.Tensor] = []
    orig = reference.code2wav.chunked_decode

    def spy(codes: torch.Tensor, **kw: Any) -> torch.Tensor:
        ref_codes.append(codes.clone())
        return orig(codes, **kw)

    reference.code2wav.chunked_decode = spy
    try:
        with torch.inference_mode():
            reference.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                speaker="Ethan",
                thinker_max_new_tokens=4,
                thinker_do_sample=False,
                talker_do_sample=False,
                talker_max_new_tokens=12,
                **extra,
            )
    finally:
        del reference.code2wav.chunked_decode
    assert len(seen) == 1 and len(ref_codes) == 1
    torch.testing.assert_close(seen[0], ref_codes[0], rtol=0, atol=0)


def _item(modality: str, name: str, data: bytes) -> Any:
    from mstar.media import MediaItem

    return MediaItem(name, data, modality)


def test_image_patches_match_transformers_image_processor() -> None:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from mstar.models.qwen3_omni.processor import IMAGE_MAX_PIXELS, IMAGE_MIN_PIXELS, image_patches

    img = np.random.default_rng(4).integers(0, 255, (90, 130, 3), dtype=np.uint8)
    hf = Qwen2VLImageProcessorPil(
        patch_size=16,
        merge_size=2,
        temporal_patch_size=2,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
        min_pixels=IMAGE_MIN_PIXELS,
        max_pixels=IMAGE_MAX_PIXELS,
    )(images=[img], return_tensors="pt")
    ours = image_patches(img)
    assert list(ours.grid_thw) == hf["image_grid_thw"][0].tolist()
    torch.testing.assert_close(ours.pixels, hf["pixel_values"].float(), atol=1e-6, rtol=0)
