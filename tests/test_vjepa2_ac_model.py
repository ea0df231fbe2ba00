"""V-JEPA 2-AC predictor: block-causal mask, parity with the release module, weights, pose arithmetic.

Parity with the release predictor (facebookresearch/vjepa2) runs on every run
against outputs recorded from it (tests/fixtures/vjepa2_ac_reference_record.py
says how, and at which commit); with ``MSTAR_REFS`` pointing at a directory
holding a ``vjepa2/`` checkout, the same cases also run against it live.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from mstar.errors import WeightsError
from mstar.models.vjepa2.checkpoint import ac_config_from_release, load_ac
from mstar.models.vjepa2.config import AC_CONFIGS, ENCODER_CONFIGS
from mstar.models.vjepa2.pose import euler_to_matrix, matrix_to_euler, next_pose, pose_deltas
from mstar.models.vjepa2.predictor import ACPredictor, block_causal_mask, frame_positions
from tests.fixtures import vjepa2_ac_reference_record as recorded
from tests.fixtures.vjepa2_checkpoints import save_hf_checkpoint

FIXTURES = Path(__file__).parent / "fixtures"
CPU = torch.device("cpu")


def test_block_causal_mask_lets_frame_i_see_frames_up_to_i() -> None:
    # 3 frames of 2 tokens each: rows are queries, columns keys.
    expected = torch.tensor(
        [
            [1, 1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 1, 1],
            [1, 1, 1, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(block_causal_mask(3, 2), expected)


def test_conditioning_tokens_sit_at_the_origin_of_their_frame() -> None:
    pos = frame_positions(2, cond_tokens=2, grid=2)
    # per frame: action, state, then the 2x2 patches in raster order
    assert pos[0].tolist() == [0] * 6 + [1] * 6
    assert pos[1].tolist() == [0, 0, 0, 0, 1, 1] * 2
    assert pos[2].tolist() == [0, 0, 0, 1, 0, 1] * 2


def test_predictions_for_a_frame_ignore_later_frames() -> None:
    _, _, predictor, cfg = load_ac("tiny", CPU, torch.float32)
    g = torch.Generator().manual_seed(0)
    p = cfg.tokens_per_frame
    z = torch.randn(1, 3 * p, cfg.embed_dim, generator=g)
    a, s = torch.randn(1, 3, 7, generator=g), torch.randn(1, 3, 7, generator=g)
    z2, a2, s2 = z.clone(), a.clone(), s.clone()
    z2[:, 2 * p :] += 1.0
    a2[:, 2] += 1.0
    s2[:, 2] += 1.0
    with torch.no_grad():
        out, out2 = predictor(z, a, s), predictor(z2, a2, s2)
    torch.testing.assert_close(out[:, : 2 * p], out2[:, : 2 * p])
    assert (out[:, 2 * p :] - out2[:, 2 * p :]).abs().max() > 1e-3
    # ... and the first frame's action does reach the later frames.
    a3 = a.clone()
    a3[:, 0] += 1.0
    with torch.no_grad():
        out3 = predictor(z, a3, s)
    assert (out[:, p:] - out3[:, p:]).abs().max() > 1e-3


def test_predictor_params_match_the_release_module_tree() -> None:
    ref = json.loads((FIXTURES / "vjepa2_ac_params.json").read_text())["params"]
    with torch.device("meta"):
        state = ACPredictor(AC_CONFIGS["release"]).state_dict()
    assert {k: list(v.shape) for k, v in state.items()} == ref
    # The config the loader infers from those shapes is the release config.
    assert ac_config_from_release(state, ENCODER_CONFIGS["vitg"]) == AC_CONFIGS["release"]


def _ours(case: str) -> torch.Tensor:
    """Our predictor's output on a recorded case (the same weights and inputs the reference ran on)."""
    cfg = recorded.CASES[case]
    model = ACPredictor(cfg).eval()
    model.load_state_dict(recorded.case_weights(cfg), strict=True)
    x = recorded.case_inputs(cfg)
    with torch.no_grad():
        return model(x["latents"], x["actions"], x["states"], x["extrinsics"] if cfg.use_extrinsics else None)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def reference_outputs() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(recorded.FIXTURE), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


def test_the_reference_fixture_records_every_case_at_the_pinned_commit(
    reference_outputs: tuple[dict[str, torch.Tensor], dict[str, str]],
) -> None:
    outputs, meta = reference_outputs
    assert sorted(outputs) == sorted(recorded.CASES)
    assert meta["reference_commit"] == recorded.REFERENCE_COMMIT
    assert recorded.FIXTURE.stat().st_size < 64 * 1024


