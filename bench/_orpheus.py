"""Orpheus for benchmarks: random weights at a chosen size, shared with the transformers/snac baseline.

* ``bench_models(size)``: the Llama LM as transformers ``LlamaForCausalLM``
  (random init, fixed seed) and the SNAC codec as the ``snac`` package's
  ``SNAC`` (random init, fixed seed), plus mstar's own modules loaded with the
  very same tensors.
* ``bench_engine(size)``: an ``mstar.Engine("orpheus")`` whose runner uses
  those modules (the product code path; only the weights' source differs).
* ``force_audio(runner)`` / ``ForceAudio``: a bench-only logit mask so random
  weights keep emitting well-formed audio codes (never the stop token), in
  mstar and in the baseline alike. It is applied to the bench's runner
  instance, not in the product.
* ``baseline_request``: one request the plain way: ``generate`` then SNAC
  over the same sliding windows (28 tokens, stride 7, keep samples
  2048:4096), one request after another.
* ``device_models(size)``: the same LM and codec built directly on the target
  device (no CPU init, no copies; no ``snac`` package needed), optionally
  with a transformers twin that *shares* the LM's tensors (bench/gpu.py).
* ``synthetic_text`` / ``prompt_lengths`` / ``timed_decode``: prompts of a
  chosen token length for the tiny (byte) tokenizer, and the timing of a
  batch's steady decode steps through the Engine (bench/gpu.py).
"""

from __future__ import annotations

import math
import random
import statistics
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, replace
from typing import Any
from unittest import mock

import _common  # noqa: F401  (sys.path, offline env)
import torch

from mstar.codecs.snac import SNAC_24KHZ, SNACConfig, SNACDecoder
from mstar.layers.llama import LlamaConfig, LlamaForCausalLM
from mstar.models.orpheus.config import (
    AUDIO_TOKEN_BASE,
    CODEBOOK_SIZE,
    CODES_PER_FRAME,
    FULL_LLAMA,
    REPETITION_PENALTY,
    STOP_TOKEN,
    TEMPERATURE,
    TINY_LLAMA,
    TINY_SNAC,
    TOP_P,
    OrpheusConfig,
)

#: Real vocabulary and layout; width and depth small enough for a 2-core CPU.
BENCH_LLAMA = replace(
    FULL_LLAMA,
    hidden_size=512,
    intermediate_size=1536,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=64,
    rope_scaling=dict(FULL_LLAMA.rope_scaling or {}),
)
#: The 24 kHz codec's structure (hop, strides, 2048 samples per frame) at 1/16 of its width:
#: the published width (1024) takes ~2 s per 4-frame window on this 2-core CPU.
BENCH_SNAC = SNACConfig(decoder_dim=64)

SIZES: dict[str, tuple[LlamaConfig, SNACConfig]] = {
    "tiny": (TINY_LLAMA, TINY_SNAC),
    "bench": (BENCH_LLAMA, BENCH_SNAC),
    "full": (FULL_LLAMA, SNAC_24KHZ),
}

TEXTS = [
    "The quick brown fox jumps over the lazy dog near the riverbank.",
    "Continuous batching lets many requests share every decode step.",
    "Please call me back when you get a moment this afternoon.",
    "A gentle breeze moved through the tall grass at sunset.",
]


def bench_texts(n: int) -> list[str]:
    """``n`` prompts of similar length (distinct, so prefill is real work)."""
    return [f"{TEXTS[i % len(TEXTS)]} ({i})" for i in range(n)]


def orpheus_kwargs(tokens: int) -> dict[str, Any]:
    """The reference sampling settings, with a fixed output length."""
    return {"max_output_tokens": tokens, "temperature": TEMPERATURE, "top_p": TOP_P, "repetition_penalty": REPETITION_PENALTY}


def hf_config(cfg: LlamaConfig) -> Any:
    """The transformers ``LlamaConfig`` for mstar's ``cfg``."""
    from transformers import LlamaConfig as HFConfig

    rope = {"rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {"rope_type": "default"})}
    return HFConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        rope_parameters=rope,
        bos_token_id=128000,
        eos_token_id=STOP_TOKEN,
        pad_token_id=STOP_TOKEN,
    )


@dataclass
class BenchModels:
    """The same random weights, as the baseline's modules and as mstar's."""

    llama_cfg: LlamaConfig
    snac_cfg: SNACConfig
    hf_lm: Any | None  # transformers LlamaForCausalLM (None when not built)
    ref_snac: Any | None  # snac.SNAC
    lm: LlamaForCausalLM
    snac: SNACDecoder


