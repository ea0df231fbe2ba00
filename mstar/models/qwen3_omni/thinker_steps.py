"""The Thinker's batched steps: prefill (with the audio and vision encoders) and one-token decode."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from mstar.models.qwen3_omni.decoder import StackOutput
from mstar.models.qwen3_omni.state import OmniState
from mstar.models.qwen3_omni.talker_steps import prepare_user_part
from mstar.request import Request

if TYPE_CHECKING:
    from mstar.models.qwen3_omni.runner import Qwen3OmniRunner

__all__ = ["decode", "encode_media", "prefill"]

Pair = tuple[Request, OmniState]


def encode_media(runner: Qwen3OmniRunner, states: list[OmniState]) -> list[dict[str, Any]]:
    """Run the audio tower once over every audio item and the vision tower once over every image and video.

    Returns per request ``{"audio": [N, H], "image": [N, H], "video": [N, H],
    "image_ds": [levels x [N, H]], "video_ds": ...}`` (only the keys it has).
    """
    thinker = runner.model.thinker.model
    dev, dtype = runner.device, runner.dtype
    out: list[dict[str, Any]] = [{} for _ in states]
    audios = [(i, a) for i, s in enumerate(states) for a in s.enc.audios]
    if audios:
        mel = torch.cat([a.mel for _, a in audios], dim=1).to(dev, dtype)
        lens = torch.tensor([a.mel.shape[1] for _, a in audios], device=dev)
        feats = thinker.audio_tower(mel, feature_lens=lens).last_hidden_state
        for (i, _), part in zip(audios, feats.split([a.num_tokens for _, a in audios]), strict=True):
            out[i].setdefault("audio_parts", []).append(part)
    visuals = [
        (i, kind, v)
        for i, s in enumerate(states)
        for kind, items in (("image", s.enc.images), ("video", s.enc.videos))
        for v in items
    ]
    if visuals:
        pixels = torch.cat([v.pixels for _, _, v in visuals]).to(dev, dtype)
        grid = torch.tensor([v.grid_thw for _, _, v in visuals], device=dev)
        res = thinker.visual(pixels, grid_thw=grid)
        sizes = [v.num_tokens for _, _, v in visuals]
        pooled = res.pooler_output.split(sizes)
        ds = [d.split(sizes) for d in res.deepstack_features]
        for k, (i, kind, _) in enumerate(visuals):
            out[i].setdefault(f"{kind}_parts", []).append(pooled[k])
            out[i].setdefault(f"{kind}_ds_parts", []).append([d[k] for d in ds])
    return out


def _embed_one(
    runner: Qwen3OmniRunner, st: OmniState, media: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor] | None]:
    """Prompt embeddings [L, H] with media scattered in; visual mask [L] and deepstack levels [L, H] (zero off-visual)."""
    th = runner.cfg["thinker_config"]
    ids = torch.tensor(st.enc.ids, device=runner.device)
    x = runner.model.thinker.model.language_model.embed_tokens(ids)
    vis_mask = None
    levels: list[torch.Tensor] | None = None
    for kind, token in (
        ("audio", th["audio_token_id"]),
        ("image", th["image_token_id"]),
        ("video", th["video_token_id"]),
    ):
        parts = media.get(f"{kind}_parts")
        if not parts:
            continue
        mask = ids == token
        x = x.clone()
        x[mask] = torch.cat(parts).to(x.dtype)
        if kind == "audio":
            continue
        ds_parts: list[list[torch.Tensor]] = media[f"{kind}_ds_parts"]
        if levels is None:
            levels = [torch.zeros_like(x) for _ in ds_parts[0]]
            vis_mask = torch.zeros_like(mask)
        assert vis_mask is not None
        vis_mask = vis_mask | mask
        for lvl, level in enumerate(levels):
            level[mask] = torch.cat([p[lvl] for p in ds_parts]).to(x.dtype)
    return x, vis_mask, levels


def forward_prompts(
    runner: Qwen3OmniRunner, states: list[OmniState], *, capture: int | None = None
) -> tuple[StackOutput, list[int], list[torch.Tensor]]:
    """Encode media and run every prompt through the Thinker in one padded forward (writes their KV slots).

    Returns the stack output, the prompt lengths and each prompt's embeddings.
    """
    media = encode_media(runner, states)
    embeds = [_embed_one(runner, s, m) for s, m in zip(states, media, strict=True)]
    lens = [len(s.enc.ids) for s in states]
    t = max(lens)
    b = len(states)
    hidden = embeds[0][0].shape[-1]
    x = torch.zeros(b, t, hidden, device=runner.device, dtype=runner.dtype)
    pos = torch.zeros(3, b, t, device=runner.device)
    any_visual = any(e[1] is not None for e in embeds)
    ds_mask = torch.zeros(b, t, dtype=torch.bool, device=runner.device) if any_visual else None
    levels_full: list[torch.Tensor] | None = None
    for i, (emb, vmask, levels) in enumerate(embeds):
        n = lens[i]
        x[i, :n] = emb
        pos[:, i, :n] = states[i].enc.positions.to(runner.device)
        pos[:, i, n:] = states[i].enc.positions[:, -1:].to(runner.device)
        if vmask is not None and levels is not None and ds_mask is not None:
            ds_mask[i, :n] = vmask
            if levels_full is None:
                levels_full = [torch.zeros(b, t, hidden, device=runner.device, dtype=runner.dtype) for _ in levels]
            for full, lvl in zip(levels_full, levels, strict=True):
                full[i, :n] = lvl
    deepstack = [lvl[ds_mask] for lvl in levels_full] if levels_full is not None and ds_mask is not None else None
    batch = runner.batch(runner.cache, [s.slot for s in states], lens)
    out = runner.model.thinker.forward_embeds(
        x, pos, runner.cache, batch, capture=capture, deepstack=deepstack, deepstack_mask=ds_mask
    )
    batch.commit(runner.cache)
    return out, lens, [e[0] for e in embeds]


def prefill(runner: Qwen3OmniRunner, pairs: list[Pair]) -> None:
    """Run every new prompt in one padded forward and sample each request's first token."""
    states = [s for _, s in pairs]
    wants_audio = any(s.talker is not None for s in states)
    capture = runner.tk_cfg.get("accept_hidden_layer") if wants_audio else None
    out, lens, embeds = forward_prompts(runner, states, capture=capture)
    b = len(states)
    last = out.hidden[torch.arange(b, device=runner.device), torch.tensor(lens, device=runner.device) - 1]
    logits = runner.model.thinker.lm_head(last)
    reqs = [r for r, _ in pairs]
    tokens = runner.sample(logits, [s.sampling for s in states], reqs)
    for i, ((req, st), tok) in enumerate(zip(pairs, tokens, strict=True)):
        st.prefilled = True
        if st.talker is not None and out.captured is not None:
            prepare_user_part(runner, st, embeds[i], out.captured[i, : lens[i]])
        runner.emit_token(req, st, tok)


def decode(runner: Qwen3OmniRunner, pairs: list[Pair]) -> None:
    """One token for every decoding request, in one forward over the shared cache."""
    states = [s for _, s in pairs]
    ids = torch.tensor([[s.generated[-1]] for s in states], device=runner.device)
    x = runner.model.thinker.model.language_model.embed_tokens(ids)
    cache_pos = torch.tensor([runner.cache.lengths[s.slot] + s.enc.delta for s in states], device=runner.device)
    pos = cache_pos.view(1, -1, 1).expand(3, -1, -1)
    batch = runner.batch(runner.cache, [s.slot for s in states], [1] * len(states))
    out = runner.model.thinker.forward_embeds(x, pos, runner.cache, batch)
    batch.commit(runner.cache)
    logits = runner.model.thinker.lm_head(out.hidden[:, -1])
    tokens = runner.sample(logits, [s.sampling for s in states], [r for r, _ in pairs])
    for (req, st), tok in zip(pairs, tokens, strict=True):
        runner.emit_token(req, st, tok)
