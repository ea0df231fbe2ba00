"""The Thinker stage: audio and vision encoders plus the MoE text model, on the Thinker's paged KV cache.

It computes and samples; what a token means (text to emit, a stop, the
Talker's next input) is the runner's business. Every call is batched over the
requests given: one padded prefill forward for all new prompts (each encoder
run once over all their media), one decode forward for all decoding requests.

Prefix caching: on admission a prompt is matched against the cache's named
blocks (:meth:`ThinkerStage.attach_prefix`) and prefill then runs only the
tokens after the match; after prefill the prompt's full blocks are named for
later requests. Only the text before the first media placeholder is ever
matched or named (:func:`~mstar.models.qwen3_omni.prompt.text_prefix_len`
explains why that is sound), and never the last prompt token, whose logits
give the first output token. The Talker reads the Thinker's hidden states only
at media positions of the user turns, which always lie after the cached part,
so requests with speech output use the prefix cache too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mstar.layers.attention import AttnBatch
from mstar.layers.kv_cache import KVCache
from mstar.layers.sampling import SamplingParams, sample_tokens
from mstar.models.qwen3_omni.config import head_dim
from mstar.models.qwen3_omni.decoder import StackOutput
from mstar.models.qwen3_omni.model import Thinker
from mstar.models.qwen3_omni.prompt import text_prefix_len
from mstar.models.qwen3_omni.state import OmniState, Pair
from mstar.request import Request
from mstar.stats import Activity

__all__ = ["PrefillResult", "ThinkerStage"]


@dataclass(slots=True)
class PrefillResult:
    """One prompt's outcome: its first token, and (when asked) the hidden state the Talker reads."""

    token: int
    # [L - cached, H] output of layer ``capture`` at the prompt positions prefilled (from ``OmniState.cached`` on)
    accept_hidden: torch.Tensor | None


def _sample(logits: torch.Tensor, params: list[SamplingParams], reqs: list[Request]) -> list[int]:
    return [int(t) for t in sample_tokens(logits, params, [r.generator for r in reqs]).tolist()]


