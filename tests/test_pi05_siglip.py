"""mstar's SigLIP tower matches transformers' SigLIP vision model, weight for weight."""

from __future__ import annotations

import pytest
import torch

from mstar.layers.siglip import SiglipDims, SiglipVisionTransformer

pytestmark = pytest.mark.slow


def test_siglip_tower_matches_transformers() -> None:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    dims = SiglipDims(width=32, depth=2, mlp_dim=48, num_heads=4, patch_size=14, image_size=56)
    torch.manual_seed(0)
    ours = SiglipVisionTransformer(dims).eval()
    hf_cfg = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        patch_size=14,
        image_size=56,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
        vision_use_head=False,
    )
    theirs = SiglipVisionModel(hf_cfg).eval()
    names = set(theirs.state_dict())
    prefix = "vision_model." if any(n.startswith("vision_model.") for n in names) else ""
    state = {prefix + k: v for k, v in ours.state_dict().items()}
    missing, unexpected = theirs.load_state_dict(state, strict=False)
    assert [k for k in missing if "position_ids" not in k] == [] and unexpected == []
    pixels = torch.rand(2, 3, 56, 56) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(ours(pixels), theirs(pixel_values=pixels).last_hidden_state, atol=1e-5, rtol=1e-4)
