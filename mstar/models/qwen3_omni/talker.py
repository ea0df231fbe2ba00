"""The Talker stage: the MoE Talker, its code predictor and Code2Wav, turning the Thinker's text into 24 kHz speech.

Talker input at prefill is the user turns (text embeddings projected to the
Talker's width; audio/image/video positions use the Thinker's hidden state at
``accept_hidden_layer``), then nine assistant positions that combine
``<|im_start|>assistant\\n``, the tts pad/bos markers and the codec control
tokens (no-think, speaker, pad, bos) with the Thinker's first token. Each later
step feeds the sum of the previous frame's codebook embeddings plus the next
Thinker token (then ``<tts_text_eod>``, then ``<tts_pad>``). So the Talker
starts as soon as the Thinker's first token exists and trails it by one text
token per frame, and speech streams out while the Thinker is still writing.

Every call is batched over the requests given: one Talker prefill for the
starting ones, one Talker decode (code predictor included) for the running
ones, and one Code2Wav call per window length.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from mstar.layers.attention import AttnBatch
from mstar.layers.kv_cache import KVCache
from mstar.layers.sampling import SamplingParams, sample_tokens
from mstar.models.qwen3_omni.config import head_dim, speakers
from mstar.models.qwen3_omni.model import Talker
from mstar.models.qwen3_omni.prompt import prompt_positions
from mstar.models.qwen3_omni.state import OmniState, Pair, TalkerState
from mstar.request import Request
from mstar.stats import Activity

__all__ = ["TalkerStage"]

#: Assistant positions of the Talker's prompt (see the module docstring).
ASSISTANT_LEN = 9


def _sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    reqs: list[Request],
    histories: list[torch.Tensor | None] | None = None,
) -> list[int]:
    return [int(t) for t in sample_tokens(logits, params, [r.generator for r in reqs], histories).tolist()]


def _visual_runs(ids: list[int], img_tok: int, vid_tok: int, audio_tok: int) -> list[tuple[str, int, int]]:
    """(kind, start, index among that kind) of every image/video placeholder run in ``ids``.

    A video heard with its audio track has audio tokens mixed into its run: they do not end it.
    """
    runs: list[tuple[str, int, int]] = []
    counts = {"image": 0, "video": 0}
    prev = None
    for i, tok in enumerate(ids):
        kind = "image" if tok == img_tok else "video" if tok == vid_tok else None
        if kind is not None and tok != prev:
            runs.append((kind, i, counts[kind]))
            counts[kind] += 1
        if not (tok == audio_tok and prev == vid_tok):
            prev = tok
    return runs


def _ready(st: OmniState) -> bool:
    """Whether the Talker has the Thinker text its next step consumes."""
    tk = st.talker
    if tk is None or tk.done or not st.generated:
        return False
    if not tk.started or st.thinker_done:
        return True
    return len(st.generated) >= tk.step + 2


class TalkerStage:
    """Owns the Talker (``model.talker``, code predictor included), its KV caches and Code2Wav streaming.

    ``num_blocks`` sizes the Talker's paged pool (None: every slot at ``max_len``); the code
    predictor's scratch cache always has room for every row.
    """

    #: Code2Wav decodes this many new frames per call (12.5 frames/s), with this many frames of left context.
    code2wav_chunk = 25
    code2wav_left_context = 25

    def __init__(
        self,
        net: Talker,
        code2wav: nn.Module,
        text_embed: nn.Embedding,
        cfg: dict[str, Any],
        *,
        num_slots: int,
        max_len: int,
        device: torch.device,
        dtype: torch.dtype,
        activity: Activity,
        block_size: int = 16,
        num_blocks: int | None = None,
        new_cache: Callable[..., KVCache] = KVCache,
    ) -> None:
        self.net = net
        self.code2wav = code2wav
        #: The Thinker's token embedding: the Talker reads text through it and its own projection.
        self.text_embed = text_embed
        self.cfg = cfg  # the whole model config: token ids live at the top level and in thinker_config
        self.tk_cfg: dict[str, Any] = cfg["talker_config"]
        self.th_cfg: dict[str, Any] = cfg["thinker_config"]
        self.device, self.dtype = device, dtype
        self.activity = activity
        #: Voice name (lower case) -> codec speaker token id.
        self.speakers = speakers(cfg)
        #: The Thinker layer whose output stands in for media positions of the Talker's prompt.
        self.accept_layer: int = self.tk_cfg["accept_hidden_layer"]
        self.mm_ids = {self.th_cfg["audio_token_id"], self.th_cfg["image_token_id"], self.th_cfg["video_token_id"]}
        tt, cp = self.tk_cfg["text_config"], self.tk_cfg["code_predictor_config"]
        self.cache = new_cache(
            num_layers=tt["num_hidden_layers"],
            num_slots=num_slots,
            max_len=max_len,
            num_kv_heads=tt["num_key_value_heads"],
            head_dim=head_dim(tt),
            device=device,
            dtype=dtype,
            block_size=block_size,
            num_blocks=num_blocks,
        )
        # Scratch for one frame's code predictor pass: row i of a step uses slot i, rewritten every frame,
        # so no request holds a slot here.
        self.cp_cache = KVCache(
            num_layers=cp["num_hidden_layers"],
            num_slots=num_slots,
            max_len=cp["num_code_groups"] + 1,
            num_kv_heads=cp["num_key_value_heads"],
            head_dim=head_dim(cp),
            device=device,
            dtype=dtype,
            block_size=block_size,  # its pool stays the default (every row at full length): it never runs out
        )
        self._tts: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    # ------------------------------------------------------------------ slots
    def allocate(self) -> int | None:
        return self.cache.allocate()

    def free(self, slot: int) -> None:
        self.cache.free(slot)

    @property
    def slots_free(self) -> int:
        return self.cache.slots_free

    # ------------------------------------------------------------------ text side
    def _project(self, ids: list[int]) -> torch.Tensor:
        """Talker-width text embeddings [n, H] of Thinker token ids."""
        return self.net.text_projection(self.text_embed(torch.tensor(ids, device=self.device)))

    def _tts_embeds(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Talker-width embeddings of <tts_text_bos>, <tts_text_eod>, <tts_pad> (computed once)."""
        if self._tts is None:
            emb = self._project(
                [self.cfg["tts_bos_token_id"], self.cfg["tts_eos_token_id"], self.cfg["tts_pad_token_id"]]
            )
            self._tts = (emb[0], emb[1], emb[2])
        return self._tts

    def user_positions(self, ids: list[int]) -> list[int]:
        """Prompt positions inside user turns (from their ``<|im_start|>`` on): the Talker's prompt."""
        im_start, user = self.cfg["im_start_token_id"], self.cfg["user_token_id"]
        role = None
        keep: list[int] = []
        for i, tok in enumerate(ids):
            if tok == im_start:
                role = ids[i + 1] if i + 1 < len(ids) else None
            if role == user:
                keep.append(i)
        return keep

    def worst_positions(self, ids: list[int], max_tokens: int, max_len: int) -> int:
        """KV positions a request may fill in the Talker's cache: its prompt (user turns and the
        assistant part), then one per codec frame after the first, ``max_tokens`` frames at most."""
        return min(max_len, len(self.user_positions(ids)) + ASSISTANT_LEN + max_tokens - 1)

    def start(self, st: OmniState, accept_hidden: torch.Tensor) -> None:
        """Project the user turns of the prompt to the Talker's width and compute the Talker's positions.

        ``accept_hidden`` [L - st.cached, H] is the Thinker's prefill output at ``accept_layer`` for
        the prompt positions it prefilled. Only media positions read it, and those always lie after
        the Thinker's cached prefix (see thinker.py).
        """
        tk = st.talker
        assert tk is not None
        ids = st.enc.ids
        keep = self.user_positions(ids)
        idx = torch.tensor(keep, device=self.device, dtype=torch.long)
        tok_t = torch.tensor(ids, device=self.device)[idx]
        mm = torch.zeros_like(tok_t, dtype=torch.bool)
        for m in self.mm_ids:
            mm |= tok_t == m
        part = self.net.text_projection(self.text_embed(tok_t))
        if bool(mm.any()):
            at = idx[mm] - st.cached
            if bool((at < 0).any()):
                raise RuntimeError("a media position of the prompt lies inside the Thinker's cached prefix")
            part = part.clone()
            part[mm] = self.net.hidden_projection(accept_hidden[at])
        tk.user_embeds = part
        # Visual runs inside the user turns keep their grids (in order) for the Talker's 3-D positions.
        th = self.th_cfg
        runs = _visual_runs(ids, th["image_token_id"], th["video_token_id"], th["audio_token_id"])
        keep_set = set(keep)
        images = [st.enc.images[k] for kind, start, k in runs if kind == "image" and start in keep_set]
        videos = [st.enc.videos[k] for kind, start, k in runs if kind == "video" and start in keep_set]
        talker_ids = [ids[i] for i in keep] + [self.cfg["tts_pad_token_id"]] * ASSISTANT_LEN
        tk.positions, tk.delta = prompt_positions(self.th_cfg, talker_ids, images, videos)

    def _trailing(self, st: OmniState, step: int) -> torch.Tensor:
        """The text-side input of decode step ``step``: Thinker token ``step + 1``, then the end marker, then pads.

        The Thinker's last token (its stop token, or the token that hit the length
        cap) is never spoken, as in the reference implementation.
        """
        _bos, eos, pad = self._tts_embeds()
        n = len(st.generated)
        if st.thinker_done:
            if step <= n - 3:
                return self._project([st.generated[step + 1]])[0]
            return eos if step == n - 2 else pad
        return self._project([st.generated[step + 1]])[0]

    def _assistant_part(self, st: OmniState) -> torch.Tensor:
        tk = st.talker
        assert tk is not None
        bos, _eos, pad = self._tts_embeds()
        head_emb = self._project(st.enc.ids[-3:])  # <|im_start|> assistant \n
        text = torch.cat([head_emb, pad.expand(4, -1), bos[None], self._project([st.generated[0]])])
        cfg = self.tk_cfg
        codec_ids = [
            cfg["codec_nothink_id"],
            cfg["codec_think_bos_id"],
            cfg["codec_think_eos_id"],
            tk.speaker_id,
            cfg["codec_pad_id"],
            cfg["codec_bos_id"],
        ]
        codec = self.net.model.codec_embedding(torch.tensor(codec_ids, device=self.device))
        codec = torch.cat([torch.zeros(3, codec.shape[-1], device=self.device, dtype=codec.dtype), codec])
        return text + codec

    # ------------------------------------------------------------------ codec frames
    def _suppress(self, logits: torch.Tensor) -> torch.Tensor:
        """Forbid the codec vocabulary's top 1024 control ids, except end-of-speech."""
        vocab = logits.shape[-1]
        eos = self.tk_cfg["codec_eos_token_id"]
        logits = logits.clone()
        keep = logits[:, eos].clone()
        logits[:, max(0, vocab - 1024) :] = float("-inf")
        logits[:, eos] = keep
        return logits

    def _sample_codes(self, pairs: list[Pair], hidden: torch.Tensor) -> None:
        """Sample each row's next first-codebook token from the Talker's final hidden state [B, H]."""
        logits = self._suppress(self.net.codec_head(hidden).float())
        tks: list[TalkerState] = []
        for _, s in pairs:
            assert s.talker is not None
            tks.append(s.talker)
        hist: list[torch.Tensor | None] = [torch.tensor(t.history, device=self.device, dtype=torch.long) for t in tks]
        codes = _sample(logits, [t.sampling for t in tks], [r for r, _ in pairs], hist)
        eos = self.tk_cfg["codec_eos_token_id"]
        for i, (tk, code) in enumerate(zip(tks, codes, strict=True)):
            assert tk.slot is not None
            tk.history.append(code)
            tk.last_code, tk.last_hidden = code, hidden[i]
            if code == eos:
                tk.done, tk.finish_reason = True, "stop"
            elif len(tk.history) >= tk.max_tokens or self.cache.room(tk.slot) <= 0:
                tk.done, tk.finish_reason = True, "length"

    def _slots(self, pairs: list[Pair]) -> list[int]:
        return [s.talker.slot for _, s in pairs if s.talker is not None and s.talker.slot is not None]

    def _prefill(self, pairs: list[Pair]) -> None:
        seqs = []
        for _, st in pairs:
            tk = st.talker
            assert tk is not None and tk.user_embeds is not None
            seqs.append(torch.cat([tk.user_embeds, self._assistant_part(st)]))
        lens = [s.shape[0] for s in seqs]
        t, b = max(lens), len(seqs)
        dev = self.device
        x = torch.zeros(b, t, seqs[0].shape[-1], device=dev, dtype=self.dtype)
        pos = torch.zeros(3, b, t, device=dev)
        for i, ((_, st), seq) in enumerate(zip(pairs, seqs, strict=True)):
            tk = st.talker
            assert tk is not None and tk.positions is not None
            x[i, : lens[i]] = seq
            pos[:, i, : lens[i]] = tk.positions.to(dev)
        batch = AttnBatch.build(self.cache, self._slots(pairs), lens, device=dev)
        hidden = self.net.forward_embeds(x, pos, self.cache, batch)
        batch.commit(self.cache)
        self.activity.record("talker_prefill", b)
        last = hidden[torch.arange(b, device=dev), torch.tensor(lens, device=dev) - 1]
        for _, st in pairs:
            assert st.talker is not None
            st.talker.started = True
        self._sample_codes(pairs, last)

    def _residual_codes(self, pairs: list[Pair]) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the code predictor for every row: codebooks 1..G-1 [B, G-1] and the frame's embedding sum [B, H]."""
        cp = self.net.code_predictor
        cache = self.cp_cache
        b = len(pairs)
        tks: list[TalkerState] = []
        hiddens: list[torch.Tensor] = []
        for _, s in pairs:
            assert s.talker is not None and s.talker.last_hidden is not None
            tks.append(s.talker)
            hiddens.append(s.talker.last_hidden)
        reqs = [r for r, _ in pairs]
        params = [t.cp_sampling for t in tks]
        first = torch.tensor([t.last_code for t in tks], device=self.device)
        first_emb = self.net.model.codec_embedding(first)
        past = torch.stack(hiddens).to(self.dtype)
        slots = list(range(b))
        for slot in slots:
            cache.lengths[slot] = 0
        x = torch.stack([past, first_emb], dim=1)  # [B, 2, H]
        total = first_emb
        codes = []
        for g in range(len(cp.lm_head)):
            batch = AttnBatch.build(cache, slots, [x.shape[1]] * b, device=self.device)
            h = cp.forward_embeds(x, cache, batch)
            batch.commit(cache)
            logits = cp.lm_head[g](h[:, -1]).float()
            code = torch.tensor(_sample(logits, params, reqs), device=self.device)
            codes.append(code)
            emb = cp.model.codec_embedding[g](code)
            total = total + emb
            x = emb[:, None]
        self.activity.record("code_predictor", b)
        return torch.stack(codes, dim=1), total

    def _decode(self, pairs: list[Pair]) -> None:
        residual, summed = self._residual_codes(pairs)
        rows = []
        pos_vals = []
        for i, (_, st) in enumerate(pairs):
            tk = st.talker
            assert tk is not None and tk.slot is not None and tk.last_code is not None
            tk.frames.append([tk.last_code, *residual[i].tolist()])
            rows.append(summed[i] + self._trailing(st, tk.step).to(summed.dtype))
            pos_vals.append(self.cache.lengths[tk.slot] + tk.delta)
            tk.step += 1
        x = torch.stack(rows)[:, None]
        pos = torch.tensor(pos_vals, device=self.device).view(1, -1, 1).expand(3, -1, -1)
        batch = AttnBatch.build(self.cache, self._slots(pairs), [1] * len(pairs), device=self.device)
        hidden = self.net.forward_embeds(x, pos, self.cache, batch)
        batch.commit(self.cache)
        self.activity.record("talker_decode", len(pairs))
        self._sample_codes(pairs, hidden[:, -1])

    def advance(self, pairs: list[Pair]) -> None:
        """Start the Talker of requests whose Thinker has its first token; one frame for every ready Talker."""
        starting = [(r, s) for r, s in pairs if s.talker is not None and not s.talker.started and _ready(s)]
        running = [(r, s) for r, s in pairs if s.talker is not None and s.talker.started and _ready(s)]
        if starting:
            self._prefill(starting)
        if running:
            self._decode(running)

    # ------------------------------------------------------------------ audio
    def vocode(self, pairs: list[Pair]) -> list[tuple[Request, torch.Tensor]]:
        """Decode every full chunk of frames (and the last partial one) to 24 kHz audio; batch equal-length chunks.

        Returns the new waveforms [samples] in the order to emit them: frame order per request.
        """
        chunk, ctx_max = self.code2wav_chunk, self.code2wav_left_context
        jobs: dict[int, list[tuple[Request, TalkerState, int, int, int]]] = {}
        for req, st in pairs:
            tk = st.talker
            if tk is None:
                continue
            start = tk.decoded_frames
            while len(tk.frames) - start >= chunk or (tk.done and len(tk.frames) > start):
                end = min(start + chunk, len(tk.frames))
                ctx = ctx_max if start - ctx_max > 0 else start
                jobs.setdefault(end - start + ctx, []).append((req, tk, start, end, ctx))
                start = end
        factor: Any = self.code2wav.total_upsample
        upsample = int(factor)
        ordered: list[tuple[Request, TalkerState, int, torch.Tensor]] = []
        for items in jobs.values():
            codes = torch.stack(
                [torch.tensor(tk.frames[s - c : e], device=self.device).T for _, tk, s, e, c in items]
            )  # [n, G, length]
            wav = self.code2wav(codes)  # [n, 1, samples]
            self.activity.record("code2wav", len(items))
            for (req, tk, s, _e, c), w in zip(items, wav, strict=True):
                ordered.append((req, tk, s, w[0, c * upsample :]))
        out: list[tuple[Request, torch.Tensor]] = []
        # Emit in frame order per request, whatever the batching grouped together.
        for req, tk, s, w in sorted(ordered, key=lambda item: (id(item[0]), item[2])):
            out.append((req, w))
            tk.decoded_frames = max(tk.decoded_frames, s + min(chunk, len(tk.frames) - s))
        return out
