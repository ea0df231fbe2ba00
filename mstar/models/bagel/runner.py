"""BAGEL's runner: chat, text-to-image, image editing and think mode, one step at a time.

Each request moves through phases, one per scheduler step:

``prefill`` builds its contexts (the conditional one and the guidance
contexts: without the last text, without the input images); the prefills of
all requests starting in a step run as ONE forward, each context one packed
row of text and image segments (forward.py);
``decode`` writes text one token per step (chat answers, think-mode plans);
``denoise`` runs ONE rectified-flow step per scheduler step. All denoising
requests of a step share one forward whose rows are every request's guidance
branches, then each request emits ``Progress``;
``vae`` decodes the clean latent and emits the PNG.

Sizing (:meth:`BagelRunner.default_sizing`, overridable through
:class:`~mstar.settings.RunnerSettings`): ``max_batch_size`` is the number of
KV slots, one per context (a chat holds one, an image request up to three),
``max_seq_len`` the positions of each. The contexts live in one paged pool of
``kv_cache_tokens`` positions in blocks of ``kv_block_size`` (unset: every slot
at full length, which never runs out). The text-guidance context shares the
conditional one's blocks up to its last text (``copy_slot``) instead of
recomputing them, and so does an image-guidance context when there is no
image to drop; otherwise that context is the text parts alone, prefilled as
its own row. A shared block is copied only when one of them writes into it. A request is
admitted only when the blocks each of its contexts may take at worst
(:func:`~mstar.models.bagel.prepare.kv_positions`) fit beside what admitted
requests have reserved, so a forward never finds the pool full; one that
could not fit even in an empty pool is refused by ``prepare``. ``stats()`` counts the calls of
``prefill`` (rows: the requests prefilled together), ``decode`` (rows: requests), ``denoise``
(rows: guidance branches of all requests in that forward) and ``vae``.

``num_timesteps`` counts the points of the time grid from 1 to 0, as in the
reference: N points give N - 1 Euler steps (Progress 1 .. N-1 of N), and
reaching the last point, t = 0, is the VAE decode (Progress N of N).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from mstar.codecs.flux_vae import AutoEncoder
from mstar.errors import InvalidRequestError
from mstar.layers.flow import RENORM_TYPES, cfg_active, combine_guidance, euler_step, timestep_schedule
from mstar.layers.kv_cache import KVCache
from mstar.layers.rotary import RotaryEmbedding
from mstar.layers.sampling import SamplingParams, sample_tokens
from mstar.models.bagel.config import BagelConfig
from mstar.models.bagel.forward import BagelForward, Context, LatentRow, PrefillRow
from mstar.models.bagel.model import Bagel
from mstar.models.bagel.prepare import (
    BagelPrepared,
    check_params,
    decode_budget,
    guidance_branches,
    kv_positions,
    prepare_request,
    with_marker_ids,
)
from mstar.models.bagel.tokenizer import ByteTokenizer, TextTokenizer, load_tokenizer
from mstar.models.bagel.weights import CHECKPOINT_FILES, backbone_spec, build_models, load_checkpoint, load_tiny
from mstar.models.base import ModelRunner
from mstar.models.params import Param, validate_params
from mstar.parallel import deferred, start_tensor_parallel
from mstar.registry import get_model_info
from mstar.request import Request, RequestInputs
from mstar.settings import RunnerSettings, Sizing
from mstar.stats import RunnerStats
from mstar.types import ImageChunk, Progress, TextChunk
from mstar.weights import TINY, resolve_checkpoint_dir

__all__ = ["BagelRunner"]

log = logging.getLogger("mstar.bagel")


Phase = Literal["prefill", "decode", "denoise", "vae"]


@dataclass(slots=True)
class Denoising:
    """A request's latent on its way from noise to image."""

    x: torch.Tensor  # [N, p*p*z] float32 latent tokens
    h: int  # latent grid rows
    w: int  # latent grid columns
    times: list[float]  # the grid points from 1 down, t = 0 excluded (``step`` indexes them)
    dts: list[float]
    step: int = 0


