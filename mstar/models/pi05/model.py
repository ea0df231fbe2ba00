"""The Pi0.5 network: PaliGemma (SigLIP + Gemma-2B) reads the observation, a Gemma-300M expert denoises actions.

The module tree mirrors lerobot's ``PI05Pytorch`` so that the published
checkpoint's names map one to one (``paligemma_with_expert.paligemma.model.
language_model.layers.0.self_attn.q_proj.weight`` ...).

Inference runs in two phases on a shared slot-based KV cache:

* :meth:`Pi05Model.prefill` encodes the prefix (camera images, then the
  prompt tokens) with the VLM, bidirectionally, once per request, and leaves
  its keys/values in the request's cache slot.
* :meth:`Pi05Model.velocity` runs the action expert over the 50 noisy action
  tokens of a batch of requests; in each layer they attend to their own
  slot's cached prefix plus each other (the suffix K/V are written after the
  prefix but never committed, so every Euler step overwrites them).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mstar.layers.attention import AttnBatch
from mstar.layers.gemma import GemmaStack
from mstar.layers.kv_cache import KVCache
from mstar.layers.rotary import rope_inv_freq
from mstar.layers.siglip import SiglipVisionTransformer
from mstar.models.pi05.config import Pi05Config
from mstar.models.pi05.flow import time_embedding

__all__ = ["Pi05Model"]


class _VisionTower(nn.Module):
    def __init__(self, cfg: Pi05Config) -> None:
        super().__init__()
        self.vision_model = SiglipVisionTransformer(cfg.vision)


class _Projector(nn.Module):
    def __init__(self, cfg: Pi05Config) -> None:
        super().__init__()
        self.linear = nn.Linear(cfg.vision.width, cfg.vlm.width)


class _PaliGemmaModel(nn.Module):
    def __init__(self, cfg: Pi05Config) -> None:
        super().__init__()
        self.vision_tower = _VisionTower(cfg)
        self.multi_modal_projector = _Projector(cfg)
        self.language_model = GemmaStack(cfg.vlm, vocab_size=cfg.vocab_size)


class _PaliGemma(nn.Module):
    def __init__(self, cfg: Pi05Config) -> None:
        super().__init__()
        self.model = _PaliGemmaModel(cfg)


class _Expert(nn.Module):
    def __init__(self, cfg: Pi05Config) -> None:
        super().__init__()
        # Every norm of the expert is adaptive, conditioned on the time embedding (width-sized).
        self.model = GemmaStack(cfg.expert, cond_dim=cfg.expert.width)


class _PaliGemmaWithExpert(nn.Module):
    def __init__(self, cfg: Pi05Config) -> None:
        super().__init__()
        self.paligemma = _PaliGemma(cfg)
        self.gemma_expert = _Expert(cfg)


class Pi05Model(nn.Module):
    """Pi0.5 weights and its two inference phases (see the module docstring)."""

    def __init__(self, cfg: Pi05Config) -> None:
        super().__init__()
        self.cfg = cfg
        width = cfg.expert.width
        self.paligemma_with_expert = _PaliGemmaWithExpert(cfg)
        self.action_in_proj = nn.Linear(cfg.action_dim, width)
        self.action_out_proj = nn.Linear(width, cfg.action_dim)
        self.time_mlp_in = nn.Linear(width, width)
        self.time_mlp_out = nn.Linear(width, width)
        self._inv_freq: torch.Tensor | None = None

    # ------------------------------------------------------------------ parts
    @property
    def vlm(self) -> GemmaStack:
        return self.paligemma_with_expert.paligemma.model.language_model

    @property
    def expert(self) -> GemmaStack:
        return self.paligemma_with_expert.gemma_expert.model

    @property
    def dtype(self) -> torch.dtype:
        return self.action_in_proj.weight.dtype

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Kept out of the state dict (no meta-device buffer to re-create after loading).
        if self._inv_freq is None or self._inv_freq.device != positions.device:
            self._inv_freq = rope_inv_freq(self.cfg.vlm.head_dim, self.cfg.rope_theta).to(positions.device)
        freqs = positions[..., None].float() * self._inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    # ------------------------------------------------------------------ prefix
    def embed_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Images [N, 3, S, S] in [-1, 1] -> image tokens [N, (S/14)^2, vlm width] (not rescaled)."""
        pg = self.paligemma_with_expert.paligemma.model
        proj = pg.multi_modal_projector.linear
        feats = pg.vision_tower.vision_model(pixels.to(proj.weight.dtype))
        return proj(feats).to(self.dtype)

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [T] -> embeddings [T, vlm width], scaled by sqrt(width) like Gemma's input."""
        return self.vlm.embed(ids)

    @torch.no_grad()
    def prefill(self, prefixes: Sequence[torch.Tensor], cache: KVCache, slots: Sequence[int]) -> None:
        """Run the VLM over each prefix [L_i, width] (all tokens see each other) into ``slots``."""
        device = prefixes[0].device
        lens = [int(p.shape[0]) for p in prefixes]
        x = torch.zeros(len(prefixes), max(lens), self.cfg.vlm.width, dtype=self.dtype, device=device)
        for i, p in enumerate(prefixes):
            x[i, : lens[i]] = p
        batch = AttnBatch.build(cache, slots, lens, device=device, causal=False, starts=[0] * len(lens))
        rope = self._rope(batch.positions)
        last = len(self.vlm.layers) - 1
        for i, layer in enumerate(self.vlm.layers):
            # Only the K/V reach the expert: the last layer's MLP and the final norm would feed nothing.
            x = layer(x, rope, cache, i, batch, attention_only=i == last)
        batch.commit(cache)

    # ------------------------------------------------------------------ suffix
    def time_condition(self, t: torch.Tensor) -> torch.Tensor:
        """Flow times [B] -> the adaRMS condition [B, expert width]."""
        emb = time_embedding(t, self.cfg.expert.width, self.cfg.min_period, self.cfg.max_period)
        h = F.silu(self.time_mlp_in(emb.to(self.dtype)))
        return F.silu(self.time_mlp_out(h))

    @torch.no_grad()
    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, cache: KVCache, slots: Sequence[int]) -> torch.Tensor:
        """The expert's velocity [B, chunk, action_dim] (float32) for noisy actions ``x_t`` at times ``t`` [B].

        Row ``b`` attends to the prefix cached in ``slots[b]``; the cache's
        committed lengths are left unchanged.
        """
        bsz, chunk, _ = x_t.shape
        cond = self.time_condition(t)
        h = self.action_in_proj(x_t.to(self.dtype))
        batch = AttnBatch.build(cache, slots, [chunk] * bsz, device=x_t.device, causal=False)
        rope = self._rope(batch.positions)
        for i, layer in enumerate(self.expert.layers):
            h = layer(h, rope, cache, i, batch, cond)
        h, _ = self.expert.norm(h, cond)
        return self.action_out_proj(h).float()
