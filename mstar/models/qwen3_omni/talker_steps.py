"""The Talker's batched steps: prefill, one codec frame per step (code predictor included), and Code2Wav.

Talker input at prefill is the user turns (text embeddings projected to the
Talker's width; audio/image/video positions use the Thinker's hidden state at
``accept_hidden_layer``), then nine assistant positions that combine
``<|im_start|>assistant\\n``, the tts pad/bos markers and the codec control
tokens (no-think, speaker, pad, bos) with the Thinker's first token. Each later
step feeds the sum of the previous frame's codebook embeddings plus the next
Thinker token (then ``<tts_text_eod>``, then ``<tts_pad>``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from mstar.models.qwen3_omni.state import OmniState, TalkerState
from mstar.request import Request

if TYPE_CHECKING:
    from mstar.models.qwen3_omni.runner import Qwen3OmniRunner

__all__ = ["advance", "prepare_user_part", "vocode"]

Pair = tuple[Request, OmniState]
ASSISTANT_LEN = 9


def prepare_user_part(
    runner: Qwen3OmniRunner, st: OmniState, prompt_embeds: torch.Tensor, accept_hidden: torch.Tensor
) -> None:
    """Project the user turns of the prompt to the Talker's width and compute the Talker's positions."""
    talker = runner.model.talker
    tk = st.talker
    assert talker is not None and tk is not None
    ids = st.enc.ids
    im_start, user = runner.cfg["im_start_token_id"], runner.cfg["user_token_id"]
    role = None
    keep: list[int] = []
    for i, tok in enumerate(ids):
        if tok == im_start:
            role = ids[i + 1] if i + 1 < len(ids) else None
        if role == user:
            keep.append(i)
    idx = torch.tensor(keep, device=runner.device, dtype=torch.long)
    tok_t = torch.tensor(ids, device=runner.device)[idx]
    mm = torch.zeros_like(tok_t, dtype=torch.bool)
    for m in runner.mm_ids:
        mm |= tok_t == m
    embeds = runner.model.thinker.model.language_model.embed_tokens(tok_t)
    part = talker.text_projection(embeds)
    if bool(mm.any()):
        part = part.clone()
        part[mm] = talker.hidden_projection(accept_hidden[idx][mm])
    tk.user_embeds = part
    tk.user_ids = [ids[i] for i in keep]
    # Visual runs inside the user turns keep their grids (in order) for the Talker's 3-D positions.
    th = runner.cfg["thinker_config"]
    img_tok, vid_tok = th["image_token_id"], th["video_token_id"]
    runs = _visual_runs(ids, img_tok, vid_tok)
    keep_set = set(keep)
    images = [st.enc.images[k] for kind, start, k in runs if kind == "image" and start in keep_set]
    videos = [st.enc.videos[k] for kind, start, k in runs if kind == "video" and start in keep_set]
    talker_ids = tk.user_ids + [runner.cfg["tts_pad_token_id"]] * ASSISTANT_LEN
    tk.positions, tk.delta = runner.positions_for(talker_ids, images, videos)


def _visual_runs(ids: list[int], img_tok: int, vid_tok: int) -> list[tuple[str, int, int]]:
    runs: list[tuple[str, int, int]] = []
    counts = {"image": 0, "video": 0}
    prev = None
    for i, tok in enumerate(ids):
        kind = "image" if tok == img_tok else "video" if tok == vid_tok else None
        if kind is not None and tok != prev:
            runs.append((kind, i, counts[kind]))
            counts[kind] += 1
        prev = tok
    return runs


def _text_embed(runner: Qwen3OmniRunner, token: int) -> torch.Tensor:
    talker = runner.model.talker
    assert talker is not None
    emb = runner.model.thinker.model.language_model.embed_tokens(torch.tensor([token], device=runner.device))
    return talker.text_projection(emb)[0]


def _ready(st: OmniState) -> bool:
    """Whether the Talker has the Thinker text its next step consumes."""
    tk = st.talker
    if tk is None or tk.done or not st.generated:
        return False
    if not tk.started or st.thinker_done:
        return True
    return len(st.generated) >= tk.step + 2


def _trailing(runner: Qwen3OmniRunner, st: OmniState, step: int) -> torch.Tensor:
    """The text-side input of decode step ``step``: Thinker token ``step + 1``, then the end marker, then pads.

    The Thinker's last token (its stop token, or the token that hit the length
    cap) is never spoken, as in the reference implementation.
    """
    bos, eos, pad = runner.tts_embeds()
    n = len(st.generated)
    if st.thinker_done:
        if step <= n - 3:
            return _text_embed(runner, st.generated[step + 1])
        return eos if step == n - 2 else pad
    return _text_embed(runner, st.generated[step + 1])


def _assistant_part(runner: Qwen3OmniRunner, st: OmniState) -> torch.Tensor:
    talker = runner.model.talker
    tk = st.talker
    assert talker is not None and tk is not None
    bos, _eos, pad = runner.tts_embeds()
    head = st.enc.ids[-3:]  # <|im_start|> assistant \n
    head_emb = talker.text_projection(
        runner.model.thinker.model.language_model.embed_tokens(torch.tensor(head, device=runner.device))
    )
    text = torch.cat([head_emb, pad.expand(4, -1), bos[None], _text_embed(runner, st.generated[0])[None]])
    cfg = runner.tk_cfg
    codec_ids = [
        cfg["codec_nothink_id"],
        cfg["codec_think_bos_id"],
        cfg["codec_think_eos_id"],
        tk.speaker_id,
        cfg["codec_pad_id"],
        cfg["codec_bos_id"],
    ]
    codec = talker.model.codec_embedding(torch.tensor(codec_ids, device=runner.device))
    codec = torch.cat([torch.zeros(3, codec.shape[-1], device=runner.device, dtype=codec.dtype), codec])
    return text + codec


def _suppress(runner: Qwen3OmniRunner, logits: torch.Tensor) -> torch.Tensor:
    """Forbid the codec vocabulary's top 1024 control ids, except end-of-speech."""
    vocab = logits.shape[-1]
    eos = runner.tk_cfg["codec_eos_token_id"]
    logits = logits.clone()
    keep = logits[:, eos].clone()
    logits[:, max(0, vocab - 1024) :] = float("-inf")
    logits[:, eos] = keep
    return logits


