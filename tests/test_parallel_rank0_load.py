"""Rank 0's loading of a published-layout checkpoint under tensor parallelism (no processes): the
family's loader leaves exactly the sharded backbone on the meta device and loads the rest, and the
slices rank 0 then reads from the files are the right parts of the full tensors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mstar.errors import WeightsError
from mstar.models.qwen3_omni.config import TINY_CONFIG
from mstar.models.qwen3_omni.weights import backbone_specs, load_model, random_state_dict
from mstar.parallel.group import Comm
from mstar.parallel.rank0 import NOTHING, deferred
from mstar.parallel.shard import from_safetensors, load_shard, shard_module
from mstar.weights import tiny_state_dict

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("qwen3_omni")
    state = tiny_state_dict("qwen3_omni", TINY_CONFIG, lambda: random_state_dict(TINY_CONFIG))
    save_file(state, str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps(TINY_CONFIG))
    return root, state


def test_one_rank_defers_nothing() -> None:
    assert deferred(1, lambda: pytest.fail("specs are not described at one rank")) is NOTHING
    assert "thinker.model.language_model.layers.0.mlp.gate.weight" not in NOTHING


def test_rank0_leaves_the_backbones_on_meta_and_reads_its_slices(checkpoint: tuple[Path, dict[str, torch.Tensor]]) -> None:
    root, state = checkpoint
    cfg, model, ckpt = load_model(str(root), torch.device("cpu"), torch.float32, tensor_parallel_size=2)
    specs = backbone_specs(cfg, ckpt)
    defer = deferred(2, lambda: specs)
    on_meta = {n for n, p in model.named_parameters() if p.is_meta}
    assert on_meta == {n for n in state if n in defer}  # exactly the sharded stacks, nothing else
    assert any(n.startswith("thinker.model.language_model.layers.") for n in on_meta)
    assert not model.thinker.model.language_model.embed_tokens.weight.is_meta  # stays whole on rank 0
    assert not model.talker.model.codec_embedding.weight.is_meta
    torch.testing.assert_close(model.thinker.lm_head.weight, state["thinker.lm_head.weight"])

    thinker = model.thinker.model.language_model
    plan = shard_module(thinker, Comm(0, 2, torch.device("cpu")), skip=specs[0].skip)
    load_shard(thinker, plan, from_safetensors(specs[0].files, specs[0].prefix, 0, 2), device=torch.device("cpu"), dtype=torch.float32)
    name = "layers.0.self_attn.q_proj.weight"
    full = state[specs[0].prefix + name]
    torch.testing.assert_close(thinker.get_parameter(name), full[: full.shape[0] // 2])
    down = "layers.0.mlp.experts.down_proj"
    full = state[specs[0].prefix + down]
    torch.testing.assert_close(thinker.get_parameter(down), full[..., : full.shape[-1] // 2])


def test_a_checkpoint_missing_a_tensor_the_rank_keeps_is_refused(
    checkpoint: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    from safetensors.torch import save_file

    _, state = checkpoint
    broken = {k: v for k, v in state.items() if k != "thinker.model.language_model.embed_tokens.weight"}
    save_file(broken, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(TINY_CONFIG))
    with pytest.raises(WeightsError, match="embed_tokens"):
        load_model(str(tmp_path), torch.device("cpu"), torch.float32, tensor_parallel_size=2)
