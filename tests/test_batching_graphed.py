"""The static-shape decode path (batch and context padded to buckets) gives the eager results.

On CUDA that path is compiled into CUDA graphs; the padding bookkeeping is the
same on every device, so it is checked here on CPU without compilation.
"""

from __future__ import annotations

import pytest
import torch

from mstar.layers import attention
from mstar.layers.attention import AttnBatch
from mstar.layers.graphed_decode import BucketedDecoder, bucket_for
from mstar.layers.llama import LlamaConfig, LlamaForCausalLM

CFG = LlamaConfig(
    vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, rope_theta=10000.0,
)


def test_bucket_sizes() -> None:
    assert [bucket_for(n, [1, 2, 4, 8]) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 9]


@pytest.mark.parametrize("per_row", [True, False], ids=["cpu-per-row-attention", "batched-attention"])
def test_padded_decode_matches_eager_decode_and_keeps_the_scratch_slot_empty(per_row: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # Batched attention (the GPU path) reads the padded context through the bucket mask.
    monkeypatch.setattr(attention, "PER_ROW_ON_CPU", per_row)
    torch.manual_seed(0)
    model = LlamaForCausalLM(CFG).eval()
    prompts = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11], [12], [13, 14, 15, 16]]
    caches = [model.new_cache(8, 64, device="cpu", dtype=torch.float32) for _ in range(2)]
    slots: list[list[int]] = []
    for c in caches:
        got = [c.allocate() for _ in prompts]
        assert None not in got
        slots.append([s for s in got if s is not None])
    scratch = caches[1].allocate()
    assert scratch is not None
    decoder = BucketedDecoder(model, caches[1], scratch, max_batch=8, context_block=16)
    last: list[list[int]] = [[], []]
    with torch.inference_mode():
        for k, cache in enumerate(caches):  # the same prefill into both caches
            for slot, p in zip(slots[k], prompts, strict=True):
                batch = AttnBatch.build(cache, [slot], [len(p)], device="cpu")
                last[k].append(int(model(torch.tensor([p]), cache, batch).argmax(-1)))
                batch.commit(cache)
        # Requests leave one by one: 5, 4, 3, 2 and 1 live rows run in buckets of 8, 4, 4, 2 and 1.
        for n_live in (5, 5, 4, 3, 3, 2, 1, 1):
            live = slice(0, n_live)
            batch = AttnBatch.build(caches[0], slots[0][live], [1] * len(slots[0][live]), device="cpu")
            eager = model(torch.tensor([[t] for t in last[0][live]]), caches[0], batch)
            batch.commit(caches[0])
            padded = decoder(last[1][live], slots[1][live])
            assert padded.shape == eager.shape
            if per_row:
                assert torch.equal(padded, eager)  # bitwise: the CPU path is batch-invariant
            else:
                torch.testing.assert_close(padded, eager, rtol=1e-5, atol=1e-5)
            last[0][live] = last[1][live] = eager.argmax(-1).tolist()
    assert [caches[1].lengths[s] for s in slots[1]] == [caches[0].lengths[s] for s in slots[0]]
    assert caches[1].lengths[scratch] == 0