def bench_models(size: str, *, device: torch.device, dtype: torch.dtype, baseline: bool = True, seed: int = 0) -> BenchModels:
    """Random-weight LM and codec at ``size``; with ``baseline`` also the transformers/snac twins."""
    llama_cfg, snac_cfg = SIZES[size]
    from transformers import LlamaForCausalLM as HFLlama

    torch.manual_seed(seed)
    with torch.device(device):
        hf = HFLlama(hf_config(llama_cfg)).to(dtype).eval()
    hf.config._attn_implementation = "sdpa"
    lm = LlamaForCausalLM(llama_cfg)
    missing, unexpected = lm.load_state_dict(hf.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    lm = lm.to(device=device, dtype=dtype).eval()

    import snac as snac_pkg

    torch.manual_seed(seed + 1)
    ref = snac_pkg.SNAC(**{**snac_cfg.to_dict(), "encoder_rates": list(snac_cfg.encoder_rates), "decoder_rates": list(snac_cfg.decoder_rates), "vq_strides": list(snac_cfg.vq_strides)}).eval()
    dec = SNACDecoder(snac_cfg)
    dec.load_state_dict({k: v for k, v in ref.state_dict().items() if k in dec.state_dict()}, strict=True)
    dec = dec.to(device).eval()
    ref = ref.to(device)
    if not baseline:
        del hf
        hf, ref = None, None
    return BenchModels(llama_cfg, snac_cfg, hf, ref, lm, dec)


def bench_engine(
    size: str = "bench",
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    max_batch_size: int = 64,
    max_seq_len: int = 1024,
    models: BenchModels | None = None,
    force: bool = True,
    cuda_graphs: bool = False,
    **sizing: Any,
) -> tuple[Any, dict[str, Any]]:
    """An Engine running Orpheus at ``size`` with random weights; returns it and a description.

    ``sizing`` passes further Engine sizing keywords (``prefill_chunk``, ``kv_cache_tokens``, ``kv_block_size``).
    The tokenizer is the tiny variant's byte tokenizer (one token per ASCII character)."""
    import mstar
    import mstar.models.orpheus.runner as runner_mod

    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dt = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    models = models or bench_models(size, device=dev, dtype=dt, baseline=False)
    config = OrpheusConfig(models.llama_cfg, models.snac_cfg)
    # The runner builds the tiny variant from OrpheusConfig.tiny() and build_tiny(); hand it the
    # bench config and modules instead, so everything after construction is the product path.
    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(runner_mod.OrpheusConfig, "tiny", classmethod(lambda cls: config)))
        stack.enter_context(mock.patch.object(runner_mod, "build_tiny", lambda *a, **k: (models.lm, models.snac)))
        engine = mstar.Engine(
            "orpheus", weights="tiny", device=dev, dtype=dt, max_batch_size=max_batch_size, max_seq_len=max_seq_len,
            cuda_graphs=cuda_graphs, max_queue=4096, **sizing,
        )
    if force:
        force_audio(engine.runner)
    params = sum(p.numel() for p in {id(p): p for p in models.lm.parameters()}.values())
    desc = {
        "model": f"orpheus-{size}",
        "llama": models.llama_cfg.to_dict(),
        "snac": models.snac_cfg.to_dict(),
        "lm_params": params,
        "device": str(dev),
        "dtype": str(dt),
        "kv_slots": max_batch_size,
        "max_seq_len": max_seq_len,
        "forced_audio_tokens": force,
        "cuda_graphs": cuda_graphs,
        "sizing": {k: getattr(engine.runner.sizing, k) for k in ("max_batch_size", "max_seq_len", "prefill_chunk", "kv_cache_tokens", "kv_block_size")},
    }
    return engine, desc


# ----------------------------------------------------------------------------- forcing audio tokens


def audio_masks(vocab: int, device: torch.device | str) -> torch.Tensor:
    """[7, vocab] bool: the tokens allowed at each frame position (that position's 4,096 codes)."""
    masks = torch.zeros(CODES_PER_FRAME, vocab, dtype=torch.bool, device=device)
    for pos in range(CODES_PER_FRAME):
        lo = AUDIO_TOKEN_BASE + pos * CODEBOOK_SIZE
        masks[pos, lo : lo + CODEBOOK_SIZE] = True
    return masks


def force_audio(runner: Any) -> None:
    """Bench only: mask each row's logits to the audio codes of its next frame position.

    Random weights would otherwise emit the stop token or malformed codes and
    end early; the mask keeps every request producing audio for exactly
    ``max_output_tokens`` tokens. Wraps this runner instance's sampling step.
    """
    masks = audio_masks(runner.config.llama.vocab_size, runner.device)
    original = runner._sample

    def _sample(reqs: list[Any], logits: torch.Tensor) -> list[int]:
        pos = torch.tensor([len(r.state.codes.codes) % CODES_PER_FRAME for r in reqs], device=logits.device)
        return original(reqs, logits.masked_fill(~masks[pos], float("-inf")))  # type: ignore[no-any-return]

    runner._sample = _sample


