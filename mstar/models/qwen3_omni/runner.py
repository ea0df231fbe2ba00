"""Qwen3-Omni runner: Thinker (text), then Talker + code predictor + Code2Wav (speech), batched per step.

Each ``step`` runs, in order and each once for all the requests that need it:
the Thinker prefill of newly admitted requests (encoders included), one
Thinker decode token for every decoding request, one Talker frame for every
request whose Talker has the text it needs, and Code2Wav on every request with
a full chunk of frames. The Talker starts as soon as the Thinker's first token
exists and trails it one text token per frame, so speech streams out while the
Thinker is still writing. Text-only requests never touch the Talker.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from mstar.errors import InvalidRequestError, UnknownVoiceError
from mstar.layers.attention import AttnBatch
from mstar.layers.kv_cache import KVCache
from mstar.layers.sampling import SamplingParams, sample_tokens
from mstar.media import decode_audio, decode_image, decode_video
from mstar.models.base import ModelRunner
from mstar.models.params import Param
from mstar.models.qwen3_omni import prompt as prompting
from mstar.models.qwen3_omni import talker_steps, thinker_steps
from mstar.models.qwen3_omni.config import speakers
from mstar.models.qwen3_omni.processor import ImagePrep, audio_features, image_patches, video_patches
from mstar.models.qwen3_omni.state import Encoded, OmniState, TalkerState
from mstar.models.qwen3_omni.tokenizer import load_tokenizer
from mstar.models.qwen3_omni.weights import load_model
from mstar.request import Request, RequestInputs
from mstar.types import AudioChunk, TextChunk

__all__ = ["Qwen3OmniRunner"]

SAMPLE_RATE = 24000


def _head_dim(cfg: Mapping[str, Any]) -> int:
    return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


def _split_utf8(buf: bytes) -> tuple[str, bytes]:
    """Decode the longest complete UTF-8 prefix of ``buf``; keep an unfinished tail for later."""
    for cut in range(len(buf), max(len(buf) - 4, -1), -1):
        try:
            return buf[:cut].decode("utf-8"), buf[cut:]
        except UnicodeDecodeError:
            continue
    return buf.decode("utf-8", errors="replace"), b""


class Qwen3OmniRunner(ModelRunner):
    """Serves ``Qwen/Qwen3-Omni-30B-A3B-Instruct`` (or its tiny random variant)."""

    name = "qwen3_omni"
    params: ClassVar[Mapping[str, Param]] = {
        "thinker_temperature": Param(float, 0.7, min=0.0, max=10.0),
        "thinker_top_p": Param(float, 0.9, min=0.0, max=1.0),
        "talker_temperature": Param(float, 0.9, min=0.0, max=10.0),
        "talker_top_k": Param(int, 50, min=0, max=100000),
        "talker_top_p": Param(float, 1.0, min=0.0, max=1.0),
        "talker_repetition_penalty": Param(float, 1.05, min=0.01, max=10.0),
        "talker_max_output_tokens": Param(int, 4096, min=1, max=1_000_000),
        "code_predictor_temperature": Param(float, 1.0, min=0.0, max=10.0),
        "code_predictor_top_k": Param(int, 50, min=0, max=100000),
        "code_predictor_top_p": Param(float, 0.8, min=0.0, max=1.0),
        "voice": Param(str, "Ethan"),
        "max_output_tokens": Param(int, None, min=1, max=1_000_000),
    }

    #: Code2Wav decodes this many new frames per call (12.5 frames/s), with this many frames of left context.
    code2wav_chunk = 25
    code2wav_left_context = 25

    def __init__(
        self,
        *,
        weights: str | None,
        device: torch.device,
        dtype: torch.dtype,
        max_slots: int = 8,
        max_len: int | None = None,
    ) -> None:
        super().__init__(weights=weights, device=device, dtype=dtype)
        self.cfg, self.model, ckpt = load_model(weights or "tiny", device, dtype)
        self.tokenizer = load_tokenizer(ckpt)
        self.image_prep = ImagePrep.from_checkpoint(ckpt)
        self._lock = threading.Lock()
        th, tk = self.cfg["thinker_config"], self.cfg.get("talker_config", {})
        self.th_text = th["text_config"]
        self.tk_cfg = tk
        self.speakers = speakers(self.cfg) if tk else {}
        self.voices = [name.capitalize() for name in self.speakers]
        length = max_len or min(int(self.th_text["max_position_embeddings"]), 8192)
        self.cache = KVCache(
            num_layers=self.th_text["num_hidden_layers"],
            num_slots=max_slots,
            max_len=length,
            num_kv_heads=self.th_text["num_key_value_heads"],
            head_dim=_head_dim(self.th_text),
            device=device,
            dtype=dtype,
        )
        self.talker_cache: KVCache | None = None
        self.cp_cache: KVCache | None = None
        if self.model.talker is not None:
            tt, cp = tk["text_config"], tk["code_predictor_config"]
            self.talker_cache = KVCache(
                num_layers=tt["num_hidden_layers"],
                num_slots=max_slots,
                max_len=length,
                num_kv_heads=tt["num_key_value_heads"],
                head_dim=_head_dim(tt),
                device=device,
                dtype=dtype,
            )
            self.cp_cache = KVCache(
                num_layers=cp["num_hidden_layers"],
                num_slots=max_slots,
                max_len=cp["num_code_groups"] + 1,
                num_kv_heads=cp["num_key_value_heads"],
                head_dim=_head_dim(cp),
                device=device,
                dtype=dtype,
            )
        self.stop_ids = {self.tokenizer.token_id("<|im_end|>"), self.tokenizer.token_id("<|endoftext|>")}
        self.mm_ids = {th["audio_token_id"], th["image_token_id"], th["video_token_id"]}
        self._tts_embeds: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    # ------------------------------------------------------------------ validation (caller thread)
    def validate(
        self, inputs: RequestInputs, output_modalities: tuple[str, ...], kwargs: Mapping[str, Any]
    ) -> dict[str, Any]:
        params = super().validate(inputs, output_modalities, kwargs)
        voice = str(params["voice"])
        # A checkpoint without a Talker (the "Thinking" variant) has no voices to check.
        if self.speakers and voice.lower() not in self.speakers:
            raise UnknownVoiceError(voice, self.voices)
        if "audio" in output_modalities and self.model.talker is None:
            raise InvalidRequestError(
                "this checkpoint has no Talker: audio output is unavailable", param="output_modalities"
            )
        params["_enc"] = self._encode(inputs)
        return params

    def _encode(self, inputs: RequestInputs) -> Encoded:
        th = self.cfg["thinker_config"]
        vis = th["vision_config"]
        patch, merge, temporal = vis["patch_size"], vis["spatial_merge_size"], vis["temporal_patch_size"]
        n_window = th["audio_config"]["n_window"]
        messages = prompting.normalise_messages(inputs)
        audios = [audio_features(decode_audio(item, sample_rate=16000)[0], n_window=n_window) for item in inputs.audio]
        prep = self.image_prep
        images = [
            image_patches(decode_image(item), patch=patch, merge=merge, temporal=temporal, prep=prep)
            for item in inputs.images
        ]
        videos = []
        for item in inputs.video:
            frames, fps = decode_video(item)
            videos.append(video_patches(frames, fps, patch=patch, merge=merge, temporal=temporal, prep=prep))
        counts = {
            "audio": [a.num_tokens for a in audios],
            "image": [i.num_tokens for i in images],
            "video": [v.num_tokens for v in videos],
        }
        ids, order = prompting.render_prompt(messages, self.tokenizer, counts)
        # Keep media in prompt order: features are scattered into placeholder runs first to last.
        by_kind: dict[str, list[Any]] = {"audio": [], "image": [], "video": []}
        source: dict[str, list[Any]] = {"audio": audios, "image": images, "video": videos}
        for kind, index in order:
            by_kind[kind].append(source[kind][index])
        pos, delta = self.positions_for(ids, by_kind["image"], by_kind["video"])
        if len(ids) + 1 > self.cache.max_len:
            raise InvalidRequestError(
                f"the prompt is {len(ids)} tokens; this engine holds at most {self.cache.max_len - 1}", param="text"
            )
        return Encoded(ids, pos, delta, by_kind["audio"], by_kind["image"], by_kind["video"])

    def positions_for(self, ids: list[int], images: list[Any], videos: list[Any]) -> tuple[torch.Tensor, float]:
        th = self.cfg["thinker_config"]
        return prompting.mrope_positions(
            ids,
            image_token=th["image_token_id"],
            video_token=th["video_token_id"],
            image_grids=[i.grid_thw for i in images],
            video_grids=[v.grid_thw for v in videos],
            video_second_per_grid=[v.second_per_grid for v in videos],
            merge=th["vision_config"]["spatial_merge_size"],
            position_id_per_seconds=th["position_id_per_seconds"],
        )

    # ------------------------------------------------------------------ life cycle
    def admit(self, req: Request) -> bool:
        with self._lock:
            return self._admit(req)

    def _admit(self, req: Request) -> bool:
        wants_audio = req.wants("audio")
        if self.cache.slots_free == 0 or (
            wants_audio and self.talker_cache is not None and self.talker_cache.slots_free == 0
        ):
            return False
        p = req.params
        slot = self.cache.allocate()
        assert slot is not None
        enc: Encoded = p["_enc"]
        room = self.cache.max_len - len(enc.ids)
        max_tokens = min(p["max_output_tokens"] or room, room)
        st = OmniState(
            enc=enc,
            slot=slot,
            sampling=SamplingParams(temperature=p["thinker_temperature"], top_p=p["thinker_top_p"]),
            max_tokens=max_tokens,
            emit_text=req.wants("text"),
        )
        if wants_audio and self.talker_cache is not None:
            tslot = self.talker_cache.allocate()
            assert tslot is not None
            st.talker = TalkerState(
                speaker_id=self.speakers[str(p["voice"]).lower()],
                sampling=SamplingParams(
                    temperature=p["talker_temperature"],
                    top_k=p["talker_top_k"],
                    top_p=p["talker_top_p"],
                    repetition_penalty=p["talker_repetition_penalty"],
                ),
                cp_sampling=SamplingParams(
                    temperature=p["code_predictor_temperature"],
                    top_k=p["code_predictor_top_k"],
                    top_p=p["code_predictor_top_p"],
                ),
                max_tokens=p["talker_max_output_tokens"],
                slot=tslot,
            )
        req.state = st
        req.input_tokens = len(enc.ids)
        return True

    def release(self, req: Request) -> None:
        with self._lock:
            self._release(req)

    def _release(self, req: Request) -> None:
        st = req.state
        if not isinstance(st, OmniState):
            return
        self.cache.free(st.slot)
        if st.talker is not None and st.talker.slot is not None and self.talker_cache is not None:
            self.talker_cache.free(st.talker.slot)
            st.talker.slot = None
        req.state = None

    def stats(self) -> dict[str, Any]:
        out = {"slots_held": self.cache.slots_used, "kv_slots_total": self.cache.num_slots}
        if self.talker_cache is not None:
            out["talker_slots_held"] = self.talker_cache.slots_used
        return out

    # ------------------------------------------------------------------ the step
    @torch.inference_mode()
    def step(self, reqs: list[Request]) -> None:
        with self._lock:
            self._step(reqs)

    def _step(self, reqs: list[Request]) -> None:
        states = [(r, r.state) for r in reqs if isinstance(r.state, OmniState)]
        fresh = [(r, s) for r, s in states if not s.prefilled]
        decoding = [(r, s) for r, s in states if s.prefilled and not s.thinker_done]
        if fresh:
            self._prefill_isolated(fresh)
        if decoding:
            thinker_steps.decode(self, decoding)
        talking = [(r, s) for r, s in states if s.talker is not None and not r.done]
        if talking:
            talker_steps.advance(self, talking)
            talker_steps.vocode(self, talking)
        for r, s in states:
            if r.done:
                continue
            audio_done = s.talker is None or (s.talker.done and s.talker.decoded_frames == len(s.talker.frames))
            if s.thinker_done and audio_done:
                r.finish("length" if s.finish_reason == "length" else "stop")

    def _prefill_isolated(self, pairs: list[tuple[Request, OmniState]]) -> None:
        """Prefill together; if that fails, retry one by one so only the request at fault fails.

        Requests already decoding in this step are never failed by a new request's bad prefill.
        """
        try:
            thinker_steps.prefill(self, pairs)
            return
        except Exception as exc:
            if len(pairs) == 1:
                pairs[0][0].fail(exc)
                return
        for req, st in pairs:
            self.cache.lengths[st.slot] = 0
            st.prefilled, st.generated = False, []
            try:
                thinker_steps.prefill(self, [(req, st)])
            except Exception as exc:  # noqa: BLE001 - attributed to this request alone
                req.fail(exc)

    @torch.inference_mode()
    def prompt_logits(self, inputs: RequestInputs) -> torch.Tensor:
        """Thinker logits [L, V] at every prompt position (for checks against a reference; uses a spare slot)."""
        enc = self._encode(inputs)
        with self._lock:
            return self._prompt_logits(enc)

    def _prompt_logits(self, enc: Encoded) -> torch.Tensor:
        slot = self.cache.allocate()
        if slot is None:
            raise RuntimeError("no free KV slot")
        try:
            st = OmniState(enc=enc, slot=slot, sampling=SamplingParams(), max_tokens=1, emit_text=False)
            out, lens, _ = thinker_steps.forward_prompts(self, [st])
            return self.model.thinker.lm_head(out.hidden[0, : lens[0]])
        finally:
            self.cache.free(slot)

    # ------------------------------------------------------------------ helpers used by the step modules
    def emit_token(self, req: Request, st: OmniState, token: int) -> None:
        """Record one Thinker token; emit its text; mark the Thinker done on a stop token or the length cap."""
        st.generated.append(token)
        req.output_tokens += 1
        if token in self.stop_ids:
            st.thinker_done, st.finish_reason = True, "stop"
        else:
            if st.emit_text:
                text, st.pending_bytes = _split_utf8(st.pending_bytes + self.tokenizer.decode_bytes([token]))
                if text:
                    req.emit(TextChunk(text))
            if len(st.generated) >= st.max_tokens or self.cache.room(st.slot) <= 0:
                st.thinker_done, st.finish_reason = True, "length"
        if st.thinker_done and st.emit_text and st.pending_bytes:
            req.emit(TextChunk(st.pending_bytes.decode("utf-8", errors="replace")))
            st.pending_bytes = b""

    def emit_audio(self, req: Request, wav: torch.Tensor) -> None:
        pcm = (wav.float().clamp(-1, 1) * 32767.0).round().to(torch.int16).cpu().numpy().tobytes()
        if pcm:
            req.emit(AudioChunk(pcm, SAMPLE_RATE))

    def sample(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        reqs: list[Request],
        histories: list[torch.Tensor | None] | None = None,
    ) -> list[int]:
        return [int(t) for t in sample_tokens(logits, params, [r.generator for r in reqs], histories).tolist()]

    def tts_embeds(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Talker-width embeddings of <tts_text_bos>, <tts_text_eod>, <tts_pad> (computed once)."""
        if self._tts_embeds is None:
            assert self.model.talker is not None
            ids = torch.tensor(
                [self.cfg["tts_bos_token_id"], self.cfg["tts_eos_token_id"], self.cfg["tts_pad_token_id"]],
                device=self.device,
            )
            emb = self.model.talker.text_projection(self.model.thinker.model.language_model.embed_tokens(ids))
            self._tts_embeds = (emb[0], emb[1], emb[2])
        return self._tts_embeds

    def batch(self, cache: KVCache, slots: list[int], lens: list[int]) -> AttnBatch:
        return AttnBatch.build(cache, slots, lens, device=self.device)
