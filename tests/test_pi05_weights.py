"""Pi0.5 checkpoints: the published names and shapes, strict loading, config.json and the tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mstar.errors import WeightsError
from mstar.models.pi05.config import FULL, TINY, Pi05Config, config_from_lerobot
from mstar.models.pi05.prompt import BOS_ID, HFTokenizer
from mstar.models.pi05.weights import build_model, load_checkpoint, tiny_model

FIXTURE = Path(__file__).parent / "fixtures" / "pi05_params.json"
EMBED = "paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight"
TOWER = "paligemma_with_expert.paligemma.model.vision_tower.vision_model."
VLM_HEAD = "paligemma_with_expert.paligemma.lm_head.weight"
EXPERT_HEAD = "paligemma_with_expert.gemma_expert.lm_head.weight"


def _published_layout(cfg: Pi05Config) -> dict[str, tuple[int, ...]]:
    """Names and shapes lerobot publishes for our module tree: 'model.' prefix, the embedding saved as the
    tied LM head, plus the expert's unused LM head (computed on the meta device)."""
    out = {"model." + (VLM_HEAD if k == EMBED else k): tuple(v.shape) for k, v in build_model(cfg).state_dict().items()}
    out["model." + EXPERT_HEAD] = (cfg.vocab_size, cfg.expert.width)
    return out


def test_full_variant_has_exactly_the_published_names_and_shapes() -> None:
    published = {k: tuple(v) for k, v in json.loads(FIXTURE.read_text())["params"].items()}
    ours = _published_layout(FULL)
    assert sorted(set(published) - set(ours)) == []
    assert sorted(set(ours) - set(published)) == []
    assert {k: v for k, v in ours.items() if published[k] != v} == {}
    # The sizes the issue names: 2048-wide Gemma-2B, 1024-wide expert, SigLIP so400m, 32 <-> 1024 action projections.
    assert ours["model.paligemma_with_expert.paligemma.lm_head.weight"] == (257152, 2048)
    assert ours["model.action_in_proj.weight"] == (1024, 32)
    assert ours["model.paligemma_with_expert.gemma_expert.model.layers.17.input_layernorm.dense.weight"] == (3072, 1024)
    assert ours["model." + TOWER + "encoder.layers.26.mlp.fc1.weight"] == (4304, 1152)
    assert not any("state_proj" in k for k in ours)


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    return {
        k: v.clone() for k, v in tiny_model(TINY, device=torch.device("cpu"), dtype=torch.float32).state_dict().items()
    }


def _publish(state: dict[str, torch.Tensor], path: Path, *, rename: dict[str, str | None] | None = None) -> Path:
    """Write ``state`` the way lerobot publishes it: 'model.' prefix, embedding saved as the tied LM head."""
    out = {}
    for name, t in state.items():
        key = "model." + (VLM_HEAD if name == EMBED else name)
        out[key] = t
    out["model." + EXPERT_HEAD] = torch.zeros(TINY.vocab_size, TINY.expert.width)
    for old, new in (rename or {}).items():
        t = out.pop(old)
        if new is not None:
            out[new] = t
    path.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path / "model.safetensors"))
    return path


def test_a_checkpoint_in_the_published_layout_loads_every_tensor(
    tmp_path: Path, tiny_state: dict[str, torch.Tensor]
) -> None:
    model = load_checkpoint(_publish(tiny_state, tmp_path), TINY, device=torch.device("cpu"), dtype=torch.float32)
    loaded = model.state_dict()
    assert set(loaded) == set(tiny_state)
    for name, t in tiny_state.items():
        torch.testing.assert_close(loaded[name], t, rtol=0, atol=0, msg=name)


def test_transformers5_siglip_names_without_vision_model_are_accepted(
    tmp_path: Path, tiny_state: dict[str, torch.Tensor]
) -> None:
    old = "model." + TOWER + "post_layernorm.weight"
    new = old.replace("vision_tower.vision_model.", "vision_tower.")
    model = load_checkpoint(
        _publish(tiny_state, tmp_path, rename={old: new}), TINY, device=torch.device("cpu"), dtype=torch.float32
    )
    torch.testing.assert_close(
        model.state_dict()[TOWER + "post_layernorm.weight"], tiny_state[TOWER + "post_layernorm.weight"]
    )


def test_a_missing_tensor_is_a_weights_error_naming_it(tmp_path: Path, tiny_state: dict[str, torch.Tensor]) -> None:
    gone = "model.time_mlp_in.bias"
    with pytest.raises(WeightsError, match="missing.*time_mlp_in.bias"):
        load_checkpoint(
            _publish(tiny_state, tmp_path, rename={gone: None}), TINY, device=torch.device("cpu"), dtype=torch.float32
        )


def test_an_unexpected_tensor_is_a_weights_error(tmp_path: Path, tiny_state: dict[str, torch.Tensor]) -> None:
    # pi0 (not pi0.5) has a state projection; a pi0 checkpoint must not load silently.
    state = dict(tiny_state, **{"state_proj.weight": torch.zeros(32, 32)})
    with pytest.raises(WeightsError, match="unexpected.*state_proj"):
        load_checkpoint(_publish(state, tmp_path), TINY, device=torch.device("cpu"), dtype=torch.float32)


def test_a_tensor_of_the_wrong_shape_is_a_weights_error(tmp_path: Path, tiny_state: dict[str, torch.Tensor]) -> None:
    state = dict(tiny_state, **{"action_out_proj.weight": torch.zeros(16, TINY.expert.width)})
    with pytest.raises(WeightsError, match=r"action_out_proj.weight: \[16, 32\] \(expected \[32, 32\]\)"):
        load_checkpoint(_publish(state, tmp_path), TINY, device=torch.device("cpu"), dtype=torch.float32)


def test_a_directory_without_model_safetensors_is_a_weights_error(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="model.safetensors"):
        load_checkpoint(tmp_path, TINY, device=torch.device("cpu"), dtype=torch.float32)


def test_lerobot_config_json_sets_chunk_size_steps_and_variants(tmp_path: Path) -> None:
    cfg_file = tmp_path / "config.json"
    cfg_file.write_text(
        json.dumps(
            {
                "type": "pi05",
                "paligemma_variant": "gemma_2b",
                "action_expert_variant": "gemma_300m",
                "chunk_size": 40,
                "num_inference_steps": 5,
                "max_action_dim": 32,
                "image_resolution": [224, 224],
                "tokenizer_max_length": 200,
            }
        )
    )
    cfg = config_from_lerobot(cfg_file)
    assert (cfg.chunk_size, cfg.num_steps, cfg.vlm.width, cfg.expert.width) == (40, 5, 2048, 1024)
    cfg_file.write_text(json.dumps({"type": "pi0"}))
    with pytest.raises(WeightsError, match="pi0"):
        config_from_lerobot(cfg_file)


def _tokenizer_json(path: Path, bos: int) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": bos, "Task:": 3, "cube": 4, "[UNK]": 5}
    if bos != 2:
        vocab["x"] = 2
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))
    return path


def test_the_paligemma_tokenizer_is_read_from_tokenizer_json(tmp_path: Path) -> None:
    tok = HFTokenizer(_tokenizer_json(tmp_path / "tokenizer.json", BOS_ID))
    assert tok.encode("Task: cube") == [3, 4]  # BOS is added by the runner, not here
    with pytest.raises(WeightsError, match="not a PaliGemma tokenizer"):
        HFTokenizer(_tokenizer_json(tmp_path / "other.json", 7))
