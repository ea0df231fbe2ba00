"""The KV-cached prefix/suffix split gives what one joint forward over [prefix; actions] gives.

The reference (openpi / lerobot) runs both Gemma stacks layer by layer over the
concatenated sequence with a block mask: prefix tokens see the prefix, action
tokens see everything. The serving path instead caches the prefix once and
runs only the expert per Euler step. This test writes the joint forward out
naively (own norm, RoPE, masked softmax) and compares.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from mstar.layers.kv_cache import KVCache
from mstar.models.pi05.config import TINY
from mstar.models.pi05.flow import time_embedding
from mstar.models.pi05.model import Pi05Model
from mstar.models.pi05.weights import tiny_model


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def _rope(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1]
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    ang = pos[:, None].float() * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    rot = torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1)
    return x * cos + rot * sin


def _joint_velocity(m: Pi05Model, prefix: torch.Tensor, x_t: torch.Tensor, t: float) -> torch.Tensor:
    cfg = m.cfg
    lp, c = prefix.shape[0], x_t.shape[0]
    emb = time_embedding(torch.tensor([t]), cfg.expert.width, cfg.min_period, cfg.max_period)
    cond = F.silu(m.time_mlp_out(F.silu(m.time_mlp_in(emb))))[0]
    hp, hs = prefix, m.action_in_proj(x_t)
    pos = torch.arange(lp + c)
    allowed = torch.ones(lp + c, lp + c, dtype=torch.bool)
    allowed[:lp, lp:] = False  # the prefix never sees the actions
    hd = cfg.vlm.head_dim

    def ada(norm: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale, shift, gate = norm.dense(cond).chunk(3)
        return _rms(x) * (1 + scale) + shift, gate

    layers: list[tuple[Any, Any]] = list(zip(m.vlm.layers, m.expert.layers, strict=True))
    for lv, le in layers:
        np_ = _rms(hp) * (1 + lv.input_layernorm.weight)
        ns, g1 = ada(le.input_layernorm, hs)
        q = torch.cat([lv.self_attn.q_proj(np_), le.self_attn.q_proj(ns)]).view(lp + c, -1, hd).transpose(0, 1)
        k = torch.cat([lv.self_attn.k_proj(np_), le.self_attn.k_proj(ns)]).view(lp + c, -1, hd).transpose(0, 1)
        v = torch.cat([lv.self_attn.v_proj(np_), le.self_attn.v_proj(ns)]).view(lp + c, -1, hd).transpose(0, 1)
        q, k = _rope(q, pos), _rope(k, pos)
        k, v = k.expand(q.shape[0], -1, -1), v.expand(q.shape[0], -1, -1)
        scores = (q @ k.transpose(1, 2)) / math.sqrt(hd)
        att = (scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v).transpose(0, 1).reshape(lp + c, -1)
        hp = hp + lv.self_attn.o_proj(att[:lp])
        hs = hs + le.self_attn.o_proj(att[lp:]) * g1
        hp = hp + lv.mlp(_rms(hp) * (1 + lv.post_attention_layernorm.weight))
        ns, g2 = ada(le.post_attention_layernorm, hs)
        hs = hs + le.mlp(ns) * g2
    out, _ = ada(m.expert.norm, hs)
    return m.action_out_proj(out)


def test_cached_prefix_then_expert_equals_the_joint_forward_for_a_padded_batch() -> None:
    m = tiny_model(TINY, device=torch.device("cpu"), dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    prefixes = [torch.randn(n, TINY.vlm.width, generator=g) for n in (37, 20)]  # padded against each other
    x_t = torch.randn(2, TINY.chunk_size, TINY.action_dim, generator=g)
    times = torch.tensor([1.0, 0.3])
    cache = KVCache(num_layers=TINY.vlm.depth, num_slots=3, max_len=100, num_kv_heads=1, head_dim=TINY.vlm.head_dim)
    allocated = [cache.allocate(), cache.allocate()]
    slots = [s for s in allocated if s is not None]
    m.prefill(prefixes, cache, slots)
    assert cache.lengths[:2] == [37, 20]
    v = m.velocity(x_t, times, cache, slots)
    assert cache.lengths[:2] == [37, 20]  # the action tokens are never committed
    with torch.no_grad():
        for i in range(2):
            ref = _joint_velocity(m, prefixes[i], x_t[i], float(times[i]))
            torch.testing.assert_close(v[i], ref, atol=2e-5, rtol=1e-4)
    # A second Euler step reuses the same cached prefix.
    v2 = m.velocity(x_t * 0.5, times * 0.5, cache, slots)
    with torch.no_grad():
        torch.testing.assert_close(v2[1], _joint_velocity(m, prefixes[1], x_t[1] * 0.5, 0.15), atol=2e-5, rtol=1e-4)


def test_text_embeddings_are_scaled_by_sqrt_width_and_image_tokens_are_not() -> None:
    m = tiny_model(TINY, device=torch.device("cpu"), dtype=torch.float32)
    ids = torch.tensor([2, 5])
    torch.testing.assert_close(m.embed_text(ids), m.vlm.embed_tokens.weight[ids] * math.sqrt(TINY.vlm.width))
    pixels = torch.zeros(1, 3, 224, 224)
    pg = m.paligemma_with_expert.paligemma.model
    expected = pg.multi_modal_projector.linear(pg.vision_tower.vision_model(pixels))
    out = m.embed_images(pixels)
    assert out.shape == (1, 256, TINY.vlm.width)
    torch.testing.assert_close(out, expected)