def _sample_codes(runner: Qwen3OmniRunner, pairs: list[Pair], hidden: torch.Tensor) -> None:
    """Sample each row's next first-codebook token from the Talker's final hidden state [B, H]."""
    talker = runner.model.talker
    assert talker is not None
    logits = _suppress(runner, talker.codec_head(hidden).float())
    tks = [s.talker for _, s in pairs]
    hist = [torch.tensor(t.history, device=runner.device, dtype=torch.long) if t is not None else None for t in tks]
    codes = runner.sample(logits, [t.sampling for t in tks if t is not None], [r for r, _ in pairs], hist)
    eos = runner.tk_cfg["codec_eos_token_id"]
    assert runner.talker_cache is not None
    for i, ((_, st), code) in enumerate(zip(pairs, codes, strict=True)):
        tk = st.talker
        assert tk is not None and tk.slot is not None
        tk.history.append(code)
        tk.last_code, tk.last_hidden = code, hidden[i]
        if code == eos or len(tk.history) >= tk.max_tokens or runner.talker_cache.room(tk.slot) <= 0:
            tk.done = True


def _prefill(runner: Qwen3OmniRunner, pairs: list[Pair]) -> None:
    talker = runner.model.talker
    cache = runner.talker_cache
    assert talker is not None and cache is not None
    seqs = []
    for _, st in pairs:
        tk = st.talker
        assert tk is not None and tk.user_embeds is not None
        seqs.append(torch.cat([tk.user_embeds, _assistant_part(runner, st)]))
    lens = [s.shape[0] for s in seqs]
    t, b = max(lens), len(seqs)
    x = torch.zeros(b, t, seqs[0].shape[-1], device=runner.device, dtype=runner.dtype)
    pos = torch.zeros(3, b, t, device=runner.device)
    for i, ((_, st), seq) in enumerate(zip(pairs, seqs, strict=True)):
        tk = st.talker
        assert tk is not None and tk.positions is not None
        x[i, : lens[i]] = seq
        pos[:, i, : lens[i]] = tk.positions.to(runner.device)
    slots = [s.talker.slot for _, s in pairs if s.talker is not None and s.talker.slot is not None]
    batch = runner.batch(cache, slots, lens)
    hidden = talker.forward_embeds(x, pos, cache, batch)
    batch.commit(cache)
    last = hidden[torch.arange(b, device=runner.device), torch.tensor(lens, device=runner.device) - 1]
    for _, st in pairs:
        assert st.talker is not None
        st.talker.started = True
    _sample_codes(runner, pairs, last)


