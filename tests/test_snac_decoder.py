"""Our SNAC decoder: the published names and shapes, and the snac package's numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mstar.codecs.snac import SNAC_24KHZ, SNACConfig, SNACDecoder

FIXTURE = Path(__file__).parent / "fixtures" / "snac_24khz_params.json"

SMALL = {
    "sampling_rate": 24000,
    "encoder_dim": 4,
    "encoder_rates": [2, 4, 8, 8],
    "latent_dim": 16,
    "decoder_dim": 32,
    "decoder_rates": [8, 8, 4, 2],
    "attn_window_size": None,
    "codebook_size": 64,
    "codebook_dim": 4,
    "vq_strides": [4, 2, 1],
    "noise": True,
    "depthwise": True,
}


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny convolutions run far faster single-threaded on a busy 2-core machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_decoder_has_the_published_snac_24khz_decoder_names_and_shapes() -> None:
    fixture = json.loads(FIXTURE.read_text())
    assert SNACConfig.from_dict(fixture["config"]) == SNAC_24KHZ
    published = {
        k: v for k, v in fixture["parameters"].items() if not k.startswith("encoder.") and ".in_proj." not in k
    }
    with torch.device("meta"):
        ours = {k: list(v.shape) for k, v in SNACDecoder(SNAC_24KHZ).state_dict().items()}
    assert ours == published
    assert len(ours) > 100  # the whole decoder, not a subset


@pytest.mark.slow
def test_decode_matches_the_snac_package_on_the_same_weights() -> None:
    from snac import SNAC

    torch.manual_seed(0)
    ref = SNAC(**SMALL).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("alpha"):
                p.uniform_(0.5, 1.5)  # non-trivial Snake slopes
    ours = SNACDecoder(SNACConfig.from_dict(SMALL)).eval()
    state = {k: v for k, v in ref.state_dict().items() if not k.startswith("encoder.") and ".in_proj." not in k}
    ours.load_state_dict(state, strict=True)
    codes = [torch.randint(0, 64, (1, n)) for n in (4, 8, 16)]
    with torch.inference_mode():
        torch.manual_seed(123)  # the package draws its noise from the global generator
        want = ref.decode(codes)
        got = ours.decode(codes, generators=[torch.Generator().manual_seed(123)])
    assert got.shape == want.shape == (1, 1, 16 * 512)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert want.abs().max() > 1e-3


def test_batched_decode_gives_each_row_its_own_noise_and_result() -> None:
    torch.manual_seed(1)
    dec = SNACDecoder(SNACConfig.from_dict(SMALL)).eval()
    codes = [torch.randint(0, 64, (2, n)) for n in (4, 8, 16)]
    with torch.inference_mode():
        both = dec.decode(codes, generators=[torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)])
        second = dec.decode([c[1:] for c in codes], generators=[torch.Generator().manual_seed(6)])
    # Bit-identical: a request's audio must not depend on what else shares the codec batch.
    assert torch.equal(both[1:], second)
