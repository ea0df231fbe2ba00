"""Decode throughput on a CUDA GPU: full-size Orpheus (random weights, bf16) against the bandwidth bound and transformers.

For each batch size B, B requests decode together (audio tokens forced, so
every step decodes all B). The runner's steps are timed; steady-state decode
tokens/s = B / median step time over the steps where all B rows decode
(sampling included; the SNAC window every 7th step shows in the mean).

Bound: a decode step must read every weight once (tied embedding/head counted
once) plus the KV cache of the batch, so tokens/s <= B * bandwidth / bytes,
with the bandwidth measured here as a large device-to-device copy (read +
write). Baseline: transformers' ``LlamaForCausalLM.generate`` on the same
weights and GPU, the same B prompts, the same sampling settings and mask.

    python bench/gpu.py                          # B = 1,8,32,64, 128 decode steps
    python bench/gpu.py --batches 1,8 --skip-hf
    python bench/gpu.py --cuda-graphs            # decode steps replayed as CUDA graphs
    python bench/gpu.py --cpu-dry-run            # exercise the script on CPU with the bench-size model

Without CUDA (and without --cpu-dry-run) it exits with status 2 and says so.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import _common  # noqa: F401  (sys.path, offline env)
import torch
from _common import machine_info, parse_ns, print_table, write_results


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 20) -> float:
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


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step reads from the weights: every tensor once (a tied head counted once)."""
    unique = {p.data_ptr(): p for p in model.parameters()}
    total = sum(p.numel() * p.element_size() for p in unique.values())
    cfg = model.config  # type: ignore[attr-defined]
    if not cfg.tie_word_embeddings:  # an untied embedding table is only gathered, B rows per step
        emb = model.model.embed_tokens.weight  # type: ignore[union-attr]
        total -= emb.numel() * emb.element_size()
    return total


def kv_bytes_per_step(cfg: Any, batch: int, context: int, elem: int) -> int:
    return batch * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * context * elem


