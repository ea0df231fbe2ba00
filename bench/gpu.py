"""The device check: full-size Orpheus, Qwen3-Omni Thinker and BAGEL backbones on one CUDA GPU, in one budgeted run.

Random bf16 weights are built directly on the GPU (no CPU init, no copies). Every section is
timed against one wall-clock budget (``--budget-s``): a section that would overrun is skipped
with the reason recorded, one that raises is recorded with its traceback tail and the run goes
on, and the JSON (``bench/results/gpu.json``) is rewritten after every partial result, so a
crash or a kill still leaves everything measured so far. A watchdog ends the process (exit 3)
``--grace-s`` after the budget, saving first.

Sections, in order (see docs/benchmarks.md for what each column means):

* ``bandwidth``: bytes/s of a large device-to-device copy (read + write): the roofline.
* ``orpheus_build``: Orpheus-3B (Llama-3.2-3B shape, 156,940 vocabulary, tied head) and full-width
  SNAC 24 kHz on the GPU, plus a transformers ``LlamaForCausalLM`` sharing the same tensors.
* ``orpheus_eager``: the Engine (eager decode) at B = 1, 8, 32, 64 with mixed prompts of 100 to
  2,000 tokens, audio tokens forced so every request decodes its full length: decode tokens/s
  (B / median step over the steps where all B rows decode), the bandwidth bound for those steps
  (weights once + the live KV), KV blocks and bytes in use against live tokens (``engine.stats()``),
  time to first audio under each load, and at B = 1 alone (median of a few requests).
* ``snac``: full-size SNAC windows (4 frames -> 2,048 kept samples) decoded in batches: windows/s.
* ``hf_static``: transformers ``generate`` with ``cache_implementation="static"`` (compile off) on
  the same weights, B = 1 and 8: per-step time from two lengths (prefill cancels out).
* ``orpheus_free``: Orpheus released (``del``, ``torch.cuda.empty_cache()``) before the big backbones.
* ``qwen3_thinker``: the Qwen3-Omni Thinker text stack (30B-A3B MoE, 48 layers, 128 experts) at B = 1
  and 16: one decode step = embed, every layer over the paged KV cache, norm, LM head, argmax.
* ``bagel``: BAGEL-7B-MoT's Qwen2 MoT backbone (both experts built), text decode (understanding
  expert) at B = 1 and 16, the same way.
* ``orpheus_rebuild``, ``orpheus_graphs``: Orpheus again, the Engine with ``cuda_graphs=True``
  (bucketed static shapes, ``torch.compile(mode="reduce-overhead")``), B = 1 and 8, prefill in one step.
* ``hf_static_compiled``: transformers' static cache with its default auto-compile, B = 1 and 8.

    python bench/gpu.py --budget-s 420 --markdown     # on the GPU machine (about 7 minutes)
    python bench/gpu.py --only qwen3_thinker,bagel    # rerun some sections (their prerequisites run too)
    python bench/gpu.py --smoke                       # the same code paths on CPU, tiny shapes (CI)

Without CUDA (and without --smoke) it exits with status 2 and says so.
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import _common  # noqa: F401  (sys.path, offline env)
import torch
from _common import Sections, build_random, machine_info, markdown_table, parse_ns, print_table

#: The sections in the order they run.
PLAN = [
    "bandwidth",
    "orpheus_build",
    "orpheus_eager",
    "snac",
    "hf_static",
    "orpheus_free",
    "qwen3_thinker",
    "bagel",
    "orpheus_rebuild",
    "orpheus_graphs",
    "hf_static_compiled",
]
#: What each section needs to have run (and succeeded) first.
REQUIRES = {
    "orpheus_eager": ["orpheus_build"],
    "snac": ["orpheus_build"],
    "hf_static": ["orpheus_build"],
    "orpheus_graphs": ["orpheus_rebuild"],
    "hf_static_compiled": ["orpheus_rebuild"],
}
#: Generous guesses of the seconds a section needs on an H200 before its first measurement
#: (set-up plus the smallest item); sections also check per item (PER_ITEM_S) as they go.
ESTIMATE_S = {
    "bandwidth": 5, "orpheus_build": 20, "orpheus_eager": 20, "snac": 10, "hf_static": 15,
    "orpheus_free": 2, "qwen3_thinker": 20, "bagel": 12, "orpheus_rebuild": 15, "orpheus_graphs": 90,
    "hf_static_compiled": 90,
}
PER_ITEM_S: dict[str, dict[int, float]] = {
    "orpheus_eager": {1: 8, 8: 10, 32: 18, 64: 30, 0: 8},  # 0: the batch-1 TTFA requests
    "orpheus_graphs": {1: 90, 8: 90},
    "hf_static": {1: 10, 8: 12},
    "hf_static_compiled": {1: 90, 8: 70},
    "qwen3_thinker": {1: 8, 16: 25},
    "bagel": {1: 4, 16: 6},
    "snac": {1: 2, 16: 2, 64: 3},
}
#: Smoke runs check the budget with these divided by this.
SMOKE_SCALE = 100.0
#: Positions per KV block (the Engine's default kv_block_size).
KV_BLOCK = 16


@dataclass
class Config:
    """What one run measures (GPU defaults; :meth:`smoke` gives the CPU variant)."""

    size: str = "full"  # Orpheus size in bench/_orpheus.py SIZES
    batches: list[int] = field(default_factory=lambda: [1, 8, 32, 64])
    steps: int = 128  # steady decode steps timed per batch (all rows decoding)
    prompt_min: int = 100
    prompt_max: int = 2000
    prefill_chunk: int = 512  # the product default
    ttfa_requests: int = 5
    snac_batches: list[int] = field(default_factory=lambda: [1, 16, 64])
    snac_repeats: int = 10
    snac_warmup: int = 2
    hf_batches: list[int] = field(default_factory=lambda: [1, 8])
    hf_compiled_batches: list[int] = field(default_factory=lambda: [1, 8])
    hf_steps: int = 64
    hf_short: int = 8  # new tokens of the shorter of the two timed generate calls
    backbone_batches: list[int] = field(default_factory=lambda: [1, 16])
    backbone_steps: int = 24
    backbone_warmup: int = 3
    graph_batches: list[int] = field(default_factory=lambda: [1, 8])
    warmup_steps: int = 5
    bandwidth_bytes: int = 1 << 30
    seq_round: int = 256  # max_seq_len is rounded up to a multiple of this

    @classmethod
    def smoke(cls) -> Config:
        return cls(
            size="tiny", batches=[1, 2], steps=6, prompt_min=20, prompt_max=60, prefill_chunk=32, ttfa_requests=2,
            snac_batches=[1, 2], snac_repeats=1, snac_warmup=1, hf_batches=[1, 2], hf_compiled_batches=[1], hf_steps=2,
            hf_short=1, backbone_batches=[1, 2], backbone_steps=2, backbone_warmup=1, graph_batches=[1, 2],
            warmup_steps=2, bandwidth_bytes=1 << 24, seq_round=16,
        )


@dataclass
class Ctx:
    """The run's shared state: device, configuration, the budget, and the Orpheus models while resident."""

    cfg: Config
    device: torch.device
    dtype: torch.dtype
    smoke: bool
    run: Sections
    models: Any = None  # bench/_orpheus.py BenchModels
    bandwidth: float | None = None
    selected: list[str] = field(default_factory=list)

    def estimate(self, section: str, item: int | None = None) -> float:
        if item is None:
            est = ESTIMATE_S[section]
        else:
            table = PER_ITEM_S.get(section, {})
            est = table.get(item, max(table.values(), default=10))
        return est / SMOKE_SCALE if self.smoke else est

    def item_fits(self, rec: dict[str, Any], section: str, item: int, keep_s: float = 0.0) -> bool:
        """Budget check before one item of a section; a skipped item is recorded under ``rec["skipped"]``."""
        est = self.estimate(section, item)
        if self.run.affordable(est, keep_s):
            return True
        rec.setdefault("skipped", {})[str(item)] = self.run.skip_reason(est, keep_s)
        print(f"  {section} item {item}: skipped ({rec['skipped'][str(item)]})", flush=True)
        self.run.save()
        return False


