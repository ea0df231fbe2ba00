"""BAGEL's sampling math pinned on hand-computed values: flow steps, timestep shift, guidance, latents."""

from __future__ import annotations

import math

import pytest
import torch

from mstar.codecs.flux_vae import FLUX_VAE, AutoEncoder, VAEConfig, denormalize_latent, normalize_latent
from mstar.layers.flow import (
    cfg_active,
    combine_guidance,
    euler_step,
    patchify_latent,
    shift_timesteps,
    timestep_schedule,
    unpatchify_latent,
)
from mstar.layers.mot import Routing, route
from mstar.models.bagel.model import sincos_2d, timestep_frequencies
from mstar.models.bagel.tokenizer import ByteTokenizer


def _close(actual: torch.Tensor, expected: list[list[float]]) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected), rtol=1e-5, atol=1e-6)


def test_timestep_shift_moves_time_towards_noise() -> None:
    t = torch.tensor([0.0, 0.5, 1.0])
    # 3 * 0.5 / (1 + 2 * 0.5) = 0.75; the end points stay put.
    assert shift_timesteps(t, 3.0).tolist() == pytest.approx([0.0, 0.75, 1.0])
    assert shift_timesteps(t, 1.0).tolist() == pytest.approx([0.0, 0.5, 1.0])


def test_schedule_visits_all_but_the_last_grid_point() -> None:
    times, dts = timestep_schedule(3, 3.0)
    assert times.tolist() == pytest.approx([1.0, 0.75])
    assert dts.tolist() == pytest.approx([0.25, 0.75])
    times, dts = timestep_schedule(5, 1.0)
    assert times.tolist() == pytest.approx([1.0, 0.75, 0.5, 0.25])
    assert float(dts.sum()) == pytest.approx(1.0)


def test_schedule_needs_two_points() -> None:
    with pytest.raises(ValueError):
        timestep_schedule(1, 3.0)


def test_euler_step_moves_against_the_velocity() -> None:
    x = torch.tensor([1.0, -2.0])
    v = torch.tensor([2.0, 4.0])
    assert euler_step(x, v, 0.25).tolist() == pytest.approx([0.5, -3.0])


def test_cfg_interval_is_open_below_closed_above() -> None:
    assert not cfg_active(0.4, (0.4, 1.0))
    assert cfg_active(0.41, (0.4, 1.0))
    assert cfg_active(1.0, (0.4, 1.0))
    assert not cfg_active(0.2, (0.4, 1.0))


@pytest.mark.slow
def test_text_guidance_with_global_renorm() -> None:
    cond = torch.tensor([[3.0, 4.0]])
    text = torch.tensor([[0.0, 0.0]])
    # guided = 0 + 2 * (cond - 0) = [6, 8], norm 10 vs 5 -> scaled by 0.5.
    out = combine_guidance(cond, text, None, text_scale=2.0, img_scale=1.0, renorm_type="global")
    _close(out, [[3.0, 4.0]])
    # renorm_min floors the scale: 0.8 * [6, 8].
    out = combine_guidance(cond, text, None, text_scale=2.0, img_scale=1.0, renorm_type="global", renorm_min=0.8)
    _close(out, [[4.8, 6.4]])


def test_image_guidance_stacks_on_text_guidance() -> None:
    cond, text, img = torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    # text: [6, 8]; image: [1,1] + 2 * ([6,8] - [1,1]) = [11, 15]; renorm to |cond| = 5.
    out = combine_guidance(cond, text, img, text_scale=2.0, img_scale=2.0, renorm_type="global")
    k = 5.0 / math.sqrt(11**2 + 15**2)
    _close(out, [[11 * k, 15 * k]])


def test_global_and_channel_renorm_differ() -> None:
    cond = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    text = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    # guided = [[6, 8], [1, 0]].
    channel = combine_guidance(cond, text, None, text_scale=2.0, img_scale=1.0, renorm_type="channel")
    _close(channel, [[3.0, 4.0], [1.0, 0.0]])
    glob = combine_guidance(cond, text, None, text_scale=2.0, img_scale=1.0, renorm_type="global")
    k = math.sqrt(26.0 / 101.0)
    _close(glob, [[6 * k, 8 * k], [k, 0.0]])


