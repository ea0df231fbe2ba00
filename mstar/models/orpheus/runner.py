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
``max_output_tokens`` is reached or its KV slot is full.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from mstar.errors import EmptyInputError, InvalidParameterError, InvalidRequestError, UnsupportedModalityError
from mstar.layers.attention import AttnBatch
from mstar.layers.graphed_decode import BucketedDecoder
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
from mstar.models.orpheus.weights import build_tiny, load_full
from mstar.models.params import Param
from mstar.request import Request, RequestInputs
from mstar.types import AudioChunk, FinishReason
from mstar.weights import TINY

__all__ = ["OrpheusRunner"]

log = logging.getLogger("mstar.orpheus")

# Salt for the codec-noise generator, so it never replays the sampling generator's stream.
_NOISE_SEED_SALT = 0x5EED_C0DE


@dataclass(slots=True)
class _State:
    prompt: list[int]
    slot: int
    sampling: SamplingParams
    max_new: int
    noise: torch.Generator
    phase: Literal["prefill", "decode"] = "prefill"
    fed: int = 0  # prompt tokens already in the cache
    pending: int = -1  # last sampled token, fed at the next decode step
    codes: CodeStream = field(default_factory=CodeStream)
    windows: int = 0


class OrpheusRunner(ModelRunner):
    """Runs ``canopylabs/orpheus-3b-0.1-ft`` (or ``weights="tiny"``) with continuous batching."""

    name = "orpheus"
    params: ClassVar[Mapping[str, Param]] = {
        "voice": Param(str, DEFAULT_VOICE, doc=f"speaker: {', '.join(VOICES)}"),
        "temperature": Param(float, TEMPERATURE, min=0.0, max=10.0, doc="0 = greedy"),
        "top_p": Param(float, TOP_P, min=0.0, max=1.0),
        "top_k": Param(int, 0, min=0, max=1_000_000, doc="0 = off"),
        "repetition_penalty": Param(float, REPETITION_PENALTY, min=0.01, max=100.0),
        "max_output_tokens": Param(int, None, min=1, max=1_000_000, doc="default: the rest of the context"),
    }

    def __init__(self, *, weights: str | None, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__(weights=weights, device=device, dtype=dtype)
        self.tokenizer: TextTokenizer
        if weights == TINY:
            self.config = OrpheusConfig.tiny()
            self.model, self.snac = build_tiny(self.config.llama, self.config.snac, device=device, dtype=dtype)
            self.tokenizer = ByteTokenizer()
        else:
            if not weights:
                raise InvalidRequestError(
                    "orpheus needs weights: a checkpoint directory, a hub id, or 'tiny'", param="weights"
                )
            model, snac, ckpt = load_full(weights, device=device, dtype=dtype)
            self.model, self.snac = model, snac
            self.config = OrpheusConfig.full(model.config, snac.config, on_gpu=device.type == "cuda")
            self.tokenizer = CheckpointTokenizer(ckpt)
        cfg = self.config
        # Opt-in static-shape decode (CUDA graphs on CUDA, see layers/graphed_decode.py): one extra
        # cache slot takes the padding rows. Off by default; on CPU it only pads (for tests).
        graphs = os.environ.get("MSTAR_CUDA_GRAPHS", "") == "1"
        self.cache = self.model.new_cache(cfg.num_slots + int(graphs), cfg.max_seq_len, device=device, dtype=dtype)
        self.graphed: BucketedDecoder | None = None
        if graphs:
            scratch = self.cache.allocate()
            assert scratch is not None
            self.graphed = BucketedDecoder(
                self.model, self.cache, scratch, max_batch=cfg.num_slots, compile=device.type == "cuda"
            )
        # Tokens each slot has seen (prompt + output), for the repetition penalty, kept on the device.
        self.seen = torch.zeros(self.cache.num_slots, cfg.llama.vocab_size, dtype=torch.bool, device=device)
        self.sample_rate = self.snac.sample_rate
        strides = cfg.snac.vq_strides
        # Output samples per frame: the finest stream has strides[0] // strides[-1] codes per frame.
        self.samples_per_frame = cfg.snac.hop_length * (strides[0] // strides[-1])
        #: Instrumentation for tests and benchmarks.
        self.counters = {"prefill_forwards": 0, "decode_forwards": 0, "snac_calls": 0, "snac_windows": 0}
        self.last_decode_batch = 0

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
        prompt = build_prompt(self.tokenizer, params["voice"], text)
        if len(prompt) >= self.config.max_seq_len:
            raise InvalidRequestError(
                f"the prompt is {len(prompt)} tokens; this engine's context holds {self.config.max_seq_len}",
                param="text",
            )
        params["_prompt_ids"] = prompt
        return params

    # ------------------------------------------------------------------ life cycle
    def admit(self, req: Request) -> bool:
        slot = self.cache.allocate()
        if slot is None:
            return False
        p = req.params
        prompt: list[int] = p["_prompt_ids"]
        room = self.cache.max_len - len(prompt) + 1  # the last sampled token needs no KV position
        max_new = room if p["max_output_tokens"] is None else int(p["max_output_tokens"])
        noise = torch.Generator(device=self.device if self.device.type == "cuda" else "cpu")
        noise.manual_seed((req.seed ^ _NOISE_SEED_SALT) & 0x7FFF_FFFF_FFFF_FFFF)
        req.state = _State(
            prompt=prompt,
            slot=slot,
            sampling=SamplingParams(p["temperature"], p["top_p"], p["top_k"], p["repetition_penalty"]),
            max_new=max_new,
            noise=noise,
        )
        req.input_tokens = len(prompt)
        self.seen[slot].zero_()
        # Like the reference server (vLLM), the penalty covers prompt and generated tokens.
        self.seen[slot, torch.tensor(prompt, device=self.device)] = True
        return True

    def release(self, req: Request) -> None:
        st = req.state
        if isinstance(st, _State) and st.slot >= 0:
            self.cache.free(st.slot)
            st.slot = -1

    def stats(self) -> dict[str, Any]:
        return {
            "kv_slots_used": self.cache.slots_used - int(self.graphed is not None),
            "kv_slots_total": self.config.num_slots,
            "kv_bytes": self.cache.nbytes,
            **self.counters,
        }

    def close(self) -> None:
        self.cache.k = self.cache.v = torch.empty(0)

    # ------------------------------------------------------------------ one step
    @torch.inference_mode()
    def step(self, reqs: list[Request]) -> None:
        decoding = [r for r in reqs if r.state.phase == "decode"]
        prefilling = [r for r in reqs if r.state.phase == "prefill"]
        rows: list[Request] = []
        logits: list[torch.Tensor] = []
        if prefilling:
            done, out = self._prefill(prefilling)
            rows += done
            logits.append(out)
        if decoding:
            rows += decoding
            logits.append(self._decode(decoding))
        if not rows:
            return
        tokens = self._sample(rows, torch.cat(logits))
        self._consume(rows, tokens)

    def _prefill(self, reqs: list[Request]) -> tuple[list[Request], torch.Tensor]:
        """Feed the next prompt chunk of as many requests as the token budget allows."""
        budget = self.config.prefill_chunk
        chunks: list[tuple[Request, list[int]]] = []
        for r in reqs:
            st: _State = r.state
            n = min(len(st.prompt) - st.fed, budget)
            if n <= 0:
                break
            chunks.append((r, st.prompt[st.fed : st.fed + n]))
            budget -= n
        width = max(len(c) for _, c in chunks)
        ids = torch.zeros(len(chunks), width, dtype=torch.long)
        for i, (_, c) in enumerate(chunks):
            ids[i, : len(c)] = torch.tensor(c)
        slots = [r.state.slot for r, _ in chunks]
        batch = AttnBatch.build(self.cache, slots, [len(c) for _, c in chunks], device=self.device)
        out = self.model(ids.to(self.device), self.cache, batch)
        batch.commit(self.cache)
        self.counters["prefill_forwards"] += 1
        finished, keep = [], []
        for i, (r, c) in enumerate(chunks):
            st = r.state
            st.fed += len(c)
            if st.fed == len(st.prompt):
                finished.append(r)
                keep.append(i)
        return finished, out[keep]

    def _decode(self, reqs: list[Request]) -> torch.Tensor:
        """One forward for every decoding request: each feeds its last sampled token."""
        if self.graphed is not None:
            out = self.graphed([r.state.pending for r in reqs], [r.state.slot for r in reqs])
        else:
            ids = torch.tensor([[r.state.pending] for r in reqs], dtype=torch.long)
            slots = [r.state.slot for r in reqs]
            batch = AttnBatch.build(self.cache, slots, [1] * len(reqs), device=self.device)
            out = self.model(ids.to(self.device), self.cache, batch)
            batch.commit(self.cache)
        self.counters["decode_forwards"] += 1
        self.last_decode_batch = len(reqs)
        return out

    def _sample(self, reqs: list[Request], logits: torch.Tensor) -> list[int]:
        logits = logits.float()
        slots = torch.tensor([r.state.slot for r in reqs], device=self.device)
        penalties = torch.tensor([r.state.sampling.repetition_penalty for r in reqs], device=self.device)
        # The CTRL penalty of layers/sampling.py, applied in place to the seen tokens only (a few
        # hundred per row): whole-vocabulary passes were a tenth of a 64-row step on CPU.
        rows, toks = self.seen[slots].nonzero(as_tuple=True)
        seen_logits, row_penalty = logits[rows, toks], penalties[rows]
        logits[rows, toks] = torch.where(seen_logits > 0, seen_logits / row_penalty, seen_logits * row_penalty)
        picked = sample_tokens(logits, [r.state.sampling for r in reqs], [r.generator for r in reqs])
        self.seen[slots, picked] = True
        return [int(t) for t in picked.tolist()]

    def _consume(self, reqs: list[Request], tokens: list[int]) -> None:
        """Advance each request with its new token; decode ready windows; finish the done ones."""
        windows: list[tuple[Request, list[int]]] = []
        ends: list[tuple[Request, FinishReason]] = []
        for r, tok in zip(reqs, tokens, strict=True):
            st: _State = r.state
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
        audio = self.snac.decode(split_window(codes), generators=[r.state.noise for r, _ in windows])
        spf = self.samples_per_frame
        # Keep the second frame of the window (the reference's [2048:4096]); int16 by truncation like it.
        pcm = (audio[:, 0, spf : 2 * spf].float() * 32767).to(torch.int16).cpu().numpy()
        self.counters["snac_calls"] += 1
        self.counters["snac_windows"] += len(windows)
        for (r, _), row in zip(windows, pcm, strict=True):
            st: _State = r.state
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