class ThinkerStage:
    """Owns the Thinker module (``model.thinker``) and its KV cache: one slot per running request.

    ``num_blocks`` sizes the paged pool (None: every slot at ``max_len``, which never runs out).
    """

    def __init__(
        self,
        net: Thinker,
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
        self.cfg = cfg  # thinker_config
        self.device, self.dtype = device, dtype
        self.activity = activity
        text = cfg["text_config"]
        self.cache = new_cache(
            num_layers=text["num_hidden_layers"],
            num_slots=num_slots,
            max_len=max_len,
            num_kv_heads=text["num_key_value_heads"],
            head_dim=head_dim(text),
            device=device,
            dtype=dtype,
            block_size=block_size,
            num_blocks=num_blocks,
        )
        #: Placeholder ids whose embeddings come from an encoder: the prefix cache stops before them.
        self.media_ids = frozenset((cfg["audio_token_id"], cfg["image_token_id"], cfg["video_token_id"]))

    @property
    def embed_tokens(self) -> nn.Embedding:
        """The Thinker's token embedding (the Talker projects it for its text input)."""
        return self.net.model.language_model.embed_tokens

    # ------------------------------------------------------------------ slots
    def allocate(self) -> int | None:
        return self.cache.allocate()

    def free(self, slot: int) -> None:
        self.cache.free(slot)

    def room(self, slot: int) -> int:
        return self.cache.room(slot)

    # ------------------------------------------------------------------ prefix cache
    def cacheable(self, ids: list[int]) -> int:
        """Leading tokens of the prompt ``ids`` the prefix cache may hold: those before any media."""
        return text_prefix_len(ids, self.media_ids)

    def attach_prefix(self, st: OmniState) -> None:
        """Start the empty slot of ``st`` with the cached blocks of its prompt's text prefix
        (never the last prompt token: its logits give the first output token); sets ``st.cached``."""
        ids = st.enc.ids
        st.cached = self.cache.match_prefix(st.slot, ids[: min(self.cacheable(ids), len(ids) - 1)])

    def register_prefix(self, st: OmniState) -> None:
        """Name the full blocks of the prompt's text prefix (written by prefill) for later requests."""
        ids = st.enc.ids
        self.cache.register_prefix(st.slot, ids[: self.cacheable(ids)])

    # ------------------------------------------------------------------ prefill
    def encode_media(self, states: list[OmniState]) -> list[dict[str, Any]]:
        """Run the audio tower once over every audio item and the vision tower once over every image and video.

        Returns per request ``{"audio_parts": [[N, H], ...], "image_parts": ..., "video_parts": ...,
        "image_ds_parts": [[levels x [N, H]], ...], "video_ds_parts": ...}`` (only the keys it has).
        """
        thinker = self.net.model
        dev, dtype = self.device, self.dtype
        out: list[dict[str, Any]] = [{} for _ in states]
        audios = [(i, a) for i, s in enumerate(states) for a in s.enc.audios]
        if audios:
            mel = torch.cat([a.mel for _, a in audios], dim=1).to(dev, dtype)
            lens = torch.tensor([a.mel.shape[1] for _, a in audios], device=dev)
            feats = thinker.audio_tower(mel, feature_lens=lens).last_hidden_state
            self.activity.record("audio_encoder", len(audios))
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
            self.activity.record("vision_encoder", len(visuals))
            sizes = [v.num_tokens for _, _, v in visuals]
            pooled = res.pooler_output.split(sizes)
            ds = [d.split(sizes) for d in res.deepstack_features]
            for k, (i, kind, _) in enumerate(visuals):
                out[i].setdefault(f"{kind}_parts", []).append(pooled[k])
                out[i].setdefault(f"{kind}_ds_parts", []).append([d[k] for d in ds])
        return out

    def _embed_one(
        self, st: OmniState, media: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor] | None]:
        """Prompt embeddings [L, H] with media scattered in; visual mask [L] and deepstack levels [L, H] (zero off-visual)."""
        ids = torch.tensor(st.enc.ids, device=self.device)
        x = self.embed_tokens(ids)
        vis_mask = None
        levels: list[torch.Tensor] | None = None
        for kind, token in (
            ("audio", self.cfg["audio_token_id"]),
            ("image", self.cfg["image_token_id"]),
            ("video", self.cfg["video_token_id"]),
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

    def forward_prompts(self, states: list[OmniState], *, capture: int | None = None) -> tuple[StackOutput, list[int]]:
        """Encode media and run every prompt through the Thinker in one padded forward (writes their KV slots).

        Each prompt starts after its cached prefix (``st.cached`` tokens, already in its slot).
        Returns the stack output and the lengths prefilled (prompt length less the cached prefix).
        """
        media = self.encode_media(states)
        embeds = []
        for s, m in zip(states, media, strict=True):
            emb, vmask, levels = self._embed_one(s, m)
            c = s.cached  # media lie after the cached prefix, so the slices below drop text only
            embeds.append(
                (emb[c:], None if vmask is None else vmask[c:], None if levels is None else [lv[c:] for lv in levels])
            )
        lens = [len(s.enc.ids) - s.cached for s in states]
        t = max(lens)
        b = len(states)
        hidden = embeds[0][0].shape[-1]
        dev = self.device
        x = torch.zeros(b, t, hidden, device=dev, dtype=self.dtype)
        pos = torch.zeros(3, b, t, device=dev)
        any_visual = any(e[1] is not None for e in embeds)
        ds_mask = torch.zeros(b, t, dtype=torch.bool, device=dev) if any_visual else None
        levels_full: list[torch.Tensor] | None = None
        for i, (emb, vmask, levels) in enumerate(embeds):
            n = lens[i]
            x[i, :n] = emb
            pos[:, i, :n] = states[i].enc.positions[:, states[i].cached :].to(dev)
            pos[:, i, n:] = states[i].enc.positions[:, -1:].to(dev)
            if vmask is not None and levels is not None and ds_mask is not None:
                ds_mask[i, :n] = vmask
                if levels_full is None:
                    levels_full = [torch.zeros(b, t, hidden, device=dev, dtype=self.dtype) for _ in levels]
                for full, lvl in zip(levels_full, levels, strict=True):
                    full[i, :n] = lvl
        deepstack = [lvl[ds_mask] for lvl in levels_full] if levels_full is not None and ds_mask is not None else None
        batch = AttnBatch.build(self.cache, [s.slot for s in states], lens, device=dev)
        out = self.net.forward_embeds(
            x, pos, self.cache, batch, capture=capture, deepstack=deepstack, deepstack_mask=ds_mask
        )
        batch.commit(self.cache)
        return out, lens

    def prefill(self, pairs: list[Pair], *, capture: int | None = None) -> list[PrefillResult]:
        """Run every new prompt in one padded forward and sample each request's first token.

        ``capture`` names the layer whose output the Talker needs (``accept_hidden_layer``).
        Request state is left alone, and on failure the slots go back to their cached prefix, so
        the caller may retry the prompts one by one to find the one at fault. On success the
        prompts' text prefixes are named in the prefix cache.
        """
        states = [s for _, s in pairs]
        try:
            out, lens = self.forward_prompts(states, capture=capture)
            self.activity.record("thinker_prefill", len(states))
            b = len(states)
            last = out.hidden[torch.arange(b, device=self.device), torch.tensor(lens, device=self.device) - 1]
            logits = self.net.lm_head(last)
            tokens = _sample(logits, [s.sampling for s in states], [r for r, _ in pairs])
        except Exception:
            for s in states:
                self.cache.lengths[s.slot] = s.cached
            raise
        for s in states:
            self.register_prefix(s)
        captured = out.captured
        return [
            PrefillResult(tok, captured[i, : lens[i]] if captured is not None else None) for i, tok in enumerate(tokens)
        ]

    # ------------------------------------------------------------------ decode
    def decode(self, pairs: list[Pair]) -> list[int]:
        """One token for every decoding request (fed its last token), in one forward over the shared cache."""
        states = [s for _, s in pairs]
        dev = self.device
        ids = torch.tensor([[s.generated[-1]] for s in states], device=dev)
        x = self.embed_tokens(ids)
        cache_pos = torch.tensor([self.cache.lengths[s.slot] + s.enc.delta for s in states], device=dev)
        pos = cache_pos.view(1, -1, 1).expand(3, -1, -1)
        batch = AttnBatch.build(self.cache, [s.slot for s in states], [1] * len(states), device=dev)
        out = self.net.forward_embeds(x, pos, self.cache, batch)
        batch.commit(self.cache)
        self.activity.record("thinker_decode", len(states))
        logits = self.net.lm_head(out.hidden[:, -1])
        return _sample(logits, [s.sampling for s in states], [r for r, _ in pairs])