# ----------------------------------------------------------------------------- device helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 20) -> float:
    """Bytes per second moved by a device-to-device copy (counts the read and the write)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    sync(device)
    elapsed = time.perf_counter() - t0
    del src, dst
    return 2 * nbytes * repeats / elapsed


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a Llama decode step reads from the weights: every tensor once (a tied head counted once)."""
    unique = {p.data_ptr(): p for p in model.parameters()}
    total = sum(p.numel() * p.element_size() for p in unique.values())
    cfg = model.config  # type: ignore[attr-defined]
    if not cfg.tie_word_embeddings:  # an untied embedding table is only gathered, B rows per step
        emb = model.model.embed_tokens.weight  # type: ignore[union-attr]
        total -= emb.numel() * emb.element_size()
    return total


def param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in {p.data_ptr(): p for p in module.parameters()}.values())


def bound_tok_s(ctx: Ctx, batch: int, step_bytes: float) -> float | None:
    """Decode tokens/s if a step only had to move ``step_bytes`` at the measured copy bandwidth."""
    return batch * ctx.bandwidth / step_bytes if ctx.bandwidth else None


def memory_hooks(device: torch.device) -> tuple[Callable[[dict[str, Any]], None], Callable[[dict[str, Any]], None]]:
    """Per-section GPU memory: allocated at start and end, and the peak (``max_memory_allocated``)."""

    def start(rec: dict[str, Any]) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            rec["mem_allocated_start_bytes"] = torch.cuda.memory_allocated(device)

    def end(rec: dict[str, Any]) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            rec["peak_mem_bytes"] = torch.cuda.max_memory_allocated(device)
            rec["mem_allocated_end_bytes"] = torch.cuda.memory_allocated(device)
        else:
            rec["peak_mem_bytes"] = None  # not tracked on CPU

    return start, end


