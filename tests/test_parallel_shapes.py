"""The full published backbones, built on the meta device and sharded for 2 and 4 ranks, give every
rank the checkpoint's parameter names with about 1/N of each sharded tensor (checked against the
published names and shapes in tests/fixtures, with the split rules written out here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from mstar.parallel.group import Comm
from mstar.parallel.shard import params_on_meta, shard_module
from mstar.parallel.spec import BackboneSpec

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

FIXTURES = Path(__file__).parent / "fixtures"
META = torch.device("meta")


def _orpheus() -> tuple[BackboneSpec, dict[str, list[int]], int]:
    from mstar.models.orpheus.config import FULL_LLAMA

    fixture = json.loads((FIXTURES / "orpheus_3b_params.json").read_text())
    spec = BackboneSpec("mstar.layers.llama:LlamaForCausalLM", FULL_LLAMA, "forward", ())
    return spec, fixture["parameters"], FULL_LLAMA.head_dim


def _qwen3(which: int) -> tuple[BackboneSpec, dict[str, list[int]], int]:
    from mstar.models.qwen3_omni.config import FULL_CONFIG, head_dim
    from mstar.models.qwen3_omni.weights import backbone_specs

    spec = backbone_specs(FULL_CONFIG, Path("/nonexistent"))[which]
    params = json.loads((FIXTURES / "qwen3_omni_params.json").read_text())["parameters"]
    return spec, params, head_dim(spec.config)


def _bagel() -> tuple[BackboneSpec, dict[str, list[int]], int]:
    from mstar.models.bagel.config import BagelConfig
    from mstar.models.bagel.weights import backbone_spec

    cfg = BagelConfig.full()
    spec = backbone_spec(cfg, Path("/nonexistent"))
    return spec, json.loads((FIXTURES / "bagel_ema_params.json").read_text()), cfg.llm.head_dim


BACKBONES = {
    "orpheus": _orpheus,
    "qwen3_omni_thinker": lambda: _qwen3(0),
    "qwen3_omni_talker": lambda: _qwen3(1),
    "bagel": _bagel,
}


def _rank_module(spec: BackboneSpec, rank: int, world: int) -> nn.Module:
    """What a worker builds (rank 0 holds the same backbone plus the rank-0-only parts)."""
    with params_on_meta():
        module = spec.builder()(spec.config)
    for name in spec.skip:
        owner, _, leaf = name.rpartition(".")
        setattr(module.get_submodule(owner), leaf, None)
    shard_module(module, Comm(rank, world, META))
    return module


def _expected_local(name: str, full: list[int], rank: int, world: int, head_dim: int) -> list[int]:
    """The split rules (Megatron layout), written independently of mstar/parallel/shard.py."""
    shape = list(full)
    leaf = name.rsplit(".", 2)
    if name.endswith(("embed_tokens.weight", "lm_head.weight")):
        per = -(-shape[0] // world)
        shape[0] = max(0, min(per, shape[0] - rank * per))
    elif any(p in name for p in (".k_proj", ".v_proj")):
        heads = shape[0] // head_dim
        shape[0] = (heads // world if heads >= world else 1) * head_dim
    elif any(p in name for p in (".q_proj", ".gate_proj", ".up_proj")):
        shape[0] //= world
    elif any(p in name for p in (".o_proj", ".down_proj.weight")) and "experts" not in leaf[0]:
        shape[1] //= world
    elif name.endswith("experts.gate_up_proj"):
        shape[1] //= world
    elif name.endswith("experts.down_proj"):
        shape[2] //= world
    return shape


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_each_rank_holds_the_checkpoint_names_and_its_share_of_the_shapes(backbone: str, world: int) -> None:
    spec, published, head_dim = BACKBONES[backbone]()
    mine = {
        k[len(spec.prefix) :]: v
        for k, v in published.items()
        if k.startswith(spec.prefix) and not any(k[len(spec.prefix) :].startswith(s + ".") for s in spec.skip)
    }
    full_total = sum(torch.Size(v).numel() for v in mine.values())
    for rank in range(world):
        module = _rank_module(spec, rank, world)
        local = {n: list(p.shape) for n, p in module.named_parameters()}
        assert set(local) == set(mine)
        for name, full in mine.items():
            assert local[name] == _expected_local(name, full, rank, world, head_dim), name
        held = sum(p.numel() for p in module.parameters())
        # About 1/N: norms, routers and replicated key/value heads are the only extra.
        assert held / full_total == pytest.approx(1 / world, abs=0.02), (rank, held / full_total)