def mstar_decode(engine: Any, batch: int, steps: int, texts: list[str], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Run ``batch`` requests for ``steps`` tokens; time the runner's steps where all rows decode."""
    from _load import run_engine_load

    runner = engine.runner
    original = runner.step
    timings: list[tuple[int, int, float]] = []

    def timed_step(reqs: list[Any]) -> None:
        decoding = sum(1 for r in reqs if r.state.phase == "decode")
        sync(runner.device)
        t0 = time.perf_counter()
        original(reqs)
        sync(runner.device)
        timings.append((len(reqs), decoding, time.perf_counter() - t0))

    runner.step = timed_step
    try:
        res = run_engine_load(engine, texts[:batch], {**kwargs, "max_output_tokens": steps})
    finally:
        runner.step = original
    full = [dt for n, d, dt in timings if n == batch and d == batch]
    steady = full[5:] if len(full) > 10 else full  # skip first-step allocations
    if not steady:
        raise RuntimeError(f"no step decoded all {batch} rows together")
    med = statistics.median(steady)
    mean = statistics.fmean(steady)
    return {
        "batch": batch, "steps_timed": len(steady), "step_median_s": med, "step_mean_s": mean,
        "decode_tok_s": batch / med, "decode_tok_s_incl_snac": batch / mean, "end_to_end_tok_s": res.tokens_per_s,
    }


def hf_decode(models: Any, prompt: list[int], batch: int, steps: int, device: torch.device) -> dict[str, Any]:
    """transformers ``generate`` for ``batch`` copies of ``prompt``, ``steps`` new tokens each."""
    from _orpheus import ForceAudio
    from transformers import LogitsProcessorList

    from mstar.models.orpheus.config import REPETITION_PENALTY, STOP_TOKEN, TEMPERATURE, TOP_P

    ids = torch.tensor([prompt] * batch, device=device)

    def run(n: int) -> float:
        sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            models.hf_lm.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=TEMPERATURE, top_p=TOP_P,
                repetition_penalty=REPETITION_PENALTY, max_new_tokens=n, min_new_tokens=n,
                logits_processor=LogitsProcessorList([ForceAudio(len(prompt), models.llama_cfg.vocab_size, device)]),
                eos_token_id=STOP_TOKEN, pad_token_id=STOP_TOKEN,
            )
        sync(device)
        return time.perf_counter() - t0

    run(4)  # warm-up
    short, long = run(8), run(8 + steps)
    per_step = (long - short) / steps  # prefill and set-up cancel out
    return {"batch": batch, "step_s": per_step, "decode_tok_s": batch / per_step, "end_to_end_tok_s": batch * (8 + steps) / long}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--steps", type=int, default=128, help="decode steps per request")
    ap.add_argument("--skip-hf", action="store_true", help="skip the transformers baseline")
    ap.add_argument("--cuda-graphs", action="store_true", help="decode through the static-shape CUDA-graph path (Engine(cuda_graphs=True))")
    ap.add_argument("--cpu-dry-run", action="store_true", help="run the script's logic on CPU with the bench-size model (not a measurement)")
    args = ap.parse_args(argv)
    info = machine_info()  # load average before the run
    batches = parse_ns(args.batches)

    if args.cpu_dry_run:
        device, dtype, size = torch.device("cpu"), torch.float32, "bench"
    elif not torch.cuda.is_available():
        print("bench/gpu.py needs a CUDA GPU, and torch.cuda.is_available() is False here: nothing was measured.\n"
              "Run it on a machine with an NVIDIA GPU (or use --cpu-dry-run to check the script itself).", file=sys.stderr)
        return 2
    else:
        device, dtype, size = torch.device("cuda"), torch.bfloat16, "full"

    from _orpheus import bench_engine, bench_models, bench_texts, orpheus_kwargs, prompt_ids

    models = bench_models(size, device=device, dtype=dtype, baseline=not args.skip_hf)
    engine, desc = bench_engine(size, device=device, dtype=dtype, max_batch_size=max(batches), max_seq_len=512, models=models, cuda_graphs=args.cuda_graphs)
    texts = [bench_texts(1)[0]] * max(batches)  # identical prompts: the HF batch needs no padding
    kwargs = orpheus_kwargs(args.steps)
    bw = copy_bandwidth(device, nbytes=(1 << 30) if device.type == "cuda" else (1 << 26))
    wbytes = weight_bytes(models.lm)
    prompt = prompt_ids(engine, texts[0])
    context = len(prompt) + args.steps // 2
    elem = torch.tensor([], dtype=dtype).element_size()
    print(f"orpheus-{size} on {device} ({dtype}): {wbytes / 1e9:.2f} GB of weights, copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)

    engine.generate(text=texts[0], output_modalities=("audio",), **{**kwargs, "max_output_tokens": 35})  # warm-up
    levels: list[dict[str, Any]] = []
    rows: list[list[Any]] = []
    for b in batches:
        ours = mstar_decode(engine, b, args.steps, texts, kwargs)
        step_bytes = wbytes + kv_bytes_per_step(models.llama_cfg, b, context, elem)
        bound = b * bw / step_bytes
        hf = None if args.skip_hf else hf_decode(models, prompt, b, args.steps, device)
        level = {**ours, "bound_tok_s": bound, "fraction_of_bound": ours["decode_tok_s"] / bound, "hf": hf}
        levels.append(level)
        rows.append([
            b, ours["decode_tok_s"], ours["decode_tok_s_incl_snac"], bound, f"{level['fraction_of_bound'] * 100:.0f}%",
            "-" if hf is None else hf["decode_tok_s"], "-" if hf is None else f"{ours['decode_tok_s'] / hf['decode_tok_s']:.2f}x",
        ])
        print(f"  B={b}: {ours['decode_tok_s']:.0f} tok/s", flush=True)
    engine.close()
    print(f"\ndecode throughput: orpheus-{size}, {device}, {dtype}{' (CPU DRY RUN: not a GPU measurement)' if args.cpu_dry_run else ''}")
    print_table(["B", "mstar tok/s", "incl. SNAC", "bound tok/s", "of bound", "HF tok/s", "vs HF"], rows)
    name = ("gpu_dry_run" if args.cpu_dry_run else "gpu") + ("_graphs" if args.cuda_graphs else "")
    path = write_results(name, {
        "bench": "gpu", "command": "python " + " ".join(sys.argv), "machine": info, "model": desc,
        "cuda_graphs": args.cuda_graphs, "copy_bandwidth_bytes_s": bw, "weight_bytes": wbytes, "context_for_kv": context, "steps": args.steps, "levels": levels,
    })
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
