"""BAGEL's forward passes over the slot KV cache: context prefill, text decoding, velocity prediction.

A *context* is one KV slot plus the next RoPE position. Text segments are
causal and use the understanding expert; image segments are bidirectional,
share one RoPE position, and (for VAE latents) route the latent tokens to the
generation expert. Prefill packs every segment a context receives into one
row (:class:`PrefillRow`) and runs any number of rows (contexts of different
requests) in one forward, under a block mask: a token sees the context
before the row, every earlier segment of its row, and its own segment
causally (text) or whole (images), which is what appending the segments one
forward at a time gives. Velocity prediction batches any number of rows
(requests times guidance branches), each attending to its own context; those
tokens are written to the cache transiently and never committed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mstar.codecs.flux_vae import AutoEncoder
from mstar.layers.attention import AttnBatch
from mstar.layers.flow import patchify_latent, unpatchify_latent
from mstar.layers.kv_cache import KVCache
from mstar.models.bagel.config import BagelConfig
from mstar.models.bagel.model import Bagel
from mstar.models.bagel.vit import grid_position_ids, patchify_image

__all__ = ["BagelForward", "Context", "LatentRow", "PrefillRow"]


@dataclass(slots=True)
class Context:
    """One KV slot holding a context, and the RoPE position its next part starts at."""

    slot: int
    rope: int = 0


@dataclass(slots=True)
class LatentRow:
    """One row of a velocity batch: latent token embeddings [N, H] placed after ``ctx``."""

    ctx: Context
    latents: torch.Tensor


@dataclass(slots=True)
class PrefillRow:
    """The segments one context receives in a prefill forward, in order; ``rope`` is the next RoPE position.

    The context's own ``rope`` advances to ``rope`` once the forward has run.
    """

    ctx: Context
    rope: int
    embeds: list[torch.Tensor] = field(default_factory=list)  # [n_i, H] per segment
    ropes: list[torch.Tensor] = field(default_factory=list)  # [n_i] long RoPE positions
    gen: list[torch.Tensor] = field(default_factory=list)  # [n_i] bool: generation-expert tokens
    causal: list[bool] = field(default_factory=list)

    @classmethod
    def after(cls, ctx: Context) -> PrefillRow:
        """An empty row appending to ``ctx``."""
        return cls(ctx, ctx.rope)

    @property
    def length(self) -> int:
        return sum(e.shape[0] for e in self.embeds)

    def add(self, x: torch.Tensor, rope: torch.Tensor, gen: torch.Tensor | None, *, causal: bool) -> None:
        self.embeds.append(x)
        self.ropes.append(rope)
        self.gen.append(gen if gen is not None else torch.zeros(x.shape[0], dtype=torch.bool, device=x.device))
        self.causal.append(causal)


class BagelForward:
    """The model's passes, for the runner to schedule."""

    def __init__(self, model: Bagel, vae: AutoEncoder, cache: KVCache, cfg: BagelConfig) -> None:
        self.model = model
        self.vae = vae
        self.cache = cache
        self.cfg = cfg
        self.lm = model.language_model

    @property
    def device(self) -> torch.device:
        return self.model.vae2llm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.vae2llm.weight.dtype

    def _markers(self) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.tensor([self.cfg.start_of_image, self.cfg.end_of_image], device=self.device)
        emb = self.lm.embed(ids)
        return emb[0:1], emb[1:2]

    # ------------------------------------------------------------------ prefill segments
    def text_segment(self, row: PrefillRow, ids: list[int]) -> None:
        """Add ``<|im_start|> ids <|im_end|>`` to ``row`` (causal, understanding expert)."""
        full = [self.cfg.bos_token_id, *ids, self.cfg.eos_token_id]
        x = self.lm.embed(torch.tensor(full, device=self.device))
        row.add(x, torch.arange(row.rope, row.rope + len(full), device=self.device), None, causal=True)
        row.rope += len(full)

    def vit_segment(self, row: PrefillRow, image: torch.Tensor) -> None:
        """Add an image for understanding to ``row``: SigLIP features between vision markers, one RoPE position."""
        p = self.cfg.vit.patch_size
        _, h, w = image.shape
        patches = patchify_image(image.to(self.device, self.dtype), p)
        pos = grid_position_ids(h // p, w // p, self.cfg.vit_max_num_patch_per_side).to(self.device)
        feats = self.model.embed_vit(patches, pos).to(self.dtype)
        start, end = self._markers()
        x = torch.cat([start, feats, end])
        row.add(x, torch.full((x.shape[0],), row.rope, device=self.device), None, causal=False)
        row.rope += 1

    def vae_segment(self, row: PrefillRow, tokens: torch.Tensor, h: int, w: int) -> None:
        """Add a clean VAE image (time 0) for editing to ``row``: generation expert on its latent tokens."""
        x, gen = self._latent_row(self.latent_embeddings(tokens, 0.0, h, w))
        row.add(x, torch.full((x.shape[0],), row.rope, device=self.device), gen, causal=False)
        row.rope += 1

    def prefill(self, rows: list[PrefillRow]) -> None:
        """Append every row's segments to its context in ONE forward (rows: distinct slots).

        Each row is padded to the longest; the block mask (see the module docstring) keeps rows
        and segments apart as appending the segments one at a time would.
        """
        rows = [r for r in rows if r.embeds]
        if not rows:
            return
        dev = self.device
        lens = [r.length for r in rows]
        b, t = len(rows), max(lens)
        x = torch.zeros(b, t, self.cfg.llm.hidden_size, device=dev, dtype=self.dtype)
        rope = torch.zeros(b, t, dtype=torch.long, device=dev)
        gen = torch.zeros(b, t, dtype=torch.bool, device=dev)
        for i, r in enumerate(rows):
            n = lens[i]
            x[i, :n] = torch.cat(r.embeds).to(self.dtype)
            rope[i, :n] = torch.cat(r.ropes)
            rope[i, n:] = rope[i, n - 1]
            gen[i, :n] = torch.cat(r.gen)
        batch = AttnBatch.build(self.cache, [r.ctx.slot for r in rows], lens, device=dev)
        mask = _block_mask(rows, batch, device=dev)
        self.lm(x, rope_positions=rope, gen_mask=gen, cache=self.cache, batch=batch, mask=mask)
        batch.commit(self.cache)
        for r in rows:
            r.ctx.rope = r.rope

    # ------------------------------------------------------------------ one context part at a time
    def text(self, ctx: Context, ids: list[int]) -> None:
        """Append ``<|im_start|> ids <|im_end|>`` to ``ctx`` now (causal, understanding expert)."""
        row = PrefillRow.after(ctx)
        self.text_segment(row, ids)
        self.prefill([row])

    def vit_image(self, ctx: Context, image: torch.Tensor) -> None:
        """Append an image for understanding to ``ctx`` now."""
        row = PrefillRow.after(ctx)
        self.vit_segment(row, image)
        self.prefill([row])

    def encode_latents(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A [-1, 1] image [3, H, W] to clean latent tokens [(H/16)*(W/16), p*p*z]."""
        latent = self.vae.encode(image[None].to(self.device, torch.float32), generator=generator)[0]
        return patchify_latent(latent, self.cfg.latent_patch_size)

    def vae_image(self, ctx: Context, tokens: torch.Tensor, h: int, w: int) -> None:
        """Append a clean VAE image (time 0) for editing to ``ctx`` now."""
        row = PrefillRow.after(ctx)
        self.vae_segment(row, tokens, h, w)
        self.prefill([row])

    # ------------------------------------------------------------------ generation
    def latent_embeddings(self, tokens: torch.Tensor, t: float, h: int, w: int) -> torch.Tensor:
        """Latent tokens at flow time ``t`` to LLM inputs [h*w, H]."""
        n = tokens.shape[0]
        pos = grid_position_ids(h, w, self.cfg.max_latent_size).to(self.device)
        times = torch.full((n,), float(t), device=self.device)
        return self.model.embed_latents(tokens.to(self.device), times, pos).to(self.dtype)

    def _latent_row(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self._markers()
        x = torch.cat([start, latents, end])
        mask = torch.zeros(x.shape[0], dtype=torch.bool, device=self.device)
        mask[1:-1] = True
        return x, mask

    def velocities(self, rows: list[LatentRow]) -> list[torch.Tensor]:
        """Predict the velocity of every row's latent tokens in ONE forward; returns [N_i, p*p*z] per row."""
        lens = [r.latents.shape[0] + 2 for r in rows]
        t = max(lens)
        hidden = self.cfg.llm.hidden_size
        x = torch.zeros(len(rows), t, hidden, device=self.device, dtype=self.dtype)
        gen_mask = torch.zeros(len(rows), t, dtype=torch.bool, device=self.device)
        rope = torch.zeros(len(rows), t, dtype=torch.long, device=self.device)
        for i, r in enumerate(rows):
            xi, mi = self._latent_row(r.latents)
            x[i, : lens[i]] = xi
            gen_mask[i, : lens[i]] = mi
            rope[i] = r.ctx.rope
        batch = AttnBatch.build(self.cache, [r.ctx.slot for r in rows], lens, device=self.device, causal=False)
        out = self.lm(x, rope_positions=rope, gen_mask=gen_mask, cache=self.cache, batch=batch)
        # Not committed: these positions are rewritten at the next step.
        return [self.model.llm2vae(out[i, 1 : lens[i] - 1]).float() for i in range(len(rows))]

    def decode_step(self, ctxs: list[Context], tokens: list[int]) -> torch.Tensor:
        """Feed one token per context (batched, causal); returns next-token logits [B, V]."""
        x = self.lm.embed(torch.tensor(tokens, device=self.device))[:, None]
        rope = torch.tensor([[c.rope] for c in ctxs], device=self.device)
        batch = AttnBatch.build(self.cache, [c.slot for c in ctxs], [1] * len(ctxs), device=self.device, causal=True)
        out = self.lm(x, rope_positions=rope, gen_mask=None, cache=self.cache, batch=batch)
        batch.commit(self.cache)
        for c in ctxs:
            c.rope += 1
        return self.lm.lm_head(out[:, -1]).float()

    def decode_image(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Latent tokens to an RGB uint8 image [H, W, 3] (on the CPU)."""
        latent = unpatchify_latent(tokens.float(), h, w, self.cfg.latent_patch_size, self.cfg.vae.z_channels)
        img = self.vae.decode(latent[None].to(self.device, torch.float32))[0]
        # Truncation (not rounding) to uint8, as the reference does.
        return ((img * 0.5 + 0.5).clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0).cpu()


def _block_mask(rows: list[PrefillRow], batch: AttnBatch, *, device: torch.device) -> torch.Tensor:
    """[B, 1, T, kv_len] (True = attend): the context before each row, its earlier segments, and its
    own segment causally (text) or whole (images); padding queries repeat the row's last query."""
    t, kv_len = max(batch.new_lens), batch.kv_len
    allowed = torch.zeros(len(rows), t, kv_len, dtype=torch.bool, device=device)
    for i, r in enumerate(rows):
        start, n = batch.starts[i], batch.new_lens[i]
        seg = torch.cat([torch.full((e.shape[0],), k, device=device) for k, e in enumerate(r.embeds)])
        causal = torch.tensor(r.causal, device=device)[seg]
        q, k = torch.arange(n, device=device)[:, None], torch.arange(n, device=device)[None, :]
        inner = (seg[None, :] < seg[:, None]) | ((seg[None, :] == seg[:, None]) & (~causal[:, None] | (k <= q)))
        allowed[i, :n, :start] = True
        allowed[i, :n, start : start + n] = inner
        allowed[i, n:] = allowed[i, n - 1]
    return allowed[:, None]