def _residual_codes(runner: Qwen3OmniRunner, pairs: list[Pair]) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the code predictor for every row: codebooks 1..G-1 [B, G-1] and the frame's embedding sum [B, H]."""
    talker = runner.model.talker
    cache = runner.cp_cache
    assert talker is not None and cache is not None
    cp = talker.code_predictor
    b = len(pairs)
    tks: list[TalkerState] = []
    hiddens: list[torch.Tensor] = []
    for _, s in pairs:
        assert s.talker is not None and s.talker.last_hidden is not None
        tks.append(s.talker)
        hiddens.append(s.talker.last_hidden)
    reqs = [r for r, _ in pairs]
    params = [t.cp_sampling for t in tks]
    first = torch.tensor([t.last_code for t in tks], device=runner.device)
    first_emb = talker.model.codec_embedding(first)
    past = torch.stack(hiddens).to(runner.dtype)
    slots = list(range(b))
    for slot in slots:
        cache.lengths[slot] = 0
    x = torch.stack([past, first_emb], dim=1)  # [B, 2, H]
    total = first_emb
    codes = []
    groups = len(cp.lm_head)
    for g in range(groups):
        batch = runner.batch(cache, slots, [x.shape[1]] * b)
        h = cp.forward_embeds(x, cache, batch)
        batch.commit(cache)
        logits = cp.lm_head[g](h[:, -1]).float()
        code = torch.tensor(runner.sample(logits, params, reqs), device=runner.device)
        codes.append(code)
        emb = cp.model.codec_embedding[g](code)
        total = total + emb
        x = emb[:, None]
    return torch.stack(codes, dim=1), total


def _decode(runner: Qwen3OmniRunner, pairs: list[Pair]) -> None:
    talker = runner.model.talker
    cache = runner.talker_cache
    assert talker is not None and cache is not None
    residual, summed = _residual_codes(runner, pairs)
    rows = []
    pos_vals = []
    for i, (_, st) in enumerate(pairs):
        tk = st.talker
        assert tk is not None and tk.slot is not None and tk.last_code is not None
        tk.frames.append([tk.last_code, *residual[i].tolist()])
        rows.append(summed[i] + _trailing(runner, st, tk.step).to(summed.dtype))
        pos_vals.append(cache.lengths[tk.slot] + tk.delta)
        tk.step += 1
    x = torch.stack(rows)[:, None]
    pos = torch.tensor(pos_vals, device=runner.device).view(1, -1, 1).expand(3, -1, -1)
    slots = [s.talker.slot for _, s in pairs if s.talker is not None and s.talker.slot is not None]
    batch = runner.batch(cache, slots, [1] * len(pairs))
    hidden = talker.forward_embeds(x, pos, cache, batch)
    batch.commit(cache)
    _sample_codes(runner, pairs, hidden[:, -1])


def advance(runner: Qwen3OmniRunner, pairs: list[Pair]) -> None:
    """Start the Talker of requests whose Thinker has its first token; one frame for every ready Talker."""
    starting = [(r, s) for r, s in pairs if s.talker is not None and not s.talker.started and _ready(s)]
    running = [(r, s) for r, s in pairs if s.talker is not None and s.talker.started and _ready(s)]
    if starting:
        _prefill(runner, starting)
    if running:
        _decode(runner, running)


def vocode(runner: Qwen3OmniRunner, pairs: list[Pair]) -> None:
    """Decode every full chunk of frames (and the last partial one) to 24 kHz audio; batch equal-length chunks."""
    code2wav = runner.model.code2wav
    assert code2wav is not None
    chunk, ctx_max = runner.code2wav_chunk, runner.code2wav_left_context
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
    factor: Any = code2wav.total_upsample
    upsample = int(factor)
    ordered: list[tuple[Request, TalkerState, int, torch.Tensor]] = []
    for length, items in jobs.items():
        codes = torch.stack(
            [torch.tensor(tk.frames[s - c : e], device=runner.device).T for _, tk, s, e, c in items]
        )  # [n, G, length]
        wav = code2wav(codes)  # [n, 1, samples]
        del length
        for (req, tk, s, _e, c), w in zip(items, wav, strict=True):
            ordered.append((req, tk, s, w[0, c * upsample :]))
    # Emit in frame order per request, whatever the batching grouped together.
    for req, tk, _s, w in sorted(ordered, key=lambda item: (id(item[0]), item[2])):
        runner.emit_audio(req, w)
        tk.decoded_frames = max(tk.decoded_frames, _s + min(runner.code2wav_chunk, len(tk.frames) - _s))