class ForceAudio:
    """The same mask as a transformers logits processor (position = tokens generated so far)."""

    def __init__(self, prompt_len: int, vocab: int, device: torch.device | str) -> None:
        self.prompt_len = prompt_len
        self.masks = audio_masks(vocab, device)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        pos = (input_ids.shape[1] - self.prompt_len) % CODES_PER_FRAME
        return scores.masked_fill(~self.masks[pos], float("-inf"))


# ----------------------------------------------------------------------------- the baseline


def snac_windows(ref_snac: Any, tokens: list[int]) -> int:
    """Decode ``tokens`` as the reference streaming decoder does; returns the samples produced."""
    codes: list[int] = []
    samples = 0
    for tok in tokens:
        pos = len(codes) % CODES_PER_FRAME
        code = tok - AUDIO_TOKEN_BASE - pos * CODEBOOK_SIZE
        if not 0 <= code < CODEBOOK_SIZE:
            continue
        codes.append(code)
        if len(codes) >= 28 and len(codes) % CODES_PER_FRAME == 0:
            w = torch.tensor(codes[-28:], device=next(ref_snac.parameters()).device).view(4, 7)
            streams = [w[:, 0][None], w[:, [1, 4]].reshape(1, -1), w[:, [2, 3, 5, 6]].reshape(1, -1)]
            with torch.inference_mode():
                audio = ref_snac.decode(streams)
            samples += audio[:, :, 2048:4096].shape[-1]
    return samples


def baseline_request(models: BenchModels, prompt_ids: list[int], tokens: int, seed: int) -> dict[str, float]:
    """One request the plain way: ``generate`` (same sampling settings), then SNAC windows."""
    from transformers import LogitsProcessorList

    hf = models.hf_lm
    assert hf is not None and models.ref_snac is not None
    device = next(hf.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)
    torch.manual_seed(seed)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            temperature=TEMPERATURE,
            top_p=TOP_P,
            repetition_penalty=REPETITION_PENALTY,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            logits_processor=LogitsProcessorList([ForceAudio(len(prompt_ids), models.llama_cfg.vocab_size, device)]),
            eos_token_id=STOP_TOKEN,
            pad_token_id=STOP_TOKEN,
        )
    sync()
    t1 = time.perf_counter()
    new = out[0, len(prompt_ids) :].tolist()
    samples = snac_windows(models.ref_snac, new)
    sync()
    t2 = time.perf_counter()
    return {"tokens": len(new), "generate_s": t1 - t0, "snac_s": t2 - t1, "total_s": t2 - t0, "audio_s": samples / models.snac_cfg.sampling_rate}


def prompt_ids(engine: Any, text: str, voice: str = "tara") -> list[int]:
    """The exact prompt the engine would build for ``text``."""
    from mstar.models.orpheus.prompt import build_prompt

    return build_prompt(engine.runner.tokenizer, voice, text)


# ----------------------------------------------------------------------------- built on the device (bench/gpu.py)


def device_models(size: str, *, device: torch.device, dtype: torch.dtype, hf: bool = False, seed: int = 0) -> BenchModels:
    """The LM (random N(0, 0.02), norms 1) and the codec at ``size``, built directly on ``device``.

    No CPU initialisation and no host-to-device copies: the modules are constructed under
    ``torch.device(device)`` in ``dtype`` (the codec in float32, as the runner keeps it). With
    ``hf``, transformers' ``LlamaForCausalLM`` is built there too and then handed the LM's own
    tensors (``load_state_dict(assign=True)``), so both read the very same weights and they are
    held once. ``ref_snac`` stays None: the ``snac`` package is not needed.
    """
    from _common import build_random, default_dtype

    llama_cfg, snac_cfg = SIZES[size]
    lm = build_random(lambda: LlamaForCausalLM(llama_cfg), device, dtype, seed=seed)
    torch.manual_seed(seed + 1)
    with torch.device(device):
        snac = SNACDecoder(snac_cfg).eval()
    twin = None
    if hf:
        from transformers import LlamaForCausalLM as HFLlama

        with torch.device(device), default_dtype(dtype):
            twin = HFLlama(hf_config(llama_cfg)).eval()
        twin.config._attn_implementation = "sdpa"
        missing, unexpected = twin.load_state_dict(lm.state_dict(), strict=False, assign=True)
        assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
        if llama_cfg.tie_word_embeddings:
            twin.lm_head.weight = twin.model.embed_tokens.weight
        ours = {p.data_ptr() for p in lm.parameters()}
        theirs = {p.data_ptr() for p in twin.parameters()}
        assert theirs <= ours, "the transformers twin must share the LM's tensors"
    return BenchModels(llama_cfg, snac_cfg, twin, None, lm, snac)