@dataclass(slots=True)
class BagelState:
    """One running request: its phase, its contexts (one KV slot each) and its decoding or denoising."""

    phase: Phase = "prefill"
    ctx: dict[str, Context] = field(default_factory=dict)  # "cond", "text" (no last text), "img" (no images)
    # decoding
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int = 0
    generated: list[int] = field(default_factory=list)
    next_token: int = 0
    emitted: str = ""
    saved_len: int = 0  # cond context length before think-mode decoding
    saved_rope: int = 0
    denoise: Denoising | None = None
    kv_blocks: int = 0  # KV blocks reserved for the worst case of all its contexts (given back at release)

    @property
    def denoising(self) -> Denoising:
        assert self.denoise is not None, "the request has not started denoising"
        return self.denoise


class BagelRunner(ModelRunner[BagelPrepared, BagelState]):
    """ByteDance BAGEL-7B-MoT: understanding and generation experts over one Qwen2 backbone."""

    name = "bagel"
    supports_tensor_parallel = True
    params: ClassVar[Mapping[str, Param]] = {
        "cfg_text_scale": Param(float, 4.0, min=0.0, max=50.0, doc="text guidance scale"),
        "cfg_img_scale": Param(float, None, min=0.0, max=50.0, doc="image guidance scale (1.0; 2.0 for edits)"),
        "cfg_interval": Param(list, [0.4, 1.0], doc="guidance applies while interval[0] < t <= interval[1]"),
        "cfg_renorm_type": Param(
            str, "global", choices=RENORM_TYPES, doc="where the guided velocity's norm is capped: whole image or per token"
        ),
        "cfg_renorm_min": Param(float, 0.0, min=0.0, max=1.0, doc="lowest rescale factor of that norm cap"),
        "num_timesteps": Param(
            int, 50, min=2, max=1000, doc="time grid points from 1 to 0 (N-1 Euler steps, then the decode)"
        ),
        "timestep_shift": Param(float, 3.0, min=0.01, max=100.0, doc="shifts the time grid towards t=1 (more steps early)"),
        "width": Param(
            int, None, min=1, max=1 << 16,
            doc="image width in pixels, a multiple of 16 up to the model's largest side; default: the edited image's, else 1024",
        ),
        "height": Param(int, None, min=1, max=1 << 16, doc="image height in pixels (as width); default: width"),
        "think_mode": Param(bool, False, doc="write a plan (or reasoning) before answering or painting"),
        "temperature": Param(float, 0.0, min=0.0, max=5.0, doc="0 means greedy, as the reference"),
        "top_p": Param(float, 1.0, min=0.0, max=1.0, doc="nucleus sampling of text; 1 = off"),
        "max_output_tokens": Param(int, 1024, min=1, max=32768, doc="text tokens at most (answer, or plan in think_mode)"),
    }

    def __init__(self, *, weights: str | None, settings: RunnerSettings) -> None:
        super().__init__(weights=weights, settings=settings)
        device, dtype = self.device, self.dtype
        root: Path | None = None
        tp = settings.tensor_parallel_size  # > 1: the decoder stays on meta until attach reads rank 0's slices
        if weights == TINY:
            self.cfg = BagelConfig.tiny()
            defer = deferred(tp, lambda: [backbone_spec(self.cfg, None)])
            model, vae = build_models(self.cfg, defer=defer)
            load_tiny(self.cfg, model, vae, defer)
            self.tokenizer: TextTokenizer = ByteTokenizer()
        else:
            source = weights or get_model_info(self.name).hub_id
            root = resolve_checkpoint_dir(source, allow_patterns=CHECKPOINT_FILES)
            self.cfg = BagelConfig.from_checkpoint_dir(root)
            defer = deferred(tp, lambda: [backbone_spec(self.cfg, root)])
            model, vae = build_models(self.cfg, device="meta")
            load_checkpoint(root, model, vae, device, dtype, defer)
            self.tokenizer = load_tokenizer(root)
            self.cfg = with_marker_ids(self.cfg, self.tokenizer)
        self.model: Bagel = defer.to(model, device=device, dtype=dtype).eval()
        self.vae: AutoEncoder = vae.to(device=device, dtype=torch.float32).eval()
        # RoPE frequencies are not in the checkpoint: rebuild them in float32 on the target device
        # (a meta-built model has none, and a bfloat16 cast would blur them).
        self.model.language_model.model.rotary_emb = RotaryEmbedding(self.cfg.llm.head_dim, self.cfg.llm.rope_theta).to(
            device
        )
        llm, size = self.cfg.llm, self.sizing
        # Tensor parallelism (mstar/parallel): the MoT decoder's forward runs sharded on every rank;
        # embeddings, heads, the ViT and the VAE stay here.
        self.parallel = start_tensor_parallel(settings, size, lambda: [backbone_spec(self.cfg, root)])
        if self.parallel is not None:
            self.parallel.attach(self.model.language_model, 0)
        self.cache = (KVCache if self.parallel is None else self.parallel.new_cache)(
            num_layers=llm.num_hidden_layers,
            num_slots=size.max_batch_size,  # one slot per context: a request holds one to three
            max_len=size.max_seq_len,
            num_kv_heads=llm.num_key_value_heads,
            head_dim=llm.head_dim,
            device=device,
            dtype=dtype,
            block_size=size.kv_block_size,
            # None: every slot at full length, so the default pool never runs out.
            num_blocks=None if size.kv_cache_tokens is None else -(-size.kv_cache_tokens // size.kv_block_size) + 1,
        )
        #: KV blocks the admitted requests may take at worst (reserved at admit, given back at release).
        self.reserved_blocks = 0
        self.fwd = BagelForward(self.model, self.vae, self.cache, self.cfg)

    @classmethod
    def default_sizing(cls, weights: str | None, settings: RunnerSettings) -> Sizing:
        """KV slots and positions per slot: 12 x 2048 for the tiny model, 8 x 16384 for BAGEL-7B."""
        if weights == TINY:
            return Sizing(max_batch_size=12, max_seq_len=2048)
        return Sizing(max_batch_size=8, max_seq_len=16384)

    # ------------------------------------------------------------------ caller's thread
    def validate(
        self, inputs: RequestInputs, output_modalities: tuple[str, ...], kwargs: Mapping[str, Any]
    ) -> dict[str, Any]:
        return check_params(self.cfg, inputs, output_modalities, validate_params(self.params, kwargs))

    def prepare(
        self, inputs: RequestInputs, output_modalities: tuple[str, ...], params: Mapping[str, Any]
    ) -> BagelPrepared:
        prep = prepare_request(self.cfg, self.tokenizer, self.cache.max_len, inputs, output_modalities, params)
        names = guidance_branches(prep.mode, params)
        if len(names) > self.cache.num_slots:
            raise InvalidRequestError(f"a request needs {len(names)} KV slots; the cache has {self.cache.num_slots}")
        need = self._kv_blocks(prep, params)
        if need > self.cache.usable_blocks:
            raise InvalidRequestError(
                f"this request may need {need} KV blocks of {self.cache.block_size} positions for its "
                f"{len(names)} context(s); the pool holds {self.cache.usable_blocks} "
                f"(kv_cache_tokens={self.sizing.kv_pool_tokens})",
                param="kv_cache_tokens",
            )
        return prep

    # ------------------------------------------------------------------ life cycle
    def _branches(self, req: Request) -> list[str]:
        return guidance_branches(self.prepared(req).mode, req.params)

    def _kv_blocks(self, prep: BagelPrepared, params: Mapping[str, Any]) -> int:
        """Blocks all the contexts of a request may take at worst (shared blocks counted in each)."""
        bs = self.cache.block_size
        return sum(-(-n // bs) for n in kv_positions(self.cfg, prep, params, self.cache.max_len).values())

    def admit(self, req: Request) -> bool:
        names = self._branches(req)
        if self.cache.slots_free < len(names):
            if self.cache.slots_used == 0:
                raise InvalidRequestError(
                    f"a request needs {len(names)} KV slots; the cache has {self.cache.num_slots}"
                )
            return False
        p = req.params
        need = self._kv_blocks(self.prepared(req), p)
        if self.reserved_blocks + need > self.cache.usable_blocks:
            if self.reserved_blocks == 0:
                raise InvalidRequestError(
                    f"a request needs {need} KV blocks; the pool has {self.cache.usable_blocks}",
                    param="kv_cache_tokens",
                )
            return False
        st = BagelState(sampling=SamplingParams(temperature=p["temperature"], top_p=p["top_p"]), kv_blocks=need)
        for name in names:
            slot = self.cache.allocate()
            assert slot is not None
            st.ctx[name] = Context(slot)
        self.reserved_blocks += need
        req.state = st
        return True

    def release(self, req: Request) -> None:
        st = req.state
        if isinstance(st, BagelState):
            for ctx in st.ctx.values():
                self.cache.free(ctx.slot)
            st.ctx.clear()
            self.reserved_blocks -= st.kv_blocks
            st.kv_blocks = 0

    def health(self) -> str | None:
        return None if self.parallel is None else self.parallel.health()

    def close(self) -> None:
        if self.parallel is not None:
            self.parallel.close()

    def stats(self) -> RunnerStats:
        """KV slots (contexts) and blocks in use, and per component ("prefill", "decode", "denoise", "vae")
        the calls made and their rows; a denoising forward's rows are the guidance branches of every
        request in it."""
        return RunnerStats.of_caches(self.cache, activity=self.activity)

    # ------------------------------------------------------------------ stepping
    @torch.inference_mode()
    def step(self, reqs: list[Request]) -> None:
        decoding = [r for r in reqs if self.state(r).phase == "decode"]
        denoising = [r for r in reqs if self.state(r).phase == "denoise"]
        prefilling = [r for r in reqs if self.state(r).phase == "prefill"]
        painting = [r for r in reqs if self.state(r).phase == "vae"]
        if prefilling:
            self._prefill(prefilling)
        for req in painting:
            try:
                self._paint(req)
            except Exception as exc:  # a failure here belongs to this request alone
                log.exception("vae failed for %s", req.request_id)
                req.fail(exc)
        if decoding:
            self._decode(decoding)
        if denoising:
            self._denoise(denoising)

    # ---- prefill
    def _prefill(self, reqs: list[Request]) -> None:
        """Every new request's contexts in ONE forward; if that fails, one request at a time, so only
        the request at fault fails (its encoders, run first, fail it alone too)."""
        plans: list[tuple[Request, _PrefillPlan]] = []
        for req in reqs:
            try:
                plans.append((req, self._plan_prefill(req)))
            except Exception as exc:  # a failure here belongs to this request alone
                log.exception("prefill failed for %s", req.request_id)
                req.fail(exc)
        if not plans:
            return
        try:
            self._run_prefill(plans)
        except Exception as exc:
            if len(plans) == 1:
                log.exception("prefill failed for %s", plans[0][0].request_id)
                plans[0][0].fail(exc)
                return
            for plan in plans:
                try:
                    self._run_prefill([plan])
                except Exception as one_exc:  # noqa: BLE001 - attributed to this request alone
                    log.exception("prefill failed for %s", plan[0].request_id)
                    plan[0].fail(one_exc)

    def _plan_prefill(self, req: Request) -> _PrefillPlan:
        """The rows of a request's prefill: its conditional context, and the image-guidance context
        when that has text of its own (the text-guidance context is a prefix of the conditional one).

        Image guidance drops the input images: its row is the text parts alone (those before the
        first image are recomputed rather than shared, so that no row reads another's fresh keys).
        """
        prep, st = self.prepared(req), self.state(req)
        fwd = self.fwd
        cond = st.ctx["cond"]
        row = PrefillRow.after(cond)
        parts = prep.parts
        texts = [i for i, pt in enumerate(parts) if pt.kind == "text"]
        last_text = texts[-1] if texts else -1
        text_ctx, img_ctx = st.ctx.get("text"), st.ctx.get("img")
        plan = _PrefillPlan([row])
        tokens = {i: self.tokenizer.encode(parts[i].text) for i in texts}
        for i, part in enumerate(parts):
            if i == last_text and text_ctx is not None:
                # Text guidance drops the last text: the conditional context just before it.
                plan.text_prefix = (self.cache.lengths[cond.slot] + row.length, row.rope)
            if part.kind == "text":
                fwd.text_segment(row, tokens[i])
                plan.input_tokens += len(tokens[i]) + 2
            else:
                img = prep.images[part.image]
                if img.vae is not None:
                    latents = fwd.encode_latents(img.vae, req.generator)
                    _, hh, ww = img.vae.shape
                    fwd.vae_segment(row, latents, hh // self.cfg.latent_downsample, ww // self.cfg.latent_downsample)
                    plan.input_tokens += latents.shape[0] + 2
                before = row.length
                fwd.vit_segment(row, img.vit)
                plan.input_tokens += row.length - before
        if img_ctx is not None:
            if all(pt.kind == "text" for pt in parts):
                plan.img_is_cond = True  # no images to drop: the conditional context itself
            else:
                img_row = PrefillRow.after(img_ctx)
                for i in texts:
                    fwd.text_segment(img_row, tokens[i])
                plan.rows.append(img_row)
        return plan

    def _run_prefill(self, plans: list[tuple[Request, _PrefillPlan]]) -> None:
        """One forward over the rows of ``plans``, then each request's guidance contexts and next phase."""
        self.fwd.prefill([row for _, plan in plans for row in plan.rows])
        self.activity.record("prefill", len(plans))
        for req, plan in plans:
            try:
                self._after_prefill(req, plan)
            except Exception as exc:  # a failure here belongs to this request alone
                log.exception("prefill failed for %s", req.request_id)
                req.fail(exc)

    def _after_prefill(self, req: Request, plan: _PrefillPlan) -> None:
        st = self.state(req)
        cond = st.ctx["cond"]
        text_ctx, img_ctx = st.ctx.get("text"), st.ctx.get("img")
        if text_ctx is not None and plan.text_prefix is not None:
            length, rope = plan.text_prefix
            self.cache.copy_slot(cond.slot, text_ctx.slot, length)
            text_ctx.rope = rope
        if img_ctx is not None and plan.img_is_cond:
            self.cache.copy_slot(cond.slot, img_ctx.slot)
            img_ctx.rope = cond.rope
        req.input_tokens += plan.input_tokens
        if self.prepared(req).mode == "chat" or req.params["think_mode"]:
            self._start_decode(req)
        else:
            self._start_denoise(req)

    def _start_decode(self, req: Request) -> None:
        st, prep = self.state(req), self.prepared(req)
        cond = st.ctx["cond"]
        st.saved_len, st.saved_rope = self.cache.lengths[cond.slot], cond.rope
        st.max_tokens = decode_budget(self.cfg, self.cache.room(cond.slot), prep.size, req.params["max_output_tokens"])
        st.next_token = self.cfg.bos_token_id  # the answer opens with <|im_start|>
        st.phase = "decode"

    def _start_denoise(self, req: Request) -> None:
        st, p, size = self.state(req), req.params, self.prepared(req).size
        assert size is not None, "only image requests denoise"
        w, h = size
        gh, gw = h // self.cfg.latent_downsample, w // self.cfg.latent_downsample
        gen = req.generator
        noise = torch.randn((gh * gw, self.cfg.patch_latent_dim), generator=gen, device=gen.device, dtype=torch.float32)
        times, dts = timestep_schedule(p["num_timesteps"], p["timestep_shift"])
        st.denoise = Denoising(noise.to(self.device), gh, gw, times.tolist(), dts.tolist())
        st.phase = "denoise"

    # ---- text
    def _decode(self, reqs: list[Request]) -> None:
        states = [self.state(r) for r in reqs]
        logits = self.fwd.decode_step([st.ctx["cond"] for st in states], [st.next_token for st in states])
        self.activity.record("decode", len(reqs))
        picks = sample_tokens(logits, [st.sampling for st in states], [r.generator for r in reqs]).tolist()
        for req, tok in zip(reqs, picks, strict=True):
            try:
                self._after_token(req, int(tok))
            except Exception as exc:
                log.exception("decoding failed for %s", req.request_id)
                req.fail(exc)

    def _after_token(self, req: Request, tok: int) -> None:
        st = self.state(req)
        done = tok == self.cfg.eos_token_id
        if not done:
            st.generated.append(tok)
            req.output_tokens += 1
            self._emit_text(req, final=False)
        hit_limit = len(st.generated) >= st.max_tokens
        if not (done or hit_limit):
            st.next_token = tok
            return
        self._emit_text(req, final=True)
        if self.prepared(req).mode == "chat":
            req.finish("stop" if done else "length")
            return
        # Think mode: drop the decoding pass's cache and add the plan as a proper text part.
        cond = st.ctx["cond"]
        self.cache.lengths[cond.slot] = st.saved_len
        cond.rope = st.saved_rope
        self.fwd.text(cond, st.generated)
        self._start_denoise(req)

    def _emit_text(self, req: Request, *, final: bool) -> None:
        st = self.state(req)
        text = self.tokenizer.decode(st.generated)
        if not final:
            text = text.rstrip("\ufffd")  # hold back a partial UTF-8 character
        if len(text) > len(st.emitted) and text.startswith(st.emitted):
            req.emit(TextChunk(text[len(st.emitted) :]))
            st.emitted = text

    # ---- images
    def _denoise(self, reqs: list[Request]) -> None:
        rows: list[LatentRow] = []
        plan: list[tuple[Request, list[str], bool]] = []
        for req in reqs:
            st, p = self.state(req), req.params
            d = st.denoising
            t = d.times[d.step]
            guided = cfg_active(t, tuple(p["cfg_interval"])) and "text" in st.ctx
            names = ["cond"] + ([n for n in ("text", "img") if n in st.ctx] if guided else [])
            lat = self.fwd.latent_embeddings(d.x, t, d.h, d.w)
            rows.extend(LatentRow(st.ctx[n], lat) for n in names)
            plan.append((req, names, guided))
        vs = self.fwd.velocities(rows)
        self.activity.record("denoise", len(rows))
        i = 0
        for req, names, guided in plan:
            preds = dict(zip(names, vs[i : i + len(names)], strict=True))
            i += len(names)
            try:
                self._advance(req, preds, guided)
            except Exception as exc:
                log.exception("denoising failed for %s", req.request_id)
                req.fail(exc)

    def _advance(self, req: Request, preds: dict[str, torch.Tensor], guided: bool) -> None:
        st, p = self.state(req), req.params
        d = st.denoising
        v = preds["cond"]
        if guided:
            v = combine_guidance(
                v,
                preds.get("text"),
                preds.get("img"),
                text_scale=p["cfg_text_scale"],
                img_scale=p["cfg_img_scale"],
                renorm_type=p["cfg_renorm_type"],
                renorm_min=p["cfg_renorm_min"],
            )
        d.x = euler_step(d.x, v, d.dts[d.step])
        d.step += 1
        req.emit(Progress(d.step, p["num_timesteps"], "denoise"))
        if d.step == len(d.times):
            st.phase = "vae"  # the last grid point (t = 0) is reached at the next step, by decoding

    def _paint(self, req: Request) -> None:
        """The final timestep: decode the clean latent, report step N of N, emit the PNG."""
        p, d, size = req.params, self.state(req).denoising, self.prepared(req).size
        assert size is not None, "only image requests paint"
        rgb = self.fwd.decode_image(d.x, d.h, d.w).numpy()
        self.activity.record("vae", 1)
        w, h = size
        req.emit(Progress(p["num_timesteps"], p["num_timesteps"], "denoise"))
        req.emit(ImageChunk(_png(rgb), {"width": w, "height": h}))
        req.finish("stop")


@dataclass(slots=True)
class _PrefillPlan:
    """A request's part of a batched prefill: its rows, and how its other contexts follow from them."""

    rows: list[PrefillRow]
    text_prefix: tuple[int, int] | None = None  # (cache length, RoPE position) of the text-guidance context
    img_is_cond: bool = False  # the image-guidance context is the conditional one (no image to drop)
    input_tokens: int = 0


def _png(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buf, format="PNG")
    return buf.getvalue()
