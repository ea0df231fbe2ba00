"""Qwen3-Omni runner: Thinker (text), then Talker + code predictor + Code2Wav (speech), batched per step.

The runner orchestrates two stages, each owning its modules and KV cache:
:class:`~mstar.models.qwen3_omni.thinker.ThinkerStage` and (when the checkpoint
has audio output) :class:`~mstar.models.qwen3_omni.talker.TalkerStage`. Each
``step`` runs, in order and each once for all the requests that need it: the
Thinker prefill of newly admitted requests (encoders included), one Thinker
decode token for every decoding request, one Talker frame for every request
whose Talker has the text it needs, and Code2Wav on every request with a full
chunk of frames. Text-only requests never touch the Talker.

KV memory is paged (mstar/layers/kv_cache.py) in blocks of ``kv_block_size``
positions. The Thinker's pool holds ``kv_cache_tokens`` positions, and so does
the Talker's (the same positions at the Talker's own width: both stages hold
one slot of ``max_seq_len`` per speaking request, so their pools are sized
alike); unset, each pool holds every slot at full length and never runs out.
Admission is by blocks: a request starts only when the blocks its worst case
can take in each cache (prompt plus ``max_output_tokens`` in the Thinker; user
turns, the assistant part and ``talker_max_output_tokens`` frames in the
Talker) fit beside what the admitted requests have reserved, so a forward
never finds the pool full; a request that could not fit even in an empty pool
is refused by ``prepare``. The Thinker matches prompts against its prefix cache
(text before any media only, see thinker.py), so repeated system prompts and
chat history skip their prefill.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, ClassVar

import torch

from mstar.errors import InvalidParameterError, InvalidRequestError, UnknownVoiceError, WeightsError
from mstar.layers.kv_cache import KVCache
from mstar.layers.sampling import SamplingParams
from mstar.media import decode_audio, decode_audio_track, decode_image, decode_video
from mstar.models.base import ModelRunner
from mstar.models.params import Param
from mstar.models.qwen3_omni import prompt as prompting
from mstar.models.qwen3_omni.processor import AudioFeatures, ImagePrep, audio_features, image_patches, video_patches
from mstar.models.qwen3_omni.state import Encoded, OmniState, Pair, TalkerState
from mstar.models.qwen3_omni.talker import TalkerStage
from mstar.models.qwen3_omni.thinker import PrefillResult, ThinkerStage
from mstar.models.qwen3_omni.tokenizer import load_tokenizer
from mstar.models.qwen3_omni.weights import backbone_specs, load_model
from mstar.parallel import start_tensor_parallel
from mstar.registry import get_model_info
from mstar.request import Request, RequestInputs
from mstar.settings import RunnerSettings, Sizing
from mstar.stats import RunnerStats
from mstar.types import AudioChunk, TextChunk
from mstar.weights import TINY

__all__ = ["Qwen3OmniRunner"]

# Talker tokens needed for one frame of audio (its first code is framed by the next step).
_MIN_TALKER_TOKENS = 2

SAMPLE_RATE = 24000

#: The registry entry: the voice list users see and the default voice come from here.
INFO = get_model_info("qwen3_omni")


def _split_utf8(buf: bytes) -> tuple[str, bytes]:
    """Decode the longest complete UTF-8 prefix of ``buf``; keep an unfinished tail for later."""
    for cut in range(len(buf), max(len(buf) - 4, -1), -1):
        try:
            return buf[:cut].decode("utf-8"), buf[cut:]
        except UnicodeDecodeError:
            continue
    return buf.decode("utf-8", errors="replace"), b""


def _pool_blocks(size: Sizing) -> int | None:
    """Blocks of a stage's pool: ``kv_cache_tokens`` positions plus the null block; None (the
    cache's default: every slot at full length, never running out) when the setting is unset."""
    if size.kv_cache_tokens is None:
        return None
    return -(-size.kv_cache_tokens // size.kv_block_size) + 1


class Qwen3OmniRunner(ModelRunner[Encoded, OmniState]):
    """Serves ``Qwen/Qwen3-Omni-30B-A3B-Instruct`` (or its tiny random variant)."""

    name = "qwen3_omni"
    supports_tensor_parallel = True
    params: ClassVar[Mapping[str, Param]] = {
        "thinker_temperature": Param(float, 0.7, min=0.0, max=10.0, doc="Thinker (text) sampling temperature; 0 = greedy"),
        "thinker_top_p": Param(float, 0.9, min=0.0, max=1.0, doc="Thinker nucleus sampling; 1 = off"),
        "talker_temperature": Param(float, 0.9, min=0.0, max=10.0, doc="Talker (speech codes) sampling temperature; 0 = greedy"),
        "talker_top_k": Param(int, 50, min=0, max=100000, doc="Talker: sample among the k most likely codes; 0 = off"),
        "talker_top_p": Param(float, 1.0, min=0.0, max=1.0, doc="Talker nucleus sampling; 1 = off"),
        "talker_repetition_penalty": Param(
            float, 1.05, min=0.01, max=10.0, doc="Talker: penalty on codes already spoken; 1 = off"
        ),
        "talker_max_output_tokens": Param(
            int,
            None,
            min=1,
            max=1_000_000,
            doc="Talker codec frames at most (12.5 per second of speech); default 4096, 25 on the tiny variant",
        ),
        "code_predictor_temperature": Param(
            float, 1.0, min=0.0, max=10.0, doc="code predictor (each frame's residual codebooks) temperature; 0 = greedy"
        ),
        "code_predictor_top_k": Param(int, 50, min=0, max=100000, doc="code predictor top-k; 0 = off"),
        "code_predictor_top_p": Param(float, 0.8, min=0.0, max=1.0, doc="code predictor nucleus sampling; 1 = off"),
        "voice": Param(str, INFO.default_voice, doc=f"speaker: {', '.join(INFO.voices)}"),
        "max_output_tokens": Param(
            int,
            None,
            min=1,
            max=1_000_000,
            doc="Thinker text tokens at most; default the rest of the context, 32 on the tiny variant",
        ),
        "use_audio_in_video": Param(
            bool, False, doc="also hear each video's audio track, interleaved with its frames by time"
        ),
    }
    #: Stage caps filled in when the user leaves them unset. Random tiny weights never write an end
    #: token, so the tiny variant's caps are small enough for a default request to end in seconds.
    FULL_CAPS: ClassVar[Mapping[str, int | None]] = {"max_output_tokens": None, "talker_max_output_tokens": 4096}
    TINY_CAPS: ClassVar[Mapping[str, int | None]] = {"max_output_tokens": 32, "talker_max_output_tokens": 25}

    @classmethod
    def default_sizing(cls, weights: str | None, settings: RunnerSettings) -> Sizing:
        """Eight requests at once (KV slots in each of the Thinker's and the Talker's caches), 8192 positions each.

        The constructor lowers the length to the checkpoint's rotary range when that is shorter
        (the tiny variant's is 4096).
        """
        return Sizing(max_batch_size=8, max_seq_len=8192)

    def __init__(self, *, weights: str | None, settings: RunnerSettings) -> None:
        super().__init__(weights=weights, settings=settings)
        self.cfg, self.model, ckpt = load_model(
            weights or TINY, self.device, self.dtype, tensor_parallel_size=settings.tensor_parallel_size
        )
        #: Defaults of the per-stage caps for this variant (see ``FULL_CAPS``, ``TINY_CAPS``).
        self.caps: Mapping[str, int | None] = self.TINY_CAPS if (weights or TINY) == TINY else self.FULL_CAPS
        th = self.cfg["thinker_config"]
        limit = int(th["text_config"]["max_position_embeddings"])
        if self.sizing.max_seq_len > limit:
            if settings.max_seq_len is not None:
                raise InvalidParameterError(
                    f"max_seq_len is {settings.max_seq_len}, but this checkpoint has {limit} positions",
                    param="max_seq_len",
                )
            self.sizing = replace(self.sizing, max_seq_len=limit)
        self.tokenizer = load_tokenizer(ckpt)
        self.image_prep = ImagePrep.from_checkpoint(ckpt)
        slots, length = self.sizing.max_batch_size, self.sizing.max_seq_len
        block, pool = self.sizing.kv_block_size, _pool_blocks(self.sizing)
        # Tensor parallelism (mstar/parallel): the Thinker's and the Talker's decoder stacks run
        # sharded on every rank; everything around them stays here.
        self.parallel = start_tensor_parallel(settings, self.sizing, lambda: backbone_specs(self.cfg, ckpt))
        new_cache: Callable[..., KVCache] = KVCache
        if self.parallel is not None:
            self.parallel.attach(self.model.thinker.model.language_model, 0)
            if self.model.talker is not None:
                self.parallel.attach(self.model.talker.model, 1)
            new_cache = self.parallel.new_cache
        self.thinker = ThinkerStage(
            self.model.thinker,
            th,
            num_slots=slots,
            max_len=length,
            device=self.device,
            dtype=self.dtype,
            activity=self.activity,
            block_size=block,
            num_blocks=pool,
            new_cache=new_cache,
        )
        #: KV blocks the admitted requests may take at worst, per stage (reserved at admit, given back at release).
        self.reserved = {"thinker": 0, "talker": 0}
        # A checkpoint without audio output (the "Thinking" variant) has no Talker stage.
        self.talker: TalkerStage | None = None
        if self.model.talker is not None and self.model.code2wav is not None:
            self.talker = TalkerStage(
                self.model.talker,
                self.model.code2wav,
                self.thinker.embed_tokens,
                self.cfg,
                num_slots=slots,
                max_len=length,
                device=self.device,
                dtype=self.dtype,
                activity=self.activity,
                block_size=block,
                num_blocks=pool,
                new_cache=new_cache,
            )
            self._check_speakers(self.talker.speakers)
        self.stop_ids = {self.tokenizer.token_id("<|im_end|>"), self.tokenizer.token_id("<|endoftext|>")}

    @staticmethod
    def _check_speakers(table: Mapping[str, int]) -> None:
        """The registry lists the voices users see; refuse a checkpoint whose Talker knows others."""
        have, listed = {name.lower() for name in table}, {name.lower() for name in INFO.voices}
        if have != listed:
            raise WeightsError(
                f"the checkpoint's Talker has speakers {sorted(table)}, but the qwen3_omni registry entry "
                f"lists voices {list(INFO.voices)}"
            )

    # ------------------------------------------------------------------ caller's thread
    def validate(
        self, inputs: RequestInputs, output_modalities: tuple[str, ...], kwargs: Mapping[str, Any]
    ) -> dict[str, Any]:
        params = self._with_caps(super().validate(inputs, output_modalities, kwargs))
        voice = str(params["voice"])
        # Without a Talker there is no speaker table; audio output is refused below anyway.
        if self.talker is not None and voice.lower() not in self.talker.speakers:
            raise UnknownVoiceError(voice, INFO.voices)
        if "audio" in output_modalities and self.talker is None:
            raise InvalidRequestError(
                "this checkpoint has no Talker: audio output is unavailable", param="output_modalities"
            )
        if "audio" in output_modalities and params["talker_max_output_tokens"] < _MIN_TALKER_TOKENS:
            # The Talker's first code becomes a frame only with the next step: one token is never audio.
            raise InvalidParameterError(
                f"talker_max_output_tokens must be at least {_MIN_TALKER_TOKENS} for audio output (the least "
                f"that yields one codec frame); got {params['talker_max_output_tokens']}",
                param="talker_max_output_tokens",
            )
        return params

    def _with_caps(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """``params`` with every accepted key present: the variant's stage caps where unset, else the Param defaults."""
        out = {name: spec.default for name, spec in self.params.items()}
        out.update(params)
        for name, cap in self.caps.items():
            if out[name] is None:
                out[name] = cap
        return out

    def prepare(self, inputs: RequestInputs, output_modalities: tuple[str, ...], params: Mapping[str, Any]) -> Encoded:
        """Decode and preprocess the media, render the chat prompt and its 3-D positions.

        With ``use_audio_in_video`` each video's audio track (if it has one) is decoded too and
        its tokens are interleaved with the video's by time (see prompt.audio_video_layout).
        """
        params = self._with_caps(params)
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
        tracks: dict[int, AudioFeatures] = {}  # video index -> its audio track, heard with it
        for v, item in enumerate(inputs.video):
            frames, fps = decode_video(item)
            videos.append(video_patches(frames, fps, patch=patch, merge=merge, temporal=temporal, prep=prep))
            if params["use_audio_in_video"]:
                track = decode_audio_track(item, sample_rate=16000)
                if track is not None:
                    tracks[v] = audio_features(track[0], n_window=n_window)
        layouts = {
            v: prompting.audio_video_layout(
                videos[v], a.num_tokens, merge=merge, position_id_per_seconds=th["position_id_per_seconds"]
            )
            for v, a in tracks.items()
        }
        counts = {
            "audio": [a.num_tokens for a in audios],
            "image": [i.num_tokens for i in images],
            "video": [v.num_tokens for v in videos],
        }
        ids, order = prompting.render_prompt(messages, self.tokenizer, counts, layouts)
        # Keep media in prompt order: features are scattered into placeholder runs first to last
        # (a video's audio track sits inside the video's run, so it comes in the video's turn).
        by_kind: dict[str, list[Any]] = {"audio": [], "image": [], "video": []}
        source: dict[str, list[Any]] = {"audio": audios, "image": images, "video": videos}
        for kind, index in order:
            by_kind[kind].append(source[kind][index])
            if kind == "video" and index in tracks:
                by_kind["audio"].append(tracks[index])
        pos, delta = prompting.prompt_positions(th, ids, by_kind["image"], by_kind["video"])
        limit = self.sizing.max_seq_len
        if len(ids) + 1 > limit:
            raise InvalidRequestError(
                f"the prompt is {len(ids)} tokens; this engine holds at most {limit - 1}", param="text"
            )
        enc = Encoded(ids, pos, delta, by_kind["audio"], by_kind["image"], by_kind["video"])
        th_need, tk_need = self._kv_blocks(enc, params, "audio" in output_modalities)
        needs = [("Thinker", self.thinker.cache, th_need)]
        if self.talker is not None:
            needs.append(("Talker", self.talker.cache, tk_need))
        for stage, cache, need in needs:
            if need > cache.usable_blocks:
                raise InvalidRequestError(
                    f"this request may need {need} KV blocks of {cache.block_size} positions in the {stage}'s "
                    f"cache; its pool holds {cache.usable_blocks} (kv_cache_tokens={self.sizing.kv_pool_tokens})",
                    param="kv_cache_tokens",
                )
        return enc

    def _max_tokens(self, enc: Encoded, params: Mapping[str, Any]) -> int:
        """The Thinker tokens a request may write: ``max_output_tokens``, capped by the room after its prompt."""
        room = self.sizing.max_seq_len - len(enc.ids)
        return min(params["max_output_tokens"] or room, room)

    def _kv_blocks(self, enc: Encoded, params: Mapping[str, Any], audio: bool) -> tuple[int, int]:
        """Blocks a request may take at worst in the Thinker's and the Talker's caches (0: no Talker).

        The Thinker writes the prompt and one position per token after the first (the last
        sampled token is never fed); the Talker see :meth:`TalkerStage.worst_positions`.
        """
        bs = self.sizing.kv_block_size
        thinker = len(enc.ids) + self._max_tokens(enc, params) - 1
        talker = 0
        if audio and self.talker is not None:
            talker = self.talker.worst_positions(enc.ids, params["talker_max_output_tokens"], self.sizing.max_seq_len)
        return -(-thinker // bs), -(-talker // bs)

    # ------------------------------------------------------------------ life cycle
    def admit(self, req: Request) -> bool:
        """Start ``req`` when both stages have a slot and the blocks of its worst case beside what the
        admitted requests reserved (see the module docstring); attach its cached prompt prefix."""
        talker = self.talker if req.wants("audio") else None
        if self.thinker.cache.slots_free == 0 or (talker is not None and talker.slots_free == 0):
            return False
        p = req.params
        enc = self.prepared(req)
        th_need, tk_need = self._kv_blocks(enc, p, talker is not None)
        if self.reserved["thinker"] + th_need > self.thinker.cache.usable_blocks:
            return False
        if talker is not None and self.reserved["talker"] + tk_need > talker.cache.usable_blocks:
            return False
        slot = self.thinker.allocate()
        assert slot is not None
        st = OmniState(
            enc=enc,
            slot=slot,
            sampling=SamplingParams(temperature=p["thinker_temperature"], top_p=p["thinker_top_p"]),
            max_tokens=self._max_tokens(enc, p),
            emit_text=req.wants("text"),
            kv_blocks=th_need,
        )
        self.reserved["thinker"] += th_need
        self.thinker.attach_prefix(st)
        if talker is not None:
            st.talker = TalkerState(
                speaker_id=talker.speakers[str(p["voice"]).lower()],
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
                slot=talker.allocate(),
                kv_blocks=tk_need,
            )
            self.reserved["talker"] += tk_need
        req.state = st
        req.input_tokens = len(enc.ids)
        return True

    def release(self, req: Request) -> None:
        st = req.state
        if not isinstance(st, OmniState):  # never admitted, or already released
            return
        self.thinker.free(st.slot)
        self.reserved["thinker"] -= st.kv_blocks
        st.kv_blocks = 0
        if st.talker is not None and st.talker.slot is not None and self.talker is not None:
            self.talker.free(st.talker.slot)
            st.talker.slot = None
            self.reserved["talker"] -= st.talker.kv_blocks
            st.talker.kv_blocks = 0
        req.state = None

    def health(self) -> str | None:
        return None if self.parallel is None else self.parallel.health()

    def close(self) -> None:
        if self.parallel is not None:
            self.parallel.close()

    def stats(self) -> RunnerStats:
        """KV slots, blocks and prefix hits of the Thinker's and the Talker's caches together; bytes
        include the code predictor's scratch (which no request holds)."""
        caches = [self.thinker.cache]
        scratch = 0
        if self.talker is not None:
            caches.append(self.talker.cache)
            scratch = self.talker.cp_cache.nbytes
        stats = RunnerStats.of_caches(*caches, activity=self.activity)
        stats.kv_bytes += scratch
        return stats

    # ------------------------------------------------------------------ the step
    @torch.inference_mode()
    def step(self, reqs: list[Request]) -> None:
        pairs: list[Pair] = [(r, self.state(r)) for r in reqs]
        fresh = [(r, s) for r, s in pairs if not s.prefilled]
        decoding = [(r, s) for r, s in pairs if s.prefilled and not s.thinker_done]
        if fresh:
            self._prefill(fresh)
        if decoding:
            for (req, st), tok in zip(decoding, self.thinker.decode(decoding), strict=True):
                self._accept_token(req, st, tok)
        if self.talker is not None:
            talking = [(r, s) for r, s in pairs if s.talker is not None and not r.done]
            if talking:
                self.talker.advance(talking)
                for req, wav in self.talker.vocode(talking):
                    self._emit_audio(req, wav)
        for r, s in pairs:
            if r.done:
                continue
            tk = s.talker
            if tk is not None and tk.done and not s.emit_text and not s.thinker_done:
                # Speech only: once the Talker has ended, the rest of the hidden text has no reader.
                s.thinker_done, s.finish_reason = True, "stop"
            audio_done = tk is None or (tk.done and tk.decoded_frames == len(tk.frames))
            if s.thinker_done and audio_done:
                capped = s.finish_reason == "length" or (tk is not None and tk.finish_reason == "length")
                r.finish("length" if capped else "stop")

    def _prefill(self, pairs: list[Pair]) -> None:
        """Prefill together; if that fails, retry one by one so only the request at fault fails.

        Requests already decoding in this step are never failed by a new request's bad prefill.
        """
        results: list[PrefillResult | None]
        try:
            results = list(self._thinker_prefill(pairs))
        except Exception as exc:
            if len(pairs) == 1:
                pairs[0][0].fail(exc)
                return
            results = []
            for pair in pairs:
                try:
                    results.extend(self._thinker_prefill([pair]))
                except Exception as one_exc:  # noqa: BLE001 - attributed to this request alone
                    pair[0].fail(one_exc)
                    results.append(None)
        for (req, st), res in zip(pairs, results, strict=True):
            if res is None:
                continue
            try:
                st.prefilled = True
                if st.talker is not None and self.talker is not None:
                    assert res.accept_hidden is not None
                    self.talker.start(st, res.accept_hidden)
                self._accept_token(req, st, res.token)
            except Exception as exc:  # noqa: BLE001 - attributed to this request alone
                req.fail(exc)

    def _thinker_prefill(self, pairs: list[Pair]) -> list[PrefillResult]:
        """The Thinker's prefill of ``pairs``, capturing the layer the Talker reads when any of them speaks."""
        capture = None
        if self.talker is not None and any(s.talker is not None for _, s in pairs):
            capture = self.talker.accept_layer
        return self.thinker.prefill(pairs, capture=capture)

    def _accept_token(self, req: Request, st: OmniState, token: int) -> None:
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
            if len(st.generated) >= st.max_tokens or self.thinker.room(st.slot) <= 0:
                st.thinker_done, st.finish_reason = True, "length"
        if st.thinker_done and st.emit_text and st.pending_bytes:
            req.emit(TextChunk(st.pending_bytes.decode("utf-8", errors="replace")))
            st.pending_bytes = b""

    def _emit_audio(self, req: Request, wav: torch.Tensor) -> None:
        pcm = (wav.float().clamp(-1, 1) * 32767.0).round().to(torch.int16).cpu().numpy().tobytes()
        if pcm:
            req.emit(AudioChunk(pcm, SAMPLE_RATE))
