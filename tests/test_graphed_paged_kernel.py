"""The CUDA-graph decode layout (full-width block tables, lengths only in a device tensor, one
shape per batch bucket) gives the eager results when attention goes to the paged kernel.

The kernel runs here through Triton's CPU interpreter, in a child process (the interpreter is
chosen when triton is first imported), so this checks on CPU the metadata a captured graph
replays on the GPU.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed: pip install 'mstar[gpu]'"),
]

ROOT = Path(__file__).resolve().parent.parent


def _child() -> None:
    import torch

    from mstar.layers import attention
    from mstar.layers.attention import AttnBatch
    from mstar.layers.graphed_decode import BucketedDecoder
    from mstar.layers.llama import LlamaConfig, LlamaForCausalLM

    # Decode steps go to the paged kernel, as they would on a GPU.
    attention.use_paged_kernel = lambda q, pool, mask: q.shape[2] == 1 and mask is None  # type: ignore[assignment]
    cfg = LlamaConfig(
        vocab_size=200, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, rope_theta=10000.0,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    prompts = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19], [20]]
    caches = [model.new_cache(6, 48, device="cpu", dtype=torch.float32, block_size=4) for _ in range(2)]
    slots = [[c.allocate() for _ in prompts] for c in caches]
    scratch = caches[1].allocate()
    decoder = BucketedDecoder(model, caches[1], scratch, max_batch=4, per_batch_only=True)
    last: list[list[int]] = [[], []]
    worst, widths = 0.0, set()
    with torch.inference_mode():
        for k, cache in enumerate(caches):
            for slot, p in zip(slots[k], prompts, strict=True):
                batch = AttnBatch.build(cache, [slot], [len(p)], device="cpu")
                last[k].append(int(model(torch.tensor([p]), cache, batch).argmax(-1)))
                batch.commit(cache)
        for step in range(8):
            live = slice(0, 4 if step < 4 else 3)  # the fourth request leaves half way
            batch = AttnBatch.build(caches[0], slots[0][live], [1] * len(slots[0][live]), device="cpu")
            eager = model(torch.tensor([[t] for t in last[0][live]]), caches[0], batch)
            batch.commit(caches[0])
            padded = decoder(last[1][live], slots[1][live])
            worst = max(worst, float((padded - eager).abs().max()))
            assert padded.argmax(-1).tolist() == eager.argmax(-1).tolist()
            last = [eager.argmax(-1).tolist() + last[0][live.stop :], padded.argmax(-1).tolist() + last[1][live.stop :]]
            widths.add(caches[1].blocks_per_slot)
    print(json.dumps({
        "worst": worst,
        "lengths_equal": caches[0].lengths[:4] == caches[1].lengths[:4],
        "scratch_length": caches[1].lengths[scratch],
        "per_batch_only": decoder.per_batch_only,
    }))


def test_full_width_tables_and_device_lengths_decode_like_eager() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", "from tests.test_graphed_paged_kernel import _child; _child()"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["per_batch_only"] and got["lengths_equal"] and got["scratch_length"] == 0
    assert got["worst"] < 1e-4
