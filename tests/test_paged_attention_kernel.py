"""The Triton paged-decode kernel equals gather + SDPA (what attention.py does) over scattered blocks.

Without a GPU the kernel runs under Triton's interpreter on CPU tensors. The interpreter is chosen
when Triton is imported (``TRITON_INTERPRET=1``), so those cases run in one child process
(``python -m tests.test_paged_attention_kernel``) and this process never sets the variable nor
imports Triton; each case is then reported by its own test. With CUDA the kernel also runs natively,
in this process, against the same reference (and under a captured CUDA graph).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed: pip install 'mstar[gpu]'")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the kernel's native path)")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: (atol, rtol) against a float64 reference computed from the same (rounded) inputs. fp32 is tight; the
#: 16-bit outputs are one rounding away (the interpreter truncates fp32 -> bf16 instead of rounding).
_TOL = {"float32": (2e-6, 2e-5), "bfloat16": (1.6e-2, 1.6e-2), "float16": (2e-3, 2e-3)}


@dataclass(frozen=True)
class Case:
    name: str
    lengths: tuple[int, ...]
    kv_heads: int = 2
    groups: int = 1
    head_dim: int = 64
    block_size: int = 16
    dtype: str = "float32"
    num_splits: int | None = 1
    tile: int | None = None
    scale: float | None = None
    extra_cols: int = 1  # table columns past the longest row's blocks (null-block entries)
    strided_q: bool = False  # q a view with a head stride wider than head_dim
    seed: int = 0


#: Small shapes: the interpreter runs every program in Python (these take about 2 s of kernel time here).
INTERPRETER_CASES = [
    Case("fp32-mha-d64-bs16", (1, 17, 40), groups=1),
    Case("fp32-gqa3-d128-bs32", (33, 5), kv_heads=1, groups=3, head_dim=128, block_size=32),
    Case("fp32-gqa4-d64-bs16", (1, 16, 50, 7), groups=4),
    Case("fp32-gqa4-d128-bs16-tile8", (19, 3), groups=4, head_dim=128, tile=8, strided_q=True),
    Case("fp32-gqa1-d64-bs32-tile64-scale", (70, 32, 1), block_size=32, tile=64, scale=0.3, extra_cols=3),
    Case("fp32-gqa4-split4", (1, 70), groups=4, num_splits=4),
    Case("fp32-gqa3-d128-split3", (65, 2, 0), kv_heads=1, groups=3, head_dim=128, block_size=32, num_splits=3),
    Case("bf16-gqa4-d128-bs16", (1, 23, 48), groups=4, head_dim=128, dtype="bfloat16"),
    Case("bf16-mha-d64-bs32-split2", (45, 9), block_size=32, dtype="bfloat16", num_splits=2),
    Case("fp16-gqa4-d64-bs16", (30, 1), groups=4, dtype="float16"),
    Case("fp32-b1-gqa2-d64-bs16", (150,), kv_heads=1, groups=2),
    Case("bf16-b6-gqa4-d64-bs32", (1, 2, 31, 32, 33, 64), groups=4, block_size=32, dtype="bfloat16"),
]


def _inputs(case: Case, device: str) -> dict[str, Any]:
    """A pool with each row's blocks scattered (shuffled ids), the null block and unused tail positions full of NaN."""
    g = torch.Generator().manual_seed(case.seed)
    dtype = _DTYPES[case.dtype]
    bs, hkv, d = case.block_size, case.kv_heads, case.head_dim
    batch = len(case.lengths)
    blocks = [-(-n // bs) for n in case.lengths]
    cols = max(blocks) + case.extra_cols
    num_blocks = sum(blocks) + 3  # the null block and two blocks nobody holds
    k_pool = torch.full((num_blocks, bs, hkv, d), float("nan"))
    v_pool = torch.full((num_blocks, bs, hkv, d), float("nan"))
    ids = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()
    table = torch.zeros(batch, cols, dtype=torch.long)  # block 0 (the null block) past each row's own
    for b, (n, nb) in enumerate(zip(case.lengths, blocks, strict=True)):
        row = [ids.pop() for _ in range(nb)]
        table[b, :nb] = torch.tensor(row, dtype=torch.long)
        for i, blk in enumerate(row):
            used = min(bs, n - i * bs)  # positions past the row's length stay NaN: the kernel must not read them
            k_pool[blk, :used] = torch.randn(used, hkv, d, generator=g)
            v_pool[blk, :used] = torch.randn(used, hkv, d, generator=g)
    hq = hkv * case.groups
    if case.strided_q:
        q = torch.randn(batch, hq, 2 * d, generator=g)[:, :, :d]
    else:
        q = torch.randn(batch, hq, d, generator=g)
    return {
        "q": q.to(device=device, dtype=dtype),
        "k_pool": k_pool.to(device=device, dtype=dtype),
        "v_pool": v_pool.to(device=device, dtype=dtype),
        "block_table": table.to(device),
        "lengths": torch.tensor(case.lengths, dtype=torch.int32, device=device),
    }


def _gather_sdpa(inp: dict[str, Any], scale: float | None, dtype: torch.dtype) -> torch.Tensor:
    """The existing path, row by row: gather the row's blocks, repeat K/V per group, SDPA in ``dtype``."""
    from mstar.layers.attention import _gather

    q, k_pool, v_pool, table = inp["q"], inp["k_pool"], inp["v_pool"], inp["block_table"]
    groups = q.shape[1] // k_pool.shape[2]
    out = torch.zeros(q.shape, dtype=dtype, device=q.device)
    for b, n in enumerate(inp["lengths"].tolist()):
        if n == 0:
            continue  # no context: the kernel's output is zeros
        keys = _gather(k_pool, table[b : b + 1], n).to(dtype).repeat_interleave(groups, dim=1)
        values = _gather(v_pool, table[b : b + 1], n).to(dtype).repeat_interleave(groups, dim=1)
        out[b] = F.scaled_dot_product_attention(q[b : b + 1, :, None].to(dtype), keys, values, scale=scale)[0, :, 0]
    return out


def _check(case: Case, device: str) -> dict[str, Any]:
    """Run the kernel on ``case``; compare it with float64 and with same-dtype gather + SDPA."""
    from mstar.layers.paged_attention import paged_decode_attention

    inp = _inputs(case, device)
    start = time.perf_counter()
    out = paged_decode_attention(**inp, scale=case.scale, num_splits=case.num_splits, tile=case.tile)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    assert out.shape == inp["q"].shape and out.dtype == inp["q"].dtype
    exact = _gather_sdpa(inp, case.scale, torch.float64)
    same = _gather_sdpa(inp, case.scale, inp["q"].dtype)
    atol, rtol = _TOL[case.dtype]
    torch.testing.assert_close(out.double(), exact, atol=atol, rtol=rtol)
    # As close to the truth as SDPA in the same dtype is (give or take one rounding of the output).
    err, sdpa_err = (out.double() - exact).abs().max().item(), (same.double() - exact).abs().max().item()
    assert err <= 2 * sdpa_err + atol, f"kernel error {err:.3g} vs SDPA's {sdpa_err:.3g}"
    return {"max_err": err, "sdpa_err": sdpa_err, "seconds": seconds}


def _check_cache_decode_step() -> dict[str, Any]:
    """A decode step through KVCache + AttnBatch: the kernel on batch.table equals cached_attention's CPU path."""
    from mstar.layers.attention import AttnBatch, cached_attention
    from mstar.layers.kv_cache import KVCache
    from mstar.layers.paged_attention import paged_decode_attention

    g = torch.Generator().manual_seed(1)
    hkv, hq, d = 2, 8, 64
    cache = KVCache(num_layers=2, num_slots=3, max_len=96, num_kv_heads=hkv, head_dim=d, block_size=16)
    slots = [cache.allocate() for _ in range(3)]
    assert all(s is not None for s in slots)
    rows = [s for s in slots if s is not None]
    for slot, n in zip(rows, (37, 5, 64), strict=True):  # prefill, one row at a time so the blocks interleave
        batch = AttnBatch.build(cache, [slot], [n], device="cpu")
        for layer in range(2):
            kv = torch.randn(2, 1, hkv, n, d, generator=g)
            cached_attention(torch.randn(1, hq, n, d, generator=g), kv[0], kv[1], cache, layer, batch)
        batch.commit(cache)
    batch = AttnBatch.build(cache, rows, [1, 1, 1], device="cpu")
    lengths = torch.tensor([s + n for s, n in zip(batch.starts, batch.new_lens, strict=True)], dtype=torch.int32)
    q, kv = torch.randn(3, hq, 1, d, generator=g), torch.randn(2, 3, hkv, 1, d, generator=g)
    ref = cached_attention(q, kv[0], kv[1], cache, 1, batch)  # writes the new token, then attends
    out = paged_decode_attention(q[:, :, 0], cache.k[1], cache.v[1], batch.table, lengths)
    torch.testing.assert_close(out, ref[:, :, 0], atol=2e-6, rtol=2e-5)
    return {"max_err": (out - ref[:, :, 0]).abs().max().item()}


def _worker() -> None:
    """Child process: run every interpreter case, print one JSON line of results."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from mstar.layers import paged_attention

    results: dict[str, dict[str, Any]] = {}
    interpreted = type(paged_attention._paged_decode_kernel).__name__ == "InterpretedFunction"
    for case in INTERPRETER_CASES:
        try:
            results[case.name] = {**_check(case, "cpu"), "error": None}
        except Exception:  # reported by that case's test
            results[case.name] = {"error": traceback.format_exc()}
        results[case.name]["interpreted"] = interpreted
    try:
        results["kvcache-decode-step"] = {**_check_cache_decode_step(), "error": None, "interpreted": interpreted}
    except Exception:
        results["kvcache-decode-step"] = {"error": traceback.format_exc(), "interpreted": interpreted}
    print("RESULTS " + json.dumps(results))


@pytest.fixture(scope="module")
def interpreted() -> dict[str, dict[str, Any]]:
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "tests.test_paged_attention_kernel"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, f"the interpreter worker failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(lines[-1].removeprefix("RESULTS "))


@pytest.mark.slow
@needs_triton
@pytest.mark.parametrize("case", INTERPRETER_CASES, ids=lambda c: c.name)
def test_interpreted_kernel_matches_gather_sdpa(case: Case, interpreted: dict[str, dict[str, Any]]) -> None:
    result = interpreted[case.name]
    assert result["interpreted"], "the child process did not run the kernel under Triton's interpreter"
    assert result["error"] is None, result["error"]


@pytest.mark.slow
@needs_triton
def test_interpreted_kernel_matches_cached_attention_on_a_kv_cache(interpreted: dict[str, dict[str, Any]]) -> None:
    result = interpreted["kvcache-decode-step"]
    assert result["interpreted"] and result["error"] is None, result["error"]


@needs_triton
def test_bad_arguments_are_refused_before_launch() -> None:
    from mstar.layers import paged_attention
    from mstar.layers.paged_attention import paged_decode_attention

    inp = _inputs(Case("args", (5, 3)), "cpu")
    with pytest.raises(ValueError, match="int32"):
        paged_decode_attention(**{**inp, "lengths": inp["lengths"].long()})
    with pytest.raises(ValueError, match="heads"):
        paged_decode_attention(**{**inp, "q": inp["q"].repeat(1, 1, 2)})
    if not paged_attention._interpreting():
        with pytest.raises(ValueError, match="CUDA"):  # CPU tensors outside the interpreter
            paged_decode_attention(**inp)


def test_without_triton_the_module_imports_and_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from mstar.layers import paged_attention

    monkeypatch.setattr(paged_attention, "HAS_TRITON", False)
    with pytest.raises(ImportError, match=r"mstar\[gpu\]"):
        paged_attention.paged_decode_attention(*_inputs(Case("x", (1,)), "cpu").values())


CUDA_CASES = [
    Case("cuda-fp32-mha-d64-bs16", (1, 17, 40, 1000), groups=1),
    Case("cuda-bf16-gqa4-d128-bs16", (1, 300, 2049, 16, 31, 4096, 7, 512), groups=4, head_dim=128, dtype="bfloat16"),
    Case(
        "cuda-bf16-gqa8-d128-bs32", (5, 777, 3000), kv_heads=8, groups=8, head_dim=128, block_size=32, dtype="bfloat16"
    ),
    Case(
        "cuda-fp16-gqa3-d64-bs32-split8",
        (4096, 1, 100),
        kv_heads=4,
        groups=3,
        block_size=32,
        dtype="float16",
        num_splits=8,
    ),
    Case("cuda-fp32-gqa4-d128-split5", (3333, 64), groups=4, head_dim=128, num_splits=5),
    Case("cuda-bf16-gqa4-d128-auto-split", (8000,), kv_heads=8, groups=4, head_dim=128, dtype="bfloat16", num_splits=0),
]


@needs_cuda
@needs_triton
@pytest.mark.parametrize("case", CUDA_CASES, ids=lambda c: c.name)
def test_cuda_kernel_matches_gather_sdpa(case: Case) -> None:
    if case.num_splits == 0:  # the default: splits chosen from the launch shape
        from mstar.layers.paged_attention import default_num_splits

        assert default_num_splits(len(case.lengths), case.kv_heads, torch.device("cuda")) > 1
        case = replace(case, num_splits=None)
    _check(case, "cuda")


@needs_cuda
@needs_triton
@pytest.mark.parametrize("num_splits", [1, 4])
def test_cuda_graph_replays_as_contexts_grow(num_splits: int) -> None:
    """Captured once, the launch follows new lengths and block tables written in place."""
    from mstar.layers.paged_attention import paged_decode_attention

    g = torch.Generator().manual_seed(0)
    batch, kv_heads, groups, dim, bs, cols = 4, 2, 4, 128, 16, 40
    num_blocks = batch * cols + 1
    pool = lambda: torch.randn(num_blocks, bs, kv_heads, dim, generator=g).to("cuda", torch.bfloat16)  # noqa: E731
    inp: dict[str, Any] = {
        "q": torch.randn(batch, kv_heads * groups, dim, generator=g).to("cuda", torch.bfloat16),
        "k_pool": pool(),
        "v_pool": pool(),
        "block_table": torch.zeros(batch, cols, dtype=torch.long, device="cuda"),
        "lengths": torch.ones(batch, dtype=torch.int32, device="cuda"),
    }

    def run() -> torch.Tensor:
        return paged_decode_attention(**inp, num_splits=num_splits)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for lengths in ([1, 1, 1, 1], [40, 1, 300, 17], [640, 2, 333, 16]):
        inp["lengths"].copy_(torch.tensor(lengths, dtype=torch.int32))
        ids = torch.randperm(num_blocks - 1, generator=g)[: batch * cols] + 1
        inp["block_table"].copy_(ids.view(batch, cols))
        graph.replay()
        torch.testing.assert_close(out, run(), atol=0, rtol=0)
        torch.testing.assert_close(out.double(), _gather_sdpa(inp, None, torch.float64), atol=1.6e-2, rtol=1.6e-2)


if __name__ == "__main__":
    _worker()