def peak_so_far(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


# ----------------------------------------------------------------------------- sections: set-up


def sec_bandwidth(ctx: Ctx, rec: dict[str, Any]) -> None:
    ctx.bandwidth = copy_bandwidth(ctx.device, ctx.cfg.bandwidth_bytes)
    rec.update(copy_bytes=ctx.cfg.bandwidth_bytes, bytes_per_s=ctx.bandwidth)
    print(f"  copy bandwidth {ctx.bandwidth / 1e9:.0f} GB/s", flush=True)


def sec_orpheus_build(ctx: Ctx, rec: dict[str, Any]) -> None:
    from _orpheus import device_models

    want_hf = any(s in ctx.selected for s in ("hf_static", "hf_static_compiled"))
    t0 = time.perf_counter()
    ctx.models = device_models(ctx.cfg.size, device=ctx.device, dtype=ctx.dtype, hf=want_hf)
    sync(ctx.device)
    lm = ctx.models.lm
    rec.update(
        build_s=time.perf_counter() - t0, size=ctx.cfg.size, lm_params=param_count(lm), weight_bytes=weight_bytes(lm),
        snac_params=param_count(ctx.models.snac), transformers_twin=ctx.models.hf_lm is not None,
        twin_shares_tensors=ctx.models.hf_lm is not None, llama=ctx.models.llama_cfg.to_dict(),
    )
    print(f"  orpheus-{ctx.cfg.size}: {rec['lm_params'] / 1e9:.2f}B params, {rec['weight_bytes'] / 1e9:.2f} GB read per step, "
          f"built in {rec['build_s']:.1f} s", flush=True)


def sec_orpheus_free(ctx: Ctx, rec: dict[str, Any]) -> None:
    before = torch.cuda.memory_allocated(ctx.device) if ctx.device.type == "cuda" else None
    rec["was_resident"] = ctx.models is not None
    ctx.models = None
    free_memory(ctx.device)
    after = torch.cuda.memory_allocated(ctx.device) if ctx.device.type == "cuda" else None
    rec.update(allocated_before_bytes=before, allocated_after_bytes=after)


def sec_orpheus_rebuild(ctx: Ctx, rec: dict[str, Any]) -> None:
    if ctx.models is not None:
        rec["note"] = "still resident: nothing to rebuild"
        return
    sec_orpheus_build(ctx, rec)


# ----------------------------------------------------------------------------- sections: Orpheus through the Engine


def orpheus_plan(cfg: Config, batches: list[int], prefill_chunk: int | dict[int, int]) -> dict[str, Any]:
    """Prompt lengths and output tokens per batch, and an engine sized so that nothing is truncated
    or preempted: max_seq_len holds the longest prompt plus its output, the KV pool every request of
    the largest batch at full length (plus a partly filled block each, plus 5%)."""
    from _orpheus import output_tokens_for, prompt_lengths

    lengths = {b: prompt_lengths(b, cfg.prompt_min, cfg.prompt_max) for b in batches}
    chunk = {b: prefill_chunk[b] if isinstance(prefill_chunk, dict) else prefill_chunk for b in batches}
    # At least 35 tokens, so that every request reaches its first audio window (28 codes) and reports a TTFA.
    outputs = {b: max(35, output_tokens_for(lengths[b], cfg.steps + cfg.warmup_steps, chunk[b])) for b in batches}
    longest = max(max(lengths[b]) + outputs[b] for b in batches) + 16
    max_seq = -(-longest // cfg.seq_round) * cfg.seq_round
    block = KV_BLOCK
    pool = max(sum(n + outputs[b] + block for n in lengths[b]) for b in batches)
    pool = max(max_seq, math.ceil(pool * 1.05 / block) * block)
    return {"lengths": lengths, "outputs": outputs, "max_seq_len": max_seq, "kv_cache_tokens": pool, "prefill_chunk": chunk}


def kv_summary(level: dict[str, Any], max_seq_len: int) -> dict[str, Any]:
    """KV bytes and blocks in use (``engine.stats()`` at a steady step) against the live tokens then."""
    snap = level.get("kv_snapshot")
    if not snap:
        return {}
    st, live = snap["stats"], snap["live_tokens"]
    per_block = st["kv_bytes"] / (st["kv_blocks_total"] + 1)  # the pool holds one null block besides
    block = snap["block_size"]
    per_token = per_block / block
    in_use = st["kv_blocks_used"] * per_block
    return {
        "kv_pool_bytes": st["kv_bytes"], "kv_blocks_total": st["kv_blocks_total"], "kv_blocks_used": st["kv_blocks_used"],
        "kv_bytes_in_use": in_use, "kv_live_tokens": live, "kv_bytes_for_live_tokens": live * per_token,
        "kv_in_use_over_live": in_use / (live * per_token) if live else None,
        # proportional: at most one partly filled block per request (and the graph path's scratch block)
        "kv_proportional": st["kv_blocks_used"] <= math.ceil(live / block) + level["batch"] + 1,
        "kv_slot_cache_bytes": level["batch"] * max_seq_len * per_token,
        "preemptions": st["preemptions"], "prefix_hit_tokens": st["prefix_hit_tokens"],
    }


def orpheus_levels(ctx: Ctx, rec: dict[str, Any], section: str, *, graphs: bool, batches: list[int], keep_s: float = 0.0) -> None:
    """Engine decode at each batch size (mixed prompt lengths), recorded level by level."""
    from _orpheus import bench_engine, orpheus_kwargs, synthetic_text

    cfg, models = ctx.cfg, ctx.models
    # The graph path pads to (batch, context) buckets, each compiled once: prefill every prompt in one
    # step so that all rows start decoding together and only the batch's own bucket is compiled.
    chunk: int | dict[int, int] = cfg.prefill_chunk
    if graphs:
        from _orpheus import prompt_lengths

        chunk = {b: max(cfg.prefill_chunk, sum(prompt_lengths(b, cfg.prompt_min, cfg.prompt_max))) for b in batches}
    plan = orpheus_plan(cfg, batches, chunk)
    engine_chunk = max(plan["prefill_chunk"].values())
    engine, desc = bench_engine(
        cfg.size, device=ctx.device, dtype=ctx.dtype, max_batch_size=max(batches), max_seq_len=plan["max_seq_len"],
        models=models, cuda_graphs=graphs, prefill_chunk=engine_chunk, kv_cache_tokens=plan["kv_cache_tokens"],
        kv_block_size=KV_BLOCK,
    )
    rec["engine"] = {k: desc[k] for k in ("model", "device", "dtype", "cuda_graphs", "sizing", "forced_audio_tokens")}
    rec["prompt_lengths"] = {str(b): plan["lengths"][b] for b in batches}
    lcfg = models.llama_cfg
    elem = torch.tensor([], dtype=ctx.dtype).element_size()
    kv_per_token = 2 * lcfg.num_hidden_layers * lcfg.num_key_value_heads * lcfg.head_dim * elem
    wbytes = weight_bytes(models.lm)
    rec.update(weight_bytes=wbytes, kv_bytes_per_token=kv_per_token, levels=[])
    try:
        if not graphs:  # first-call allocations; the graph path would compile a bucket nobody uses
            engine.generate(text=synthetic_text(cfg.prompt_min, 7), output_modalities=("audio",), **orpheus_kwargs(35))
        for i, b in enumerate(batches):
            if not ctx.item_fits(rec, section, b, keep_s if i else 0.0):
                continue
            level = orpheus_level(ctx, engine, plan, b)
            step_bytes = wbytes + level["live_tokens_mean"] * kv_per_token
            bound = bound_tok_s(ctx, b, step_bytes)
            level.update(
                step_bytes=step_bytes, bound_tok_s=bound, fraction_of_bound=level["decode_tok_s"] / bound if bound else None,
                **kv_summary(level, plan["max_seq_len"]), peak_mem_so_far_bytes=peak_so_far(ctx.device),
            )
            rec["levels"].append(level)
            ctx.run.save()
            print(f"  B={b}: {level['decode_tok_s']:.0f} tok/s ({level['step_median_s'] * 1e3:.1f} ms/step, "
                  f"{_pct(level['fraction_of_bound'])} of bound), TTFA p50 {_num(level['ttfa_s_p50'])} s", flush=True)
        if not graphs and cfg.ttfa_requests and ctx.item_fits(rec, section, 0):
            rec["ttfa_batch1"] = ttfa_alone(engine, cfg)
            ctx.run.save()
            print(f"  TTFA alone: p50 {_num(rec['ttfa_batch1']['ttfa_s_p50'])} s", flush=True)
        if graphs:
            rec["dynamo_counters"] = dynamo_counters()
            rec["note"] = "no warm-up: each level's first decode steps compile (excluded from the median; in its TTFA)"
    finally:
        engine.close()
        del engine
        free_memory(ctx.device)


def orpheus_level(ctx: Ctx, engine: Any, plan: dict[str, Any], b: int) -> dict[str, Any]:
    """One batch of ``b`` requests with distinct prompts (no prefix-cache hits between levels)."""
    from _orpheus import orpheus_kwargs, synthetic_text, timed_decode

    texts = [synthetic_text(n, seed=10_000 * b + i) for i, n in enumerate(plan["lengths"][b])]
    level = timed_decode(engine, texts, orpheus_kwargs(plan["outputs"][b]), warmup_steps=ctx.cfg.warmup_steps)
    level["output_tokens_per_request"] = plan["outputs"][b]
    level["prompt_tokens_mean"] = statistics.fmean(plan["lengths"][b])
    return level


def ttfa_alone(engine: Any, cfg: Config) -> dict[str, Any]:
    """Time to first audio of single requests one after another (middle-length prompt, first window at 28 tokens)."""
    from _load import run_engine_load
    from _orpheus import orpheus_kwargs, synthetic_text

    n = (cfg.prompt_min + cfg.prompt_max) // 2
    times = []
    for i in range(cfg.ttfa_requests):
        res = run_engine_load(engine, [synthetic_text(n, seed=900_000 + i)], orpheus_kwargs(35))
        times.append(res.requests[0].ttfa_s)
    valid = [t for t in times if t is not None]
    return {"prompt_tokens": n, "ttfa_s": times, "ttfa_s_p50": statistics.median(valid) if valid else None}


def dynamo_counters() -> dict[str, Any]:
    try:
        from torch._dynamo.utils import counters

        return {k: dict(v) for k, v in counters.items() if k in ("stats", "recompiles", "graph_break")}
    except Exception as exc:  # private API: best effort
        return {"unavailable": repr(exc)}


def sec_orpheus_eager(ctx: Ctx, rec: dict[str, Any]) -> None:
    orpheus_levels(ctx, rec, "orpheus_eager", graphs=False, batches=ctx.cfg.batches)


def sec_orpheus_graphs(ctx: Ctx, rec: dict[str, Any]) -> None:
    # Later graph batches leave room for the compiled transformers baseline at B=1 when it is to run.
    keep = ctx.estimate("hf_static_compiled", 1) if "hf_static_compiled" in ctx.selected else 0.0
    orpheus_levels(ctx, rec, "orpheus_graphs", graphs=True, batches=ctx.cfg.graph_batches, keep_s=keep)


# ----------------------------------------------------------------------------- sections: codec, transformers


def sec_snac(ctx: Ctx, rec: dict[str, Any]) -> None:
    from mstar.models.orpheus.codes import WINDOW_TOKENS, split_window

    snac, dev = ctx.models.snac, ctx.device
    scfg = ctx.models.snac_cfg
    samples = scfg.hop_length * (scfg.vq_strides[0] // scfg.vq_strides[-1])  # kept per window
    rec.update(samples_per_window=samples, sample_rate=scfg.sampling_rate, levels=[])
    for n in ctx.cfg.snac_batches:
        if not ctx.item_fits(rec, "snac", n):
            continue
        codes = torch.randint(0, 4096, (n, WINDOW_TOKENS), device=dev)
        gens = [torch.Generator(device=dev) for _ in range(n)]
        for i, g in enumerate(gens):
            g.manual_seed(i)
        streams = split_window(codes)
        with torch.inference_mode():
            for _ in range(ctx.cfg.snac_warmup):
                snac.decode(streams, generators=gens)
            sync(dev)
            t0 = time.perf_counter()
            for _ in range(ctx.cfg.snac_repeats):
                snac.decode(streams, generators=gens)
            sync(dev)
        dt = (time.perf_counter() - t0) / ctx.cfg.snac_repeats
        level = {"windows": n, "call_s": dt, "windows_per_s": n / dt, "audio_s_per_s": n * samples / scfg.sampling_rate / dt}
        rec["levels"].append(level)
        ctx.run.save()
        print(f"  {n} windows/call: {level['windows_per_s']:.0f} windows/s ({level['audio_s_per_s']:.0f}x real time)", flush=True)


def hf_prompt(cfg: Config) -> list[int]:
    """The middle-length prompt (same ids the Engine builds), B copies of it: no padding needed."""
    from _orpheus import synthetic_text

    from mstar.models.orpheus.prompt import build_prompt
    from mstar.models.orpheus.tokenizer import ByteTokenizer

    return build_prompt(ByteTokenizer(), "tara", synthetic_text((cfg.prompt_min + cfg.prompt_max) // 2, seed=7))


def hf_decode(ctx: Ctx, prompt: list[int], batch: int, steps: int, *, compile: bool) -> dict[str, Any]:
    """transformers ``generate`` (static cache) for ``batch`` copies of ``prompt``: per-step time from two lengths."""
    from _orpheus import ForceAudio
    from transformers import LogitsProcessorList

    from mstar.models.orpheus.config import REPETITION_PENALTY, STOP_TOKEN, TEMPERATURE, TOP_P

    hf, dev = ctx.models.hf_lm, ctx.device
    ids = torch.tensor([prompt] * batch, device=dev)
    short = ctx.cfg.hf_short

    def run(n: int) -> float:
        sync(dev)
        t0 = time.perf_counter()
        hf.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=TEMPERATURE, top_p=TOP_P,
            repetition_penalty=REPETITION_PENALTY, max_new_tokens=n, min_new_tokens=n,
            logits_processor=LogitsProcessorList([ForceAudio(len(prompt), ctx.models.llama_cfg.vocab_size, dev)]),
            eos_token_id=STOP_TOKEN, pad_token_id=STOP_TOKEN, cache_implementation="static", disable_compile=not compile,
        )
        sync(dev)
        return time.perf_counter() - t0

    warm = run(short + steps)  # the longest first: later calls reuse its cache size (no re-allocation or recompile)
    t_short, t_long = run(short), run(short + steps)
    per_step = (t_long - t_short) / steps
    return {
        "batch": batch, "prompt_tokens": len(prompt), "steps": steps, "warmup_s": warm, "short_s": t_short, "long_s": t_long,
        "step_s": per_step, "decode_tok_s": batch / per_step if per_step > 0 else None,
        "end_to_end_tok_s": batch * (short + steps) / t_long, "live_tokens_mean": batch * (len(prompt) + short + steps / 2),
    }


def hf_levels(ctx: Ctx, rec: dict[str, Any], section: str, *, batches: list[int], compile: bool) -> None:
    if ctx.models.hf_lm is None:
        raise RuntimeError("no transformers twin was built")
    prompt = hf_prompt(ctx.cfg)
    lcfg = ctx.models.llama_cfg
    elem = torch.tensor([], dtype=ctx.dtype).element_size()
    kv_per_token = 2 * lcfg.num_hidden_layers * lcfg.num_key_value_heads * lcfg.head_dim * elem
    wbytes = weight_bytes(ctx.models.lm)
    compile_here = compile and ctx.device.type == "cuda"  # transformers auto-compiles only on accelerators
    rec.update(cache_implementation="static", compile_requested=compile, levels=[])
    for b in batches:
        if not ctx.item_fits(rec, section, b):
            continue
        level = hf_decode(ctx, prompt, b, ctx.cfg.hf_steps, compile=compile_here)
        bound = bound_tok_s(ctx, b, wbytes + level["live_tokens_mean"] * kv_per_token)
        level.update(bound_tok_s=bound, fraction_of_bound=level["decode_tok_s"] / bound if bound and level["decode_tok_s"] else None,
                     peak_mem_so_far_bytes=peak_so_far(ctx.device))
        rec["levels"].append(level)
        rec["compiled"] = hasattr(ctx.models.hf_lm, "_compiled_call")
        ctx.run.save()
        print(f"  HF B={b}: {_num(level['decode_tok_s'])} tok/s ({level['step_s'] * 1e3:.1f} ms/step, compiled={rec['compiled']})", flush=True)


def sec_hf_static(ctx: Ctx, rec: dict[str, Any]) -> None:
    hf_levels(ctx, rec, "hf_static", batches=ctx.cfg.hf_batches, compile=False)


def sec_hf_static_compiled(ctx: Ctx, rec: dict[str, Any]) -> None:
    if ctx.device.type != "cuda":
        rec["note"] = "compile not attempted off CUDA (transformers only auto-compiles on accelerators): eager static cache"
    hf_levels(ctx, rec, "hf_static_compiled", batches=ctx.cfg.hf_compiled_batches, compile=True)


# ----------------------------------------------------------------------------- sections: the big backbones


@dataclass
class Backbone:
    """A decoder backbone to time: one decode step over a paged KV cache."""

    name: str
    params: int
    bytes_read: Callable[[float], float]  # bytes a step reads from the weights, given distinct experts per MoE layer
    new_cache: Callable[[int, int], Any]  # (slots, max_len) -> KVCache
    step: Callable[[Any, list[int], torch.Tensor], torch.Tensor]  # (cache, slots, ids [B, 1]) -> next ids [B, 1]
    vocab: int
    kv_bytes_per_token: int
    experts: Any = None  # the MoE expert modules (to count the distinct experts a step runs)
    config: dict[str, Any] = field(default_factory=dict)


def count_experts(bb: Backbone, cache: Any, slots: list[int], ids: torch.Tensor) -> tuple[float | None, torch.Tensor]:
    """Run one step while counting the distinct experts each MoE layer runs; returns (mean per layer, next ids)."""
    if not bb.experts:
        return None, bb.step(cache, slots, ids)
    seen: list[int] = []
    originals = []
    for m in bb.experts:
        original = m.forward

        def counting(x: torch.Tensor, top_i: torch.Tensor, top_w: torch.Tensor, _f: Any = original) -> torch.Tensor:
            seen.append(int(torch.unique(top_i).numel()))
            return _f(x, top_i, top_w)

        originals.append((m, original))
        m.forward = counting
    try:
        ids = bb.step(cache, slots, ids)
    finally:
        for m, original in originals:
            m.forward = original
    return statistics.fmean(seen) if seen else None, ids


def time_backbone(ctx: Ctx, rec: dict[str, Any], section: str, bb: Backbone) -> None:
    """Decode steps at each batch size over contexts of mixed lengths (filled KV: cost depends on length only)."""
    from _orpheus import prompt_lengths

    cfg, dev = ctx.cfg, ctx.device
    rec.update(params=bb.params, config=bb.config, kv_bytes_per_token=bb.kv_bytes_per_token, levels=[])
    warm = cfg.backbone_warmup
    for b in cfg.backbone_batches:
        if not ctx.item_fits(rec, section, b):
            continue
        lengths = prompt_lengths(b, cfg.prompt_min, cfg.prompt_max)
        cache = bb.new_cache(b, max(lengths) + warm + cfg.backbone_steps + 2)
        slots = []
        for n in lengths:  # the context's blocks are taken and counted as written (zeros)
            slot = cache.allocate()
            if slot is None or not cache.reserve(slot, n):
                raise RuntimeError(f"KV cache too small for contexts {lengths}")
            cache.lengths[slot] = n
            slots.append(slot)
        ids = torch.randint(0, bb.vocab, (b, 1), device=dev)
        times = []
        with torch.inference_mode():
            for _ in range(warm):
                ids = bb.step(cache, slots, ids)
            experts, ids = count_experts(bb, cache, slots, ids)
            sync(dev)
            for _ in range(cfg.backbone_steps):
                t0 = time.perf_counter()
                ids = bb.step(cache, slots, ids)
                sync(dev)
                times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        live = sum(lengths) + b * (warm + 1 + cfg.backbone_steps / 2)
        step_bytes = bb.bytes_read(experts or 0.0) + live * bb.kv_bytes_per_token
        bound = bound_tok_s(ctx, b, step_bytes)
        level = {
            "batch": b, "context_tokens": lengths, "steps_timed": len(times), "step_median_s": med, "step_min_s": min(times),
            "decode_tok_s": b / med, "distinct_experts_per_layer": experts, "weight_bytes_read": bb.bytes_read(experts or 0.0),
            "step_bytes": step_bytes, "bound_tok_s": bound, "fraction_of_bound": (b / med) / bound if bound else None,
            "kv_pool_bytes": cache.nbytes, "peak_mem_so_far_bytes": peak_so_far(dev),
        }
        del cache
        rec["levels"].append(level)
        ctx.run.save()
        print(f"  {bb.name} B={b}: {level['decode_tok_s']:.1f} tok/s ({med * 1e3:.1f} ms/step)", flush=True)


def kv_cache_factory(layers: int, kv_heads: int, head_dim: int, device: torch.device, dtype: torch.dtype) -> Callable[[int, int], Any]:
    from mstar.layers.kv_cache import KVCache

    def make(slots: int, max_len: int) -> Any:
        return KVCache(num_layers=layers, num_slots=slots, max_len=max_len, num_kv_heads=kv_heads, head_dim=head_dim, device=device, dtype=dtype)

    return make


def build_qwen3_thinker(ctx: Ctx) -> Backbone:
    """The Thinker's MoE text stack and LM head at full size (tiny in smoke), random weights on the device."""
    from mstar.layers.attention import AttnBatch
    from mstar.layers.invariant import BatchInvariantLinear
    from mstar.models.qwen3_omni.config import FULL_CONFIG, TINY_CONFIG, head_dim
    from mstar.models.qwen3_omni.decoder import run_layers
    from mstar.models.qwen3_omni.model import ThinkerTextModel

    text = (TINY_CONFIG if ctx.smoke else FULL_CONFIG)["thinker_config"]["text_config"]
    dev, dt = ctx.device, ctx.dtype
    lm = build_random(lambda: ThinkerTextModel(text), dev, dt)
    head = build_random(lambda: BatchInvariantLinear(text["hidden_size"], text["vocab_size"], bias=False), dev, dt)
    elem = torch.tensor([], dtype=dt).element_size()
    hd = head_dim(text)
    experts = [layer.mlp.experts for layer in lm.layers if hasattr(layer.mlp, "experts")]
    per_expert = sum(p.numel() for p in experts[0].parameters()) // experts[0].num_experts * elem if experts else 0
    expert_total = sum(p.numel() for e in experts for p in e.parameters()) * elem
    other = (param_count(lm) - lm.embed_tokens.weight.numel()) * elem - expert_total + param_count(head) * elem

    def step(cache: Any, slots: list[int], ids: torch.Tensor) -> torch.Tensor:
        b = len(slots)
        x = lm.embed_tokens(ids)
        batch = AttnBatch.build(cache, slots, [1] * b, device=dev)
        cos, sin = lm.rope(batch.positions.view(1, b, 1).expand(3, b, 1))  # text: all three MRoPE axes agree
        out = run_layers(lm.layers, lm.norm, x, cos, sin, cache, batch)
        batch.commit(cache)
        return head(out.hidden[:, -1]).argmax(-1, keepdim=True)

    return Backbone(
        name="qwen3-omni thinker", params=param_count(lm) + param_count(head),
        bytes_read=lambda distinct: other + len(experts) * distinct * per_expert,
        new_cache=kv_cache_factory(text["num_hidden_layers"], text["num_key_value_heads"], hd, dev, dt),
        step=step, vocab=text["vocab_size"], kv_bytes_per_token=2 * text["num_hidden_layers"] * text["num_key_value_heads"] * hd * elem,
        experts=experts,
        config={k: text[k] for k in (
            "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "num_experts",
            "num_experts_per_tok", "moe_intermediate_size", "vocab_size",
        )},
    )


def build_bagel(ctx: Ctx) -> Backbone:
    """BAGEL's Qwen2 MoT language model (both experts) at full size (tiny in smoke); text decode uses the understanding one."""
    from mstar.layers.attention import AttnBatch
    from mstar.models.bagel.config import BagelConfig
    from mstar.models.bagel.language_model import Qwen2MoTForCausalLM

    llm = (BagelConfig.tiny() if ctx.smoke else BagelConfig.full()).llm
    dev, dt = ctx.device, ctx.dtype
    lm = build_random(lambda: Qwen2MoTForCausalLM(llm), dev, dt)
    elem = torch.tensor([], dtype=dt).element_size()
    und = sum(p.numel() for n, p in lm.named_parameters() if "moe_gen" not in n and "embed_tokens" not in n) * elem

    def step(cache: Any, slots: list[int], ids: torch.Tensor) -> torch.Tensor:
        batch = AttnBatch.build(cache, slots, [1] * len(slots), device=dev)
        h = lm(lm.embed(ids), rope_positions=batch.positions, gen_mask=None, cache=cache, batch=batch)
        batch.commit(cache)
        return lm.lm_head(h[:, -1]).argmax(-1, keepdim=True)

    return Backbone(
        name="bagel mot", params=param_count(lm), bytes_read=lambda _distinct: und,
        new_cache=kv_cache_factory(llm.num_hidden_layers, llm.num_key_value_heads, llm.head_dim, dev, dt),
        step=step, vocab=llm.vocab_size, kv_bytes_per_token=2 * llm.num_hidden_layers * llm.num_key_value_heads * llm.head_dim * elem,
        config={"hidden_size": llm.hidden_size, "num_hidden_layers": llm.num_hidden_layers, "intermediate_size": llm.intermediate_size,
                "num_attention_heads": llm.num_attention_heads, "num_key_value_heads": llm.num_key_value_heads, "vocab_size": llm.vocab_size},
    )


def backbone_section(ctx: Ctx, rec: dict[str, Any], section: str, build: Callable[[Ctx], Backbone]) -> None:
    t0 = time.perf_counter()
    bb = build(ctx)
    sync(ctx.device)
    rec["build_s"] = time.perf_counter() - t0
    print(f"  {bb.name}: {bb.params / 1e9:.2f}B params, built in {rec['build_s']:.1f} s", flush=True)
    try:
        time_backbone(ctx, rec, section, bb)
    finally:
        del bb
        free_memory(ctx.device)


def sec_qwen3_thinker(ctx: Ctx, rec: dict[str, Any]) -> None:
    backbone_section(ctx, rec, "qwen3_thinker", build_qwen3_thinker)


def sec_bagel(ctx: Ctx, rec: dict[str, Any]) -> None:
    backbone_section(ctx, rec, "bagel", build_bagel)


SECTIONS: dict[str, Callable[[Ctx, dict[str, Any]], None]] = {
    "bandwidth": sec_bandwidth,
    "orpheus_build": sec_orpheus_build,
    "orpheus_eager": sec_orpheus_eager,
    "snac": sec_snac,
    "hf_static": sec_hf_static,
    "orpheus_free": sec_orpheus_free,
    "qwen3_thinker": sec_qwen3_thinker,
    "bagel": sec_bagel,
    "orpheus_rebuild": sec_orpheus_rebuild,
    "orpheus_graphs": sec_orpheus_graphs,
    "hf_static_compiled": sec_hf_static_compiled,
}


def select_sections(only: str | None, skip: str | None) -> list[str]:
    """The sections to run, in PLAN order: ``only`` (plus what they need) minus ``skip``."""
    names = set(PLAN)
    for given in (only, skip):
        unknown = {s for s in (given or "").split(",") if s.strip()} - names
        if unknown:
            raise SystemExit(f"unknown section(s) {sorted(unknown)}; known: {', '.join(PLAN)}")
    chosen = {s.strip() for s in only.split(",") if s.strip()} if only else set(PLAN)
    for s in list(chosen):
        chosen.update(REQUIRES.get(s, []))
    if chosen & {"qwen3_thinker", "bagel"} and chosen & {"orpheus_build", "orpheus_rebuild"}:
        chosen.add("orpheus_free")
    if chosen & {"orpheus_graphs", "hf_static_compiled"}:
        chosen.add("orpheus_rebuild")
    if chosen & {"orpheus_eager", "orpheus_graphs", "qwen3_thinker", "bagel", "hf_static", "hf_static_compiled"}:
        chosen.add("bandwidth")  # every bound needs it
    chosen -= {s.strip() for s in (skip or "").split(",") if s.strip()}
    return [s for s in PLAN if s in chosen]


# ----------------------------------------------------------------------------- tables and targets


def _gb(v: float | None) -> str:
    return "-" if v is None else f"{v / 1e9:.1f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.0f}%"


def _num(v: float | None, unit: str = "") -> str:
    if v is None:
        return "-"
    return f"{v:.0f}{unit}" if abs(v) >= 100 else f"{v:.3g}{unit}"


HEADERS = ["section", "B", "rate", "step ms p50", "bound tok/s", "of bound", "TTFA p50 s", "KV in use (live tokens, ratio)", "peak GB"]


def table_rows(doc: dict[str, Any]) -> list[list[Any]]:
    """One row per measurement (and one per skipped or failed section)."""
    rows: list[list[Any]] = []
    for name in PLAN:
        rec = doc["sections"].get(name)
        if rec is None:
            continue
        peak = _gb(rec.get("peak_mem_bytes"))
        if rec["status"] != "ok":
            why = rec.get("reason") or rec.get("error") or ""
            rows.append([name, "-", f"{rec['status']}: {why[:90]}", "-", "-", "-", "-", "-", peak])
            continue
        if name == "bandwidth":
            rows.append([name, "-", f"{rec['bytes_per_s'] / 1e9:.0f} GB/s copy", "-", "-", "-", "-", "-", peak])
        elif name == "snac":
            for lv in rec["levels"]:
                rows.append([name, lv["windows"], f"{lv['windows_per_s']:.0f} windows/s ({lv['audio_s_per_s']:.0f}x RT)",
                             f"{lv['call_s'] * 1e3:.1f}", "-", "-", "-", "-", peak])
        elif "levels" in rec:
            for lv in rec["levels"]:
                kv = "-"
                if lv.get("kv_bytes_in_use") is not None:
                    kv = f"{lv['kv_bytes_in_use'] / 1e9:.2f} GB ({lv['kv_live_tokens']} tok, {lv['kv_in_use_over_live']:.2f}x)"
                step = lv.get("step_median_s", lv.get("step_s"))
                rows.append([name, lv["batch"], _num(lv["decode_tok_s"], " tok/s"), "-" if step is None else f"{step * 1e3:.1f}",
                             _num(lv.get("bound_tok_s")), _pct(lv.get("fraction_of_bound")), _num(lv.get("ttfa_s_p50")), kv, peak])
            if rec.get("ttfa_batch1"):
                rows.append([name + " (alone)", 1, "-", "-", "-", "-", _num(rec["ttfa_batch1"]["ttfa_s_p50"]), "-", peak])
            for item, why in (rec.get("skipped") or {}).items():
                rows.append([name, item if item != "0" else "TTFA", f"skipped: {why[:80]}", "-", "-", "-", "-", "-", peak])
    return rows


def _level(doc: dict[str, Any], section: str, batch: int) -> dict[str, Any] | None:
    rec = doc["sections"].get(section) or {}
    return next((lv for lv in rec.get("levels") or [] if lv.get("batch") == batch), None)


def targets(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, computed from what was measured (``met`` None when not measured)."""
    out: list[dict[str, Any]] = []

    def add(target: str, value: float | None, shown: str, met: bool | None) -> None:
        out.append({"target": target, "value": value, "shown": shown, "met": met})

    for section in ("orpheus_eager", "orpheus_graphs"):
        lv = _level(doc, section, 1)
        f = lv.get("fraction_of_bound") if lv else None
        add(f"Orpheus B=1 decode >= 70% of the bandwidth bound ({section})", f, _pct(f), None if f is None else f >= 0.70)
    eager = [lv["batch"] for lv in (doc["sections"].get("orpheus_eager") or {}).get("levels") or []]
    bmax = max(eager, default=64)  # 64 on the GPU; the smoke run's largest batch there
    b1, big = _level(doc, "orpheus_eager", 1), _level(doc, "orpheus_eager", bmax)
    r = big["decode_tok_s"] / b1["decode_tok_s"] if b1 and big and bmax > 1 else None
    add(f"Orpheus B={bmax} / B=1 decode tokens/s >= 20x (orpheus_eager)", r, "-" if r is None else f"{r:.1f}x", None if r is None else r >= 20)
    for ours, theirs in (("orpheus_eager", "hf_static"), ("orpheus_graphs", "hf_static"), ("orpheus_eager", "hf_static_compiled"),
                         ("orpheus_graphs", "hf_static_compiled")):
        a, h = _level(doc, ours, 1), _level(doc, theirs, 1)
        r = a["decode_tok_s"] / h["decode_tok_s"] if a and h and h.get("decode_tok_s") else None
        add(f"B=1 decode >= 1.5x transformers ({ours} vs {theirs})", r, "-" if r is None else f"{r:.2f}x", None if r is None else r >= 1.5)
    levels = [lv for s in ("orpheus_eager", "orpheus_graphs") for lv in (doc["sections"].get(s) or {}).get("levels") or []
              if lv.get("kv_in_use_over_live") is not None]
    worst = max((lv["kv_in_use_over_live"] for lv in levels), default=None)
    met = all(lv["kv_proportional"] for lv in levels) if levels else None
    add("KV bytes in use proportional to live tokens (worst in-use / live)", worst, "-" if worst is None else f"{worst:.3f}x", met)
    return out


def report(doc: dict[str, Any], markdown: bool) -> None:
    """Print the results table and the targets (and with ``markdown`` both again, ready to paste)."""
    rows = table_rows(doc)
    tgt = [[t["target"], t["shown"], {True: "yes", False: "**no**", None: "not measured"}[t["met"]]] for t in doc.get("targets") or targets(doc)]
    smoke = " SMOKE RUN (CPU, tiny shapes): not a measurement." if doc.get("smoke") else ""
    print(f"\ndevice check: {doc['machine'].get('cuda') or 'cpu'}, {doc.get('elapsed_s', 0):.0f} s of a {doc['budget_s']:.0f} s budget.{smoke}")
    print_table(HEADERS, rows)
    print()
    print_table(["target", "measured", "met?"], tgt)
    if markdown:
        m = doc["machine"]
        print("\n<!-- paste into docs/benchmarks.md -->")
        print(f"`{doc['command']}` ({m['utc']}, {m.get('cuda') or 'cpu'}, torch {m['torch']}, "
              f"transformers {doc.get('transformers', '?')}, {doc.get('elapsed_s', 0):.0f} s){smoke}\n")
        print(markdown_table(HEADERS, rows))
        print()
        print(markdown_table(["target", "measured", "met?"], tgt))
    sys.stdout.flush()


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-s", type=float, default=420.0, help="wall-clock budget; sections that would overrun are skipped")
    ap.add_argument("--grace-s", type=float, default=30.0, help="the watchdog ends the run this long after the budget")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, a handful of steps: checks every code path (not a measurement)")
    ap.add_argument("--markdown", action="store_true", help="also print the tables as Markdown for docs/benchmarks.md")
    ap.add_argument("--only", help=f"comma-separated sections to run (plus their prerequisites): {','.join(PLAN)}")
    ap.add_argument("--skip", help="comma-separated sections not to run")
    ap.add_argument("--batches", help="Orpheus eager batch sizes (default 1,8,32,64)")
    ap.add_argument("--graph-batches", help="Orpheus CUDA-graph batch sizes (default 1,8)")
    ap.add_argument("--hf-batches", help="transformers batch sizes, static cache without compile (default 1,8)")
    ap.add_argument("--hf-compiled-batches", help="transformers batch sizes, static cache compiled (default 1,8)")
    ap.add_argument("--backbone-batches", help="Qwen3-Omni / BAGEL batch sizes (default 1,16)")
    ap.add_argument("--steps", type=int, help="steady decode steps timed per Orpheus batch (default 128)")
    ap.add_argument("--prefill-chunk", type=int, help="Engine prefill_chunk for the eager engine (default 512, the product's)")
    ap.add_argument("--results-dir", type=Path, help="where the JSON goes (default bench/results)")
    # For tests of the harness itself: SECTION=error makes that section raise, SECTION=hang makes it sleep.
    ap.add_argument("--inject", action="append", default=[], help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def injected(spec: list[str]) -> dict[str, Callable[[Ctx, dict[str, Any]], None]]:
    """Section replacements for ``--inject SECTION=error|hang`` (harness tests only)."""

    def error(ctx: Ctx, rec: dict[str, Any]) -> None:
        raise RuntimeError("injected failure (--inject)")

    def hang(ctx: Ctx, rec: dict[str, Any]) -> None:
        time.sleep(3600)

    out = {}
    for item in spec:
        name, _, what = item.partition("=")
        if name not in SECTIONS or what not in ("error", "hang"):
            raise SystemExit(f"--inject wants SECTION=error|hang, got {item!r}")
        out[name] = error if what == "error" else hang
    return out


def make_config(args: argparse.Namespace) -> Config:
    cfg = Config.smoke() if args.smoke else Config()
    overrides: dict[str, Any] = {}
    for name in ("batches", "graph_batches", "hf_batches", "hf_compiled_batches", "backbone_batches"):
        if getattr(args, name):
            overrides[name] = parse_ns(getattr(args, name))
    for name in ("steps", "prefill_chunk"):
        if getattr(args, name):
            overrides[name] = getattr(args, name)
    return replace(cfg, **overrides)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("bench/gpu.py needs a CUDA GPU, and torch.cuda.is_available() is False here: nothing was measured.\n"
              "Run it on a machine with an NVIDIA GPU (or use --smoke to check the script itself on CPU).", file=sys.stderr)
        return 2
    cfg = make_config(args)
    selected = select_sections(args.only, args.skip)
    device = torch.device("cpu") if args.smoke else torch.device("cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    import transformers

    doc: dict[str, Any] = {
        "bench": "gpu", "smoke": args.smoke, "command": "python " + " ".join(sys.argv), "machine": machine_info(),
        "transformers": transformers.__version__, "device": str(device), "dtype": str(dtype),
        "config": {f.name: getattr(cfg, f.name) for f in fields(cfg)}, "selected": selected,
    }
    on_start, on_end = memory_hooks(device)
    run = Sections("gpu_smoke" if args.smoke else "gpu", doc, args.budget_s, directory=args.results_dir, on_start=on_start, on_end=on_end)
    ctx = Ctx(cfg, device, dtype, args.smoke, run, selected=selected)
    sections = {**SECTIONS, **injected(args.inject)}
    run.start_watchdog(args.grace_s, on_timeout=lambda: report(doc, args.markdown))
    for name in PLAN:
        if name not in selected:
            run.skip(name, "not selected (--only / --skip)")
            continue
        run.run(name, lambda rec, _n=name: sections[_n](ctx, rec), estimate_s=ctx.estimate(name), requires=REQUIRES.get(name, ()))
    doc["targets"] = targets(doc)
    doc["complete"] = True
    path = run.save()
    report(doc, args.markdown)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