@pytest.mark.parametrize("case", sorted(recorded.CASES))
def test_predictor_equals_the_recorded_release_reference(
    case: str, reference_outputs: tuple[dict[str, torch.Tensor], dict[str, str]]
) -> None:
    outputs, meta = reference_outputs
    cfg = recorded.CASES[case]
    rerecord = f"re-record with: {recorded.COMMAND}"
    assert recorded.tensors_sha256(recorded.case_weights(cfg)) == meta[f"{case}.weights_sha256"], (
        f"the tiny predictor weights of case {case!r} are not the ones the reference ran on; {rerecord}"
    )
    assert recorded.tensors_sha256(recorded.case_inputs(cfg)) == meta[f"{case}.inputs_sha256"], (
        f"the inputs of case {case!r} are not the ones the reference ran on; {rerecord}"
    )
    expected = outputs[case]
    assert expected.shape == (recorded.ROLLOUTS, recorded.FRAMES * cfg.tokens_per_frame, cfg.embed_dim)
    torch.testing.assert_close(_ours(case), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", sorted(recorded.CASES))
def test_predictor_equals_the_live_release_reference(
    case: str,
    reference_checkout: Callable[..., Path],
    reference_outputs: tuple[dict[str, torch.Tensor], dict[str, str]],
) -> None:
    checkout = reference_checkout("vjepa2", "src/models/ac_predictor.py", origin="github.com/facebookresearch/vjepa2")
    cfg = recorded.CASES[case]
    with recorded.reference_module(checkout) as module, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the reference enters torch.backends.cuda.sdp_kernel()
        expected = recorded.run_reference(module, cfg)
    torch.testing.assert_close(_ours(case), expected, rtol=1e-5, atol=1e-5)
    # The recorded outputs are still what the reference computes (same commit, or one that kept its numerics).
    torch.testing.assert_close(reference_outputs[0][case], expected, rtol=1e-5, atol=1e-5)


def _release_blob(encoder: torch.nn.Module, predictor: torch.nn.Module, layers: int) -> dict[str, object]:
    """The layout of vjepa2-ac-vitg.pt: release-format ViT keys and DDP prefixes."""
    enc = encoder.state_dict()
    out = {
        "module.backbone.patch_embed.proj." + k.rsplit(".", 1)[1]: v for k, v in enc.items() if "patch_embeddings" in k
    }
    out.update({"module.backbone.norm." + k.rsplit(".", 1)[1]: v for k, v in enc.items() if "layernorm" in k})
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            out[f"module.backbone.blocks.{i}.attn.qkv.{kind}"] = torch.cat(
                [enc[f"{p}attention.{n}.{kind}"] for n in ("query", "key", "value")]
            )
            out[f"module.backbone.blocks.{i}.attn.proj.{kind}"] = enc[f"{p}attention.proj.{kind}"]
            for sub in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                out[f"module.backbone.blocks.{i}.{sub}.{kind}"] = enc[f"{p}{sub}.{kind}"]
    return {"encoder": out, "predictor": {"module." + k: v for k, v in predictor.state_dict().items()}, "epoch": 315}


def test_release_file_loads_with_module_prefixes(tmp_path: Path) -> None:
    encoder, enc_cfg, predictor, cfg = load_ac("tiny", CPU, torch.float32)
    torch.save(_release_blob(encoder, predictor, enc_cfg.num_hidden_layers), tmp_path / "vjepa2-ac-vitg.pt")
    enc2, _, pred2, _ = load_ac(str(tmp_path), CPU, torch.float32, encoder_config=enc_cfg, predictor_config=cfg)
    for k, v in predictor.state_dict().items():
        assert torch.equal(pred2.state_dict()[k], v), k
    for k, v in encoder.state_dict().items():
        assert torch.equal(enc2.state_dict()[k], v), k


def test_a_directory_without_the_release_file_is_a_weights_error(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="vjepa2-ac-vitg.pt"):
        load_ac(str(tmp_path), CPU, torch.float32)


def test_a_truncated_predictor_is_a_weights_error_naming_the_tensor(tmp_path: Path) -> None:
    encoder, enc_cfg, predictor, cfg = load_ac("tiny", CPU, torch.float32)
    blob = _release_blob(encoder, predictor, enc_cfg.num_hidden_layers)
    blob["predictor"] = {k: v for k, v in blob["predictor"].items() if "predictor_norm." not in k}  # type: ignore[attr-defined]
    torch.save(blob, tmp_path / "vjepa2-ac-vitg.pt")
    with pytest.raises(WeightsError, match="predictor_norm"):
        load_ac(str(tmp_path), CPU, torch.float32, encoder_config=ENCODER_CONFIGS["tiny"], predictor_config=cfg)


def test_pose_arithmetic_matches_scipy() -> None:
    rotation = pytest.importorskip("scipy.spatial.transform").Rotation
    g = torch.Generator().manual_seed(0)
    angles = (torch.rand(20, 3, generator=g, dtype=torch.float64) - 0.5) * 3.0
    assert torch.allclose(
        euler_to_matrix(angles), torch.from_numpy(rotation.from_euler("xyz", angles.numpy()).as_matrix())
    )
    mats = torch.from_numpy(rotation.from_euler("xyz", angles.numpy()).as_matrix())
    assert torch.allclose(matrix_to_euler(mats), torch.from_numpy(rotation.from_matrix(mats.numpy()).as_euler("xyz")))

    poses = torch.cat(
        [torch.rand(5, 6, generator=g, dtype=torch.float64) - 0.5, torch.rand(5, 1, generator=g, dtype=torch.float64)],
        1,
    )
    deltas = pose_deltas(poses)
    # Applying the delta between consecutive poses walks the sequence.
    assert torch.allclose(next_pose(poses[:-1], deltas), poses[1:], atol=1e-9)


def test_the_encoder_may_come_from_a_transformers_checkpoint_beside_the_predictor(tmp_path: Path) -> None:
    encoder, _, predictor, cfg = load_ac("tiny", CPU, torch.float32)
    save_hf_checkpoint(tmp_path, encoder.state_dict())
    torch.save(
        {"predictor": {"module." + k: v for k, v in predictor.state_dict().items()}}, tmp_path / "vjepa2-ac-vitg.pt"
    )
    enc2, enc_cfg, pred2, _ = load_ac(str(tmp_path), CPU, torch.float32, predictor_config=cfg)
    assert enc_cfg == ENCODER_CONFIGS["tiny"]
    for k, v in encoder.state_dict().items():
        assert torch.equal(enc2.state_dict()[k], v), k
    for k, v in predictor.state_dict().items():
        assert torch.equal(pred2.state_dict()[k], v), k
