"""Orpheus text-to-speech runner: continuous batching of a Llama LM feeding a streaming SNAC decoder.

Per request: ``prefill`` (the prompt, in chunks so others keep decoding) ->
``decode`` (one token per step). Each step runs at most one prefill forward
(padded chunks of the prefilling requests, at most ``prefill_chunk`` prompt
tokens in total) and one decode forward (every decoding request, one token
each), samples all new tokens in one call, turns audio tokens into SNAC
codes, and decodes every 4-frame window that became ready, all requests'
windows in one codec call, keeping the window's second frame (2048 samples)
as the reference does. Audio leaves as soon as a window is decoded.

A request ends with ``stop`` on the stop token (128258), ``length`` when
``max_output_tokens`` or ``max_seq_len`` positions are reached.

KV memory is paged (mstar/layers/kv_cache.py): a step only runs the rows whose
new tokens fit in free blocks. When decoding rows need more blocks than are
free, the most recently admitted requests are preempted: their blocks are
named in the prefix cache and released, and they go back to prefill over
everything they had (prompt and output so far), resuming where they stopped,
mostly from cached blocks. Prompts are matched against the prefix cache on
admission, so a repeated voice prompt or text skips its prefill.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from mstar.errors import EmptyInputError, InvalidParameterError, InvalidRequestError, UnsupportedModalityError
from mstar.layers.attention import AttnBatch
from mstar.layers.graphed_decode import BucketedDecoder
from mstar.layers.kv_cache import KVCache
from mstar.layers.sampling import SamplingParams, sample_tokens
from mstar.models.base import ModelRunner
from mstar.models.orpheus.codes import WINDOW_TOKENS, CodeStream, split_window
from mstar.models.orpheus.config import (
    DEFAULT_VOICE,
    REPETITION_PENALTY,
    STOP_TOKEN,
    TEMPERATURE,
    TOP_P,
    VOICES,
    OrpheusConfig,
)
from mstar.models.orpheus.prompt import build_prompt, check_voice
from mstar.models.orpheus.tokenizer import ByteTokenizer, CheckpointTokenizer, TextTokenizer
from mstar.models.orpheus.weights import backbone_spec, build_tiny, load_full
from mstar.models.params import Param
from mstar.parallel import start_tensor_parallel
from mstar.request import Request, RequestInputs
from mstar.settings import RunnerSettings, Sizing
from mstar.stats import RunnerStats
from mstar.types import AudioChunk, FinishReason
from mstar.weights import TINY

__all__ = ["OrpheusRunner"]

log = logging.getLogger("mstar.orpheus")

# Salt for the codec-noise generator, so it never replays the sampling generator's stream.
_NOISE_SEED_SALT = 0x5EED_C0DE


@dataclass(frozen=True, slots=True)
class Prepared:
    """A validated request's prompt token ids (voice, text and the special tokens around them)."""

    prompt: list[int]


@dataclass(slots=True)
class State:
    """A running request: its KV slot, where it is in its prefill, and its audio codes so far."""

    prompt: list[int]
    slot: int
    sampling: SamplingParams
    max_new: int
    noise: torch.Generator
    order: int  # admission order: the latest admitted are preempted first
    phase: Literal["prefill", "decode"] = "prefill"
    # What prefill feeds: the prompt, or after a preemption everything the request had.
    tokens: list[int] = field(default_factory=list)
    fed: int = 0  # tokens of ``tokens`` already in the cache
    pending: int = -1  # last sampled token, fed at the next decode step
    kv_tokens: list[int] = field(default_factory=list)  # the tokens whose keys and values the slot holds
    attached: bool = False  # False while preempted: the slot holds no block until prefill resumes
    codes: CodeStream = field(default_factory=CodeStream)
    windows: int = 0
    # Distinct tokens seen so far (prompt and output), for the repetition penalty; the set dedupes.
    seen: list[int] = field(default_factory=list)
    seen_set: set[int] = field(default_factory=set)

    def see(self, tokens: list[int]) -> None:
        for tok in tokens:
            if tok not in self.seen_set:
                self.seen_set.add(tok)
                self.seen.append(tok)


