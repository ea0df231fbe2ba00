"""The full Qwen3-Omni module tree has the published checkpoint's parameter names and shapes (on meta)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

FIXTURE = Path(__file__).parent / "fixtures" / "qwen3_omni_params.json"


@pytest.mark.slow
def test_full_model_parameter_names_and_shapes_match_transformers() -> None:
    from mstar.models.qwen3_omni.config import FULL_CONFIG
    from mstar.models.qwen3_omni.weights import build_model

    expected = json.loads(FIXTURE.read_text())
    model = build_model(FULL_CONFIG, "meta")
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(expected["parameters"]) - set(ours)) == []
    assert sorted(set(ours) - set(expected["parameters"])) == []
    assert {k: v for k, v in ours.items() if expected["parameters"][k] != v} == {}
    # 35.3B parameters: the published model card's size (30B-A3B Thinker + Talker + Code2Wav + encoders).
    assert sum(v.numel() for v in model.state_dict().values()) == expected["total_parameters"]
    assert 35.0e9 < expected["total_parameters"] < 35.6e9


def test_checkpoint_with_a_wrong_tensor_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from mstar.errors import WeightsError
    from mstar.models.qwen3_omni.config import TINY_CONFIG
    from mstar.models.qwen3_omni.weights import load_model, random_state_dict

    torch.manual_seed(0)
    state = random_state_dict(TINY_CONFIG)
    state.pop("thinker.lm_head.weight")
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(TINY_CONFIG))
    with pytest.raises(WeightsError):
        load_model(str(tmp_path), torch.device("cpu"), torch.float32)


def test_checkpoint_directory_loads_like_the_tiny_variant(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from mstar.models.qwen3_omni.config import TINY_CONFIG
    from mstar.models.qwen3_omni.weights import load_model, random_state_dict
    from mstar.weights import tiny_state_dict

    state = tiny_state_dict("qwen3_omni", TINY_CONFIG, lambda: random_state_dict(TINY_CONFIG))
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(TINY_CONFIG))
    _cfg, model, ckpt = load_model(str(tmp_path), torch.device("cpu"), torch.float32)
    assert ckpt == tmp_path
    torch.testing.assert_close(model.thinker.lm_head.weight, state["thinker.lm_head.weight"])


def test_a_talker_whose_speakers_differ_from_the_registry_is_refused(tmp_path: Path) -> None:
    import copy

    from safetensors.torch import save_file

    from mstar.errors import WeightsError
    from mstar.models.qwen3_omni.config import TINY_CONFIG
    from mstar.models.qwen3_omni.runner import Qwen3OmniRunner
    from mstar.models.qwen3_omni.weights import random_state_dict
    from mstar.registry import get_model_info
    from mstar.settings import RunnerSettings
    from mstar.weights import tiny_state_dict

    assert {v.lower() for v in get_model_info("qwen3_omni").voices} == set(TINY_CONFIG["talker_config"]["speaker_id"])
    cfg = copy.deepcopy(TINY_CONFIG)
    cfg["talker_config"]["speaker_id"] = {"chelsie": 2301, "ethan": 2302, "bob": 2303}
    save_file(
        tiny_state_dict("qwen3_omni", TINY_CONFIG, lambda: random_state_dict(TINY_CONFIG)),
        str(tmp_path / "model.safetensors"),
    )
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match="bob"):
        Qwen3OmniRunner(weights=str(tmp_path), settings=RunnerSettings())
