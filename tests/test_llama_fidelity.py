"""The shared Llama decoder gives the same logits as transformers' LlamaForCausalLM."""

from __future__ import annotations

import pytest
import torch

from mstar.layers.attention import AttnBatch
from mstar.layers.llama import LlamaConfig, LlamaForCausalLM

pytestmark = pytest.mark.slow

HF_CONFIG = {
    "vocab_size": 97,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Small matmuls: on a busy 2-core machine, two threads mostly wait on each other.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _models() -> tuple[LlamaForCausalLM, torch.nn.Module]:
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM as HFLlama

    rope = {"rope_theta": HF_CONFIG["rope_theta"], **HF_CONFIG["rope_scaling"]}
    hf_kwargs = {k: v for k, v in HF_CONFIG.items() if k not in ("rope_theta", "rope_scaling")}
    torch.manual_seed(0)
    ref = HFLlama(HFConfig(**hf_kwargs, rope_parameters=rope)).eval()
    with torch.no_grad():
        for p in ref.parameters():  # non-trivial norms too
            p.add_(torch.randn_like(p) * 0.05)
    ours = LlamaForCausalLM(LlamaConfig.from_hf_dict(HF_CONFIG)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def test_prefill_then_decode_of_two_requests_at_different_lengths_matches_transformers() -> None:
    ours, ref = _models()
    torch.manual_seed(1)
    prompts = [torch.randint(0, 97, (9,)), torch.randint(0, 97, (4,))]
    follow = [torch.randint(0, 97, (5,)), torch.randint(0, 97, (5,))]
    cache = ours.new_cache(3, 64, device="cpu", dtype=torch.float32)
    slots = [cache.allocate(), cache.allocate()]
    with torch.no_grad():
        # Prefill both prompts in one padded forward; positions beyond 64 exercise the llama3 scaling band.
        ids = torch.zeros(2, 9, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = p
        batch = AttnBatch.build(cache, slots, [len(p) for p in prompts], device="cpu")
        full = ours(ids, cache, batch, last_only=False)
        batch.commit(cache)
        for i, p in enumerate(prompts):
            want = ref(p[None]).logits[0]
            torch.testing.assert_close(full[i, : len(p)], want, rtol=1e-4, atol=1e-4)
        # Decode five steps for both at once; each step checks the last-position logits.
        seqs = [p.clone() for p in prompts]
        for step in range(5):
            tok = torch.stack([f[step] for f in follow])[:, None]
            batch = AttnBatch.build(cache, slots, [1, 1], device="cpu")
            logits = ours(tok, cache, batch)
            batch.commit(cache)
            for i in range(2):
                seqs[i] = torch.cat([seqs[i], tok[i]])
                want = ref(seqs[i][None]).logits[0, -1]
                torch.testing.assert_close(logits[i], want, rtol=1e-4, atol=1e-4)
    assert cache.lengths[slots[0]] == 14 and cache.lengths[slots[1]] == 9


def test_long_positions_use_llama3_scaled_rope() -> None:
    ours, ref = _models()
    torch.manual_seed(2)
    seq = torch.randint(0, 97, (200,))
    cache = ours.new_cache(1, 256, device="cpu", dtype=torch.float32)
    slot = cache.allocate()
    assert slot is not None
    with torch.no_grad():
        # Two chunks, like chunked prefill.
        out = []
        for chunk in (seq[:128], seq[128:]):
            batch = AttnBatch.build(cache, [slot], [len(chunk)], device="cpu")
            out.append(ours(chunk[None], cache, batch, last_only=False)[0])
            batch.commit(cache)
        torch.testing.assert_close(torch.cat(out), ref(seq[None]).logits[0], rtol=1e-4, atol=1e-4)


def test_rope_table_stays_float32_when_the_model_is_cast_or_built_on_meta() -> None:
    cfg = LlamaConfig.from_hf_dict(HF_CONFIG)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(cfg)
    for m in (model, skeleton):
        assert m._rope_inv_freq.dtype == torch.float32 and m._rope_inv_freq.device.type == "cpu"
    assert "lm_head.weight" in dict(model.named_parameters()) and not any("rope" in k for k in model.state_dict())
    cos, _ = model.rope(torch.tensor([[100_000]]))
    want = torch.cos(100_000 * LlamaForCausalLM(cfg)._rope_inv_freq)
    torch.testing.assert_close(cos[0, 0, : cfg.head_dim // 2], want)
