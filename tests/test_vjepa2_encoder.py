"""V-JEPA 2 encoder: parameter names, parity with transformers, checkpoint key mapping, preprocessing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mstar.models.vjepa2.checkpoint import (
    clean_release_keys,
    encoder_config_from_hf,
    encoder_config_from_release,
    load_encoder,
    release_encoder_to_hf,
)
from mstar.models.vjepa2.config import ENCODER_CONFIGS
from mstar.models.vjepa2.encoder import VJEPA2Backbone
from mstar.models.vjepa2.preprocess import resize_center_crop
from tests.fixtures.vjepa2_checkpoints import save_hf_checkpoint

FIXTURES = Path(__file__).parent / "fixtures"
CPU = torch.device("cpu")


def _fixture(name: str) -> dict[str, list[int]]:
    return json.loads((FIXTURES / name).read_text())["params"]  # type: ignore[no-any-return]


def _meta_shapes(cfg_name: str) -> dict[str, list[int]]:
    with torch.device("meta"):
        model = VJEPA2Backbone(ENCODER_CONFIGS[cfg_name])
    return {k: list(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    ("cfg_name", "fixture"), [("vitl", "vjepa2_vitl_params.json"), ("vitg", "vjepa2_vitg_params.json")]
)
def test_encoder_params_match_transformers_names_and_shapes(cfg_name: str, fixture: str) -> None:
    ref = _fixture(fixture)
    encoder_ref = {k: v for k, v in ref.items() if k.startswith("encoder.")}
    assert _meta_shapes(cfg_name) == encoder_ref
    # Everything else in the hub checkpoint is the mask-denoising predictor, which encoding skips.
    assert all(k.startswith("predictor.") for k in set(ref) - set(encoder_ref))


def test_encoder_config_reads_the_published_transformers_config() -> None:
    from transformers import VJEPA2Config

    assert encoder_config_from_hf(VJEPA2Config().to_dict()) == ENCODER_CONFIGS["vitl"]
    vitg = VJEPA2Config(hidden_size=1408, num_hidden_layers=40, num_attention_heads=22, mlp_ratio=48 / 11)
    assert encoder_config_from_hf(vitg.to_dict()) == ENCODER_CONFIGS["vitg"]


@pytest.mark.slow
def test_tiny_latents_equal_transformers_vjepa2model() -> None:
    from transformers import VJEPA2Config, VJEPA2Model

    model, cfg = load_encoder("tiny", CPU, torch.float32)
    hf_cfg = VJEPA2Config(
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        mlp_ratio=cfg.mlp_hidden_size / cfg.hidden_size,
        crop_size=cfg.crop_size,
        frames_per_clip=cfg.frames_per_clip,
        pred_hidden_size=32,
        pred_num_attention_heads=2,
        pred_num_hidden_layers=1,
    )
    hf_cfg._attn_implementation = "eager"
    ref = VJEPA2Model(hf_cfg).eval()
    missing, unexpected = ref.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("predictor.") for k in missing)

    video = torch.randn(2, 6, 3, cfg.crop_size, cfg.crop_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref(pixel_values_videos=video, skip_predictor=True).last_hidden_state
        got = model(video)
    assert got.shape == (2, 3 * cfg.tokens_per_tubelet, cfg.hidden_size)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_release_format_encoder_keys_map_onto_transformers_names() -> None:
    model, cfg = load_encoder("tiny", CPU, torch.float32)
    hf = model.state_dict()
    release: dict[str, torch.Tensor] = {
        "module.backbone.patch_embed.proj.weight": hf["encoder.embeddings.patch_embeddings.proj.weight"],
        "module.backbone.patch_embed.proj.bias": hf["encoder.embeddings.patch_embeddings.proj.bias"],
        "module.backbone.norm.weight": hf["encoder.layernorm.weight"],
        "module.backbone.norm.bias": hf["encoder.layernorm.bias"],
        "module.backbone.pos_embed": torch.zeros(1, 4, cfg.hidden_size),  # unused by the RoPE encoder
    }
    for i in range(cfg.num_hidden_layers):
        p = f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            release[f"module.backbone.blocks.{i}.attn.qkv.{kind}"] = torch.cat(
                [hf[f"{p}attention.{n}.{kind}"] for n in ("query", "key", "value")]
            )
            release[f"module.backbone.blocks.{i}.attn.proj.{kind}"] = hf[f"{p}attention.proj.{kind}"]
            for sub in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                release[f"module.backbone.blocks.{i}.{sub}.{kind}"] = hf[f"{p}{sub}.{kind}"]
    converted = release_encoder_to_hf(release)
    assert set(converted) == set(hf)
    for k, v in hf.items():
        assert torch.equal(converted[k], v), k
    assert clean_release_keys({"module.backbone.x": hf["encoder.layernorm.bias"]}).keys() == {"x"}


def test_release_encoder_config_is_inferred_from_shapes() -> None:
    with torch.device("meta"):
        state = VJEPA2Backbone(ENCODER_CONFIGS["vitg"]).state_dict()
    assert encoder_config_from_release(state) == ENCODER_CONFIGS["vitg"]


@pytest.mark.parametrize(("h", "w"), [(32, 32), (40, 64), (90, 30), (16, 16)])
def test_frames_of_any_size_become_centre_crops(h: int, w: int) -> None:
    frames = np.full((3, h, w, 3), 77, dtype=np.uint8)
    out = resize_center_crop(frames, 32, 36)
    assert out.shape == (3, 3, 32, 32) and out.dtype == torch.uint8
    assert bool((out == 77).all())  # a flat colour survives resizing and cropping unchanged


def test_a_transformers_checkpoint_directory_loads_the_encoder(tmp_path: Path) -> None:
    model, cfg = load_encoder("tiny", CPU, torch.float32)
    save_hf_checkpoint(tmp_path / "ckpt", model.state_dict())
    loaded, loaded_cfg = load_encoder(str(tmp_path / "ckpt"), CPU, torch.float32)
    assert loaded_cfg == cfg
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