#: Tokens build_prompt adds around the text with the byte tokenizer: 128259, BOS, "tara: ", then 4 markers.
PROMPT_OVERHEAD = 12


def synthetic_text(tokens: int, seed: int) -> str:
    """Random lower-case words whose prompt (voice ``tara``, byte tokenizer) is exactly ``tokens`` long."""
    n = max(1, tokens - PROMPT_OVERHEAD)
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words: list[str] = [f"{seed}"]
    while sum(len(w) + 1 for w in words) < n:
        words.append("".join(rng.choice(letters) for _ in range(rng.randint(2, 9))))
    return " ".join(words)[:n]


def prompt_lengths(batch: int, lo: int, hi: int) -> list[int]:
    """Prompt lengths for a batch: one at the middle of ``[lo, hi]`` alone, else evenly spread over it
    (mean the same middle), in a fixed shuffled order."""
    if batch == 1:
        return [(lo + hi) // 2]
    lengths = [round(lo + (hi - lo) * i / (batch - 1)) for i in range(batch)]
    random.Random(batch).shuffle(lengths)
    return lengths


def output_tokens_for(lengths: list[int], steps: int, prefill_chunk: int) -> int:
    """Output tokens per request so that all of a batch decode together for about ``steps`` steps:
    the first to finish its prefill must still be decoding when the last one starts."""
    return steps + math.ceil(sum(lengths) / prefill_chunk) + 8


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_decode(engine: Any, texts: list[str], kwargs: dict[str, Any], *, warmup_steps: int = 5) -> dict[str, Any]:
    """Run one request per text together; time the runner's steps where every one of them decodes.

    Returns the median and mean step over those steps (after ``warmup_steps``), decode tokens/s =
    batch / median step, the live KV tokens (positions held) averaged over the timed steps, a
    snapshot of ``engine.stats()`` taken at the first timed step with the live tokens then, and the
    load's per-request timings (time to first audio).
    """
    from _load import run_engine_load

    batch = len(texts)
    runner = engine.runner
    original = runner.step
    timings: list[tuple[int, int, float, int]] = []
    snapshot: dict[str, Any] = {}
    lock = threading.Lock()

    def timed_step(reqs: list[Any]) -> None:
        decoding = sum(1 for r in reqs if r.state.phase == "decode")
        _sync(runner.device)
        t0 = time.perf_counter()
        original(reqs)
        _sync(runner.device)
        dt = time.perf_counter() - t0
        live = sum(runner.cache.lengths[r.state.slot] for r in reqs if r.state.slot >= 0)
        with lock:
            timings.append((len(reqs), decoding, dt, live))
            full = sum(1 for n, d, _, _ in timings if n == batch and d == batch)
        if not snapshot and len(reqs) == batch and decoding == batch and full > warmup_steps:
            snapshot.update(stats=engine.stats(), live_tokens=live, step=len(timings), block_size=runner.cache.block_size)

    runner.step = timed_step
    try:
        res = run_engine_load(engine, texts, kwargs)
    finally:
        runner.step = original
    full_steps = [(dt, live) for n, d, dt, live in timings if n == batch and d == batch]
    steady = full_steps[warmup_steps:] if len(full_steps) > 2 * warmup_steps else full_steps
    if not steady:
        raise RuntimeError(f"no step decoded all {batch} rows together ({len(timings)} steps)")
    dts = [dt for dt, _ in steady]
    med, mean = statistics.median(dts), statistics.fmean(dts)
    ttfa = [r.ttfa_s for r in res.requests if r.ttfa_s is not None]
    return {
        "batch": batch,
        "steps_total": len(timings),
        "steps_timed": len(steady),
        "step_median_s": med,
        "step_mean_s": mean,
        "step_min_s": min(dts),
        "decode_tok_s": batch / med,
        "decode_tok_s_incl_snac": batch / mean,
        "live_tokens_mean": statistics.fmean(live for _, live in steady),
        "end_to_end_tok_s": res.tokens_per_s,
        "output_tokens": res.tokens,
        "wall_s": res.wall_s,
        "ttfa_s_p50": statistics.median(ttfa) if ttfa else None,
        "ttfa_s_max": max(ttfa) if ttfa else None,
        "finish_reasons": sorted({r.finish_reason for r in res.requests}),
        "kv_snapshot": snapshot or None,
    }