class OrpheusRunner(ModelRunner[Prepared, State]):
    """Runs ``canopylabs/orpheus-3b-0.1-ft`` (or ``weights="tiny"``) with continuous batching."""

    name = "orpheus"
    speaks_text = True
    supports_tensor_parallel = True
    params: ClassVar[Mapping[str, Param]] = {
        "voice": Param(str, DEFAULT_VOICE, doc=f"speaker: {', '.join(VOICES)}"),
        "temperature": Param(float, TEMPERATURE, min=0.0, max=10.0, doc="sampling temperature; 0 = greedy"),
        "top_p": Param(float, TOP_P, min=0.0, max=1.0, doc="nucleus sampling: the smallest top set holding this much probability (> 0)"),
        "top_k": Param(int, 0, min=0, max=1_000_000, doc="sample among the k most likely tokens; 0 = off"),
        "repetition_penalty": Param(
            float, REPETITION_PENALTY, min=0.01, max=100.0, doc="CTRL-style penalty on tokens already spoken; 1 = off"
        ),
        "max_output_tokens": Param(
            int, None, min=1, max=1_000_000,
            doc="codec tokens at most (7 per 2048-sample frame, about 85 ms); default: the rest of the context",
        ),
    }

    @classmethod
    def default_sizing(cls, weights: str | None, settings: RunnerSettings) -> Sizing:
        if weights == TINY:
            # 16 requests of 280 output tokens and a sentence of prompt decode together untruncated;
            # the context stays short so a default-length tiny utterance (about 50 frames) is quick.
            return Sizing(max_batch_size=16, max_seq_len=384)
        if settings.on_gpu:
            # 64 requests share a 65,536-position pool (~7.5 GB of bf16 KV for the 3B model): blocks
            # follow the tokens each request holds, and any one request may grow to 8,192 positions.
            return Sizing(max_batch_size=64, max_seq_len=8192, kv_cache_tokens=65_536)
        return Sizing(max_batch_size=4, max_seq_len=4096, kv_cache_tokens=8192)

    def __init__(self, *, weights: str | None, settings: RunnerSettings) -> None:
        super().__init__(weights=weights, settings=settings)
        device, dtype = self.device, self.dtype
        self.tokenizer: TextTokenizer
        ckpt: Path | None = None
        tp = settings.tensor_parallel_size  # > 1: the LM stays on meta until attach reads rank 0's slices
        if weights == TINY:
            self.config = OrpheusConfig.tiny()
            self.model, self.snac = build_tiny(
                self.config.llama, self.config.snac, device=device, dtype=dtype, tensor_parallel_size=tp
            )
            self.tokenizer = ByteTokenizer()
        else:
            if not weights:
                raise InvalidRequestError(
                    "orpheus needs weights: a checkpoint directory, a hub id, or 'tiny'", param="weights"
                )
            model, snac, ckpt = load_full(weights, device=device, dtype=dtype, tensor_parallel_size=tp)
            self.model, self.snac = model, snac
            self.config = OrpheusConfig.full(model.config, snac.config)
            self.tokenizer = CheckpointTokenizer(ckpt)
        cfg, size = self.config, self.sizing
        # Tensor parallelism (mstar/parallel): the LM's forward runs sharded on every rank; the codec,
        # sampling and the cache's block management stay here.
        self.parallel = start_tensor_parallel(settings, size, lambda: [backbone_spec(ckpt, cfg.llama)])
        if self.parallel is not None:
            self.parallel.attach(self.model, 0)
        # Opt-in static-shape decode (CUDA graphs on CUDA, see layers/graphed_decode.py): one extra
        # cache slot (and one block) takes the padding rows. Off by default; on CPU it only pads.
        graphs = size.cuda_graphs
        self.cache = self.model.new_cache(
            size.max_batch_size + int(graphs),
            size.max_seq_len,
            device=device,
            dtype=dtype,
            block_size=size.kv_block_size,
            num_blocks=-(-size.kv_pool_tokens // size.kv_block_size) + 1 + int(graphs),
            factory=KVCache if self.parallel is None else self.parallel.new_cache,
        )
        self._admitted = 0
        self.preemptions = 0
        self.graphed: BucketedDecoder | None = None
        if graphs:
            scratch = self.cache.allocate()
            assert scratch is not None
            self.graphed = BucketedDecoder(
                self.model, self.cache, scratch, max_batch=size.max_batch_size, compile=device.type == "cuda"
            )
        self.sample_rate = self.snac.sample_rate
        strides = cfg.snac.vq_strides
        # Output samples per frame: the finest stream has strides[0] // strides[-1] codes per frame.
        self.samples_per_frame = cfg.snac.hop_length * (strides[0] // strides[-1])

    # ------------------------------------------------------------------ validation (caller thread)
    def validate(
        self, inputs: RequestInputs, output_modalities: tuple[str, ...], kwargs: Mapping[str, Any]
    ) -> dict[str, Any]:
        params = super().validate(inputs, output_modalities, kwargs)
        if any(m != "audio" for m in output_modalities):
            raise UnsupportedModalityError("orpheus produces audio only", param="output_modalities")
        text = _prompt_text(inputs)
        if not text.strip():
            raise EmptyInputError("orpheus needs text to speak", param="text")
        params["voice"] = check_voice(params["voice"])
        if params["top_p"] <= 0.0:
            raise InvalidParameterError("top_p must be > 0", param="top_p")
        budget = params["max_output_tokens"]
        if budget is not None and budget < WINDOW_TOKENS:
            # The codec decodes windows of 4 frames (7 codes each): fewer tokens can never become audio.
            raise InvalidParameterError(
                f"max_output_tokens must be at least {WINDOW_TOKENS} for orpheus (one 4-frame codec window "
                f"is the least it turns into audio); got {budget}",
                param="max_output_tokens",
            )
        return params

    def prepare(self, inputs: RequestInputs, output_modalities: tuple[str, ...], params: Mapping[str, Any]) -> Prepared:
        prompt = build_prompt(self.tokenizer, params["voice"], _prompt_text(inputs))
        if len(prompt) >= self.sizing.max_seq_len:
            raise InvalidRequestError(
                f"the prompt is {len(prompt)} tokens; this engine's context holds {self.sizing.max_seq_len}",
                param="text",
            )
        return Prepared(prompt)

    # ------------------------------------------------------------------ life cycle
    def admit(self, req: Request) -> bool:
        slot = self.cache.allocate()
        if slot is None:
            return False
        p = req.params
        prompt = self.prepared(req).prompt
        room = self.cache.max_len - len(prompt) + 1  # the last sampled token needs no KV position
        max_new = room if p["max_output_tokens"] is None else int(p["max_output_tokens"])
        noise = torch.Generator(device=self.device if self.device.type == "cuda" else "cpu")
        noise.manual_seed((req.seed ^ _NOISE_SEED_SALT) & 0x7FFF_FFFF_FFFF_FFFF)
        self._admitted += 1
        st = State(
            prompt=prompt,
            slot=slot,
            sampling=SamplingParams(p["temperature"], p["top_p"], p["top_k"], p["repetition_penalty"]),
            max_new=max_new,
            noise=noise,
            order=self._admitted,
            tokens=list(prompt),
        )
        self._attach_prefix(st)
        # Like the reference server (vLLM), the penalty covers prompt and generated tokens.
        st.see(prompt)
        req.state = st
        req.input_tokens = len(prompt)
        return True

    def release(self, req: Request) -> None:
        st = req.state
        if isinstance(st, State) and st.slot >= 0:
            self.cache.free(st.slot)
            st.slot = -1

    def stats(self) -> RunnerStats:
        return RunnerStats.of_caches(
            self.cache, activity=self.activity, reserved_slots=int(self.graphed is not None), preemptions=self.preemptions
        )

    def health(self) -> str | None:
        return None if self.parallel is None else self.parallel.health()

    def close(self) -> None:
        if self.parallel is not None:
            self.parallel.close()
        self.cache.k = self.cache.v = torch.empty(0)

    # ------------------------------------------------------------------ one step
    @torch.inference_mode()
    def step(self, reqs: list[Request]) -> None:
        decoding = self._make_room([r for r in reqs if self.state(r).phase == "decode"], reqs)
        prefilling = sorted((r for r in reqs if self.state(r).phase == "prefill"), key=lambda r: self.state(r).order)
        rows: list[Request] = []
        logits: list[torch.Tensor] = []
        if prefilling:
            done, out = self._prefill(prefilling, self._blocks_for(decoding))
            rows += done
            if done:
                logits.append(out)
        if decoding:
            rows += decoding
            logits.append(self._decode(decoding))
        if not rows:
            return
        tokens = self._sample(rows, torch.cat(logits))
        self._consume(rows, tokens)

    # ------------------------------------------------------------------ KV blocks
    def _attach_prefix(self, st: State) -> None:
        """Start the slot with the cached blocks of ``st.tokens`` (never the last token: it makes the logits)."""
        st.fed = self.cache.match_prefix(st.slot, st.tokens[:-1])
        st.kv_tokens = st.tokens[: st.fed]
        st.attached = True

    def _blocks_for(self, decoding: list[Request]) -> int:
        """Blocks this step's decode rows take for their next token."""
        cache = self.cache
        return sum(cache.blocks_needed(st.slot, cache.lengths[st.slot] + 1) for st in map(self.state, decoding))

    def _make_room(self, decoding: list[Request], running: list[Request]) -> list[Request]:
        """Preempt the latest admitted requests until every decoding row's next token has a block;
        returns the decoding rows that still run this step."""
        holders = sorted((r for r in running if self.state(r).attached), key=lambda r: self.state(r).order)
        while self._blocks_for(decoding) > self.cache.blocks_free and holders:
            victim = holders.pop()
            self._preempt(self.state(victim))
            if victim in decoding:
                decoding = [r for r in decoding if r is not victim]
        return decoding

    def _preempt(self, st: State) -> None:
        """Release a request's blocks (kept warm in the prefix cache) and send it back to prefill."""
        self.cache.register_prefix(st.slot, st.kv_tokens)
        if st.phase == "decode":
            # Resume over everything it had: the prefill's last logits give its next token.
            st.tokens = [*st.kv_tokens, st.pending]
            st.phase = "prefill"
        self.cache.free(st.slot)
        reused = self.cache.allocate()
        assert reused == st.slot  # the slot just freed is the one handed back
        st.fed, st.kv_tokens, st.attached = 0, [], False
        self.preemptions += 1

    def _chunk_room(self, st: State, blocks: int) -> int:
        """Tokens ``st`` can add using its own blocks plus ``blocks`` free ones."""
        cache = self.cache
        length = cache.lengths[st.slot]
        own = len(cache.tables[st.slot]) * cache.block_size - length
        shared = 1 if own > 0 and cache.blocks_needed(st.slot, length + 1) else 0  # a shared last block is copied
        return max(0, own + (blocks - shared) * cache.block_size)

    def _prefill(self, reqs: list[Request], reserved_blocks: int) -> tuple[list[Request], torch.Tensor]:
        """Feed the next chunk of as many requests as the token budget and the free blocks (less
        ``reserved_blocks``, kept for this step's decode rows) allow."""
        budget = self.sizing.prefill_chunk
        blocks = self.cache.blocks_free - reserved_blocks
        chunks: list[tuple[Request, list[int]]] = []
        for r in reqs:
            st = self.state(r)
            if not st.attached:
                # A preempted request takes back its cached blocks only if it can then make progress
                # without the blocks this step's decode rows need.
                _, idle = self.cache.prefix_cost(st.tokens[:-1])
                if blocks - idle < 1:
                    break
                self._attach_prefix(st)
                blocks -= idle
            n = min(len(st.tokens) - st.fed, budget, self._chunk_room(st, blocks))
            if n <= 0:
                break
            chunks.append((r, st.tokens[st.fed : st.fed + n]))
            blocks -= self.cache.blocks_needed(st.slot, self.cache.lengths[st.slot] + n)
            budget -= n
        if not chunks:
            return [], torch.empty(0)
        width = max(len(c) for _, c in chunks)
        ids = torch.zeros(len(chunks), width, dtype=torch.long)
        for i, (_, c) in enumerate(chunks):
            ids[i, : len(c)] = torch.tensor(c)
        slots = [self.state(r).slot for r, _ in chunks]
        batch = AttnBatch.build(self.cache, slots, [len(c) for _, c in chunks], device=self.device)
        out = self.model(ids.to(self.device), self.cache, batch)
        batch.commit(self.cache)
        self.activity.record("prefill", len(chunks))
        finished, keep = [], []
        for i, (r, c) in enumerate(chunks):
            st = self.state(r)
            st.fed += len(c)
            st.kv_tokens.extend(c)
            if st.fed == len(st.tokens):
                self.cache.register_prefix(st.slot, st.kv_tokens)
                finished.append(r)
                keep.append(i)
        return finished, out[keep]

    def _decode(self, reqs: list[Request]) -> torch.Tensor:
        """One forward for every decoding request: each feeds its last sampled token."""
        states = [self.state(r) for r in reqs]
        if self.graphed is not None:
            out = self.graphed([st.pending for st in states], [st.slot for st in states])
        else:
            ids = torch.tensor([[st.pending] for st in states], dtype=torch.long)
            batch = AttnBatch.build(self.cache, [st.slot for st in states], [1] * len(reqs), device=self.device)
            out = self.model(ids.to(self.device), self.cache, batch)
            batch.commit(self.cache)
        for st in states:
            st.kv_tokens.append(st.pending)
        self.activity.record("decode", len(reqs))
        return out

    def _sample(self, reqs: list[Request], logits: torch.Tensor) -> list[int]:
        states = [self.state(r) for r in reqs]
        histories = [torch.tensor(st.seen, dtype=torch.long) for st in states]
        picked = sample_tokens(logits, [st.sampling for st in states], [r.generator for r in reqs], histories)
        tokens = [int(t) for t in picked.tolist()]
        for st, tok in zip(states, tokens, strict=True):
            st.see([tok])
        return tokens

    def _consume(self, reqs: list[Request], tokens: list[int]) -> None:
        """Advance each request with its new token; decode ready windows; finish the done ones."""
        windows: list[tuple[Request, list[int]]] = []
        ends: list[tuple[Request, FinishReason]] = []
        for r, tok in zip(reqs, tokens, strict=True):
            st = self.state(r)
            r.output_tokens += 1
            if tok == STOP_TOKEN:
                ends.append((r, "stop"))
                continue
            st.phase = "decode"
            st.pending = tok
            if st.codes.push(tok) and st.codes.window_ready() and r.wants("audio"):
                windows.append((r, st.codes.window()))
            if r.output_tokens >= st.max_new or self.cache.room(st.slot) <= 0:
                ends.append((r, "length"))
        if windows:
            self._emit_audio(windows)
        for r, reason in ends:
            r.finish(reason)

    def _emit_audio(self, windows: list[tuple[Request, list[int]]]) -> None:
        codes = torch.tensor([w for _, w in windows], dtype=torch.long, device=self.device)
        assert codes.shape[1] == WINDOW_TOKENS
        audio = self.snac.decode(split_window(codes), generators=[self.state(r).noise for r, _ in windows])
        spf = self.samples_per_frame
        # Keep the second frame of the window (the reference's [2048:4096]); int16 by truncation like it.
        pcm = (audio[:, 0, spf : 2 * spf].float() * 32767).to(torch.int16).cpu().numpy()
        self.activity.record("snac", len(windows))
        for (r, _), row in zip(windows, pcm, strict=True):
            st = self.state(r)
            st.windows += 1
            r.emit(
                AudioChunk(row.astype("<i2").tobytes(), self.sample_rate, 1, metadata={"frame": st.codes.frames - 3})
            )


def _prompt_text(inputs: RequestInputs) -> str:
    """The text to speak: ``text``, else the last user message's text parts."""
    if inputs.text:
        return inputs.text
    for msg in reversed(inputs.messages or []):
        if not isinstance(msg, dict) or msg.get("role", "user") != "user":
            continue
        content = msg.get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""
