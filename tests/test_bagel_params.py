"""The full BAGEL-7B-MoT build has exactly the published checkpoint's tensor names and shapes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mstar.codecs.flux_vae import AutoEncoder
from mstar.errors import WeightsError
from mstar.models.bagel.config import BagelConfig
from mstar.models.bagel.model import Bagel
from mstar.models.bagel.weights import build_models, load_checkpoint

FIXTURES = Path(__file__).parent / "fixtures"


def param_shapes(module: torch.nn.Module) -> dict[str, list[int]]:
    """Names and shapes of everything the checkpoint holds for ``module`` (parameters and persistent buffers)."""
    return {k: list(v.shape) for k, v in module.state_dict().items()}


def _fixture(name: str) -> dict[str, list[int]]:
    return json.loads((FIXTURES / name).read_text())  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def full_models() -> tuple[Bagel, AutoEncoder]:
    return build_models(BagelConfig.full(), device="meta")


def test_full_model_matches_published_ema_names_and_shapes(full_models: tuple[Bagel, AutoEncoder]) -> None:
    assert param_shapes(full_models[0]) == _fixture("bagel_ema_params.json")


def test_full_vae_matches_published_ae_names_and_shapes(full_models: tuple[Bagel, AutoEncoder]) -> None:
    assert param_shapes(full_models[1]) == _fixture("bagel_ae_params.json")


def test_published_configs_give_the_full_shapes(tmp_path: Path) -> None:
    # The published vit_config.json lists 27 layers; the model keeps 26 (features from the penultimate one).
    (tmp_path / "llm_config.json").write_text(
        json.dumps(
            {
                "hidden_size": 3584,
                "intermediate_size": 18944,
                "num_hidden_layers": 28,
                "num_attention_heads": 28,
                "num_key_value_heads": 4,
                "vocab_size": 152064,
                "rope_theta": 1000000.0,
                "rms_norm_eps": 1e-6,
            }
        )
    )
    (tmp_path / "vit_config.json").write_text(
        json.dumps(
            {
                "hidden_size": 1152,
                "intermediate_size": 4304,
                "num_hidden_layers": 27,
                "num_attention_heads": 16,
                "image_size": 980,
                "patch_size": 14,
            }
        )
    )
    cfg = BagelConfig.from_checkpoint_dir(tmp_path)
    assert cfg == BagelConfig.full()
    assert cfg.vit.num_hidden_layers == 26


def test_checkpoint_with_wrong_names_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    cfg = BagelConfig.tiny()
    model, vae = build_models(cfg)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["language_model.model.extra.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / "ema.safetensors"))
    save_file({k: v.clone() for k, v in vae.state_dict().items()}, str(tmp_path / "ae.safetensors"))
    with pytest.raises(WeightsError, match="unexpected"):
        load_checkpoint(tmp_path, model, vae, torch.device("cpu"), torch.float32)


def test_checkpoint_files_load_strictly(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    cfg = BagelConfig.tiny()
    torch.manual_seed(0)
    src_model, src_vae = build_models(cfg)
    save_file({k: v.to(torch.bfloat16) for k, v in src_model.state_dict().items()}, str(tmp_path / "ema.safetensors"))
    save_file(dict(src_vae.state_dict()), str(tmp_path / "ae.safetensors"))
    model, vae = build_models(cfg, device="meta")
    load_checkpoint(tmp_path, model, vae, torch.device("cpu"), torch.float32)
    w = model.language_model.model.layers[1].self_attn.k_proj_moe_gen.weight
    assert w.dtype == torch.float32 and w.device.type == "cpu"
    ref = src_model.language_model.model.layers[1].self_attn.k_proj_moe_gen.weight
    assert torch.equal(w, ref.to(torch.bfloat16).float())
    assert torch.equal(vae.decoder.conv_out.weight, src_vae.decoder.conv_out.weight)


def test_checkpoint_tokenizer_supplies_marker_ids(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models

    from mstar.models.bagel.prepare import with_marker_ids
    from mstar.models.bagel.tokenizer import load_tokenizer

    vocab = {"a": 0, "<|im_start|>": 7, "<|im_end|>": 8, "<|vision_start|>": 9, "<|vision_end|>": 10}
    Tokenizer(models.WordLevel(vocab, unk_token="a")).save(str(tmp_path / "tokenizer.json"))
    cfg = with_marker_ids(BagelConfig.tiny(), load_tokenizer(tmp_path))
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.start_of_image, cfg.end_of_image) == (7, 8, 9, 10)
    with pytest.raises(WeightsError, match="no tokenizer"):
        load_tokenizer(tmp_path / "nowhere")