def test_text_channel_renorm_applies_before_image_guidance() -> None:
    cond, text, img = torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    # text-guided [6, 8] renormed to [3, 4]; then [1,1] + 2 * ([3,4] - [1,1]) = [5, 7], not renormed.
    out = combine_guidance(cond, text, img, text_scale=2.0, img_scale=2.0, renorm_type="text_channel")
    _close(out, [[5.0, 7.0]])


def test_no_text_guidance_means_plain_prediction() -> None:
    cond, text = torch.tensor([[3.0, 4.0]]), torch.tensor([[9.0, 9.0]])
    assert combine_guidance(cond, text, None, text_scale=1.0, img_scale=2.0).tolist() == [[3.0, 4.0]]


def test_unknown_renorm_type_is_refused() -> None:
    with pytest.raises(ValueError):
        combine_guidance(torch.ones(1, 2), torch.zeros(1, 2), None, text_scale=2.0, img_scale=1.0, renorm_type="nope")


def test_latent_patchify_layout_and_round_trip() -> None:
    latent = torch.arange(2 * 4 * 6, dtype=torch.float32).reshape(2, 4, 6)
    tokens = patchify_latent(latent, 2)
    assert tokens.shape == (2 * 3, 2 * 2 * 2)
    # Token (row 0, col 1) holds pixels rows 0-1, cols 2-3, channels last: (0,2,c0) (0,2,c1) (0,3,c0) ...
    expected = [latent[c, r, q].item() for r in (0, 1) for q in (2, 3) for c in (0, 1)]
    assert tokens[1].tolist() == expected
    assert torch.equal(unpatchify_latent(tokens, 2, 3, 2, 2), latent)


def test_vae_scale_and_shift_are_flux_constants() -> None:
    assert FLUX_VAE.scale_factor == 0.3611 and FLUX_VAE.shift_factor == 0.1159
    assert FLUX_VAE.z_channels == 16 and FLUX_VAE.downsample == 8
    z = torch.tensor([1.1159, 0.1159])
    normed = normalize_latent(z, 0.3611, 0.1159)
    assert normed.tolist() == pytest.approx([0.3611, 0.0])
    assert denormalize_latent(normed, 0.3611, 0.1159).tolist() == pytest.approx(z.tolist())


def test_vae_downsamples_by_eight() -> None:
    torch.manual_seed(0)
    vae = AutoEncoder(VAEConfig(ch=8, ch_mult=(1, 1, 1, 1), num_res_blocks=1, norm_groups=4)).eval()
    with torch.no_grad():
        z = vae.encode(torch.zeros(1, 3, 32, 48), sample=False)
        assert z.shape == (1, 16, 4, 6)
        assert vae.decode(z).shape == (1, 3, 32, 48)


def test_position_table_and_time_features() -> None:
    table = sincos_2d(4, 3)
    # id 5 is row 1, column 2: first half encodes the column, second the row; sin then cos.
    assert table[5].tolist() == pytest.approx([math.sin(2), math.cos(2), math.sin(1), math.cos(1)])
    feats = timestep_frequencies(torch.tensor([0.5]), 4)
    # frequencies exp(-ln(1e4) * [0, 1] / 2) = [1, 0.01]; cosines first.
    assert feats[0].tolist() == pytest.approx([math.cos(0.5), math.cos(0.005), math.sin(0.5), math.sin(0.005)])


def test_route_sends_each_token_to_its_expert() -> None:
    x = torch.arange(6, dtype=torch.float32).reshape(2, 3, 1)
    mask = torch.tensor([[False, True, False], [True, True, False]])
    out = route(x, Routing.build(mask), lambda z: z + 100, lambda z: z * -1)
    assert out.reshape(-1).tolist() == [100, -1, 102, -3, -4, 105]
    assert route(x, Routing.build(None), lambda z: z + 100, lambda z: z * -1).reshape(-1).tolist() == [
        100,
        101,
        102,
        103,
        104,
        105,
    ]
    assert route(x, Routing.build(torch.ones(2, 3, dtype=torch.bool)), lambda z: z + 100, lambda z: -z).sum() == -15


def test_byte_tokenizer_keeps_qwen2_special_ids() -> None:
    tok = ByteTokenizer()
    ids = tok.encode("<|im_start|>hi<|im_end|><|vision_start|><|vision_end|>")
    # Byte-level BPE order puts "!" at 0, so "h" is 104 - 33 = 71 as in Qwen2's vocabulary.
    assert ids == [151644, 71, 72, 151645, 151652, 151653]
    assert tok.decode(tok.encode("héllo wörld")) == "héllo wörld"
