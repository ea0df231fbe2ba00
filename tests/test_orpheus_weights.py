"""Orpheus weights: the full config has the published names and shapes; loading checks them strictly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mstar.errors import WeightsError
from mstar.layers.llama import LlamaConfig, LlamaForCausalLM
from mstar.models.orpheus.config import FULL_LLAMA, TINY_LLAMA, TINY_SNAC
from mstar.models.orpheus.weights import build_tiny, load_llama, load_snac

FIXTURE = Path(__file__).parent / "fixtures" / "orpheus_3b_params.json"


def test_full_orpheus_config_has_exactly_the_published_parameter_names_and_shapes() -> None:
    fixture = json.loads(FIXTURE.read_text())
    assert LlamaConfig.from_hf_dict(fixture["config"]) == FULL_LLAMA
    with torch.device("meta"):
        model = LlamaForCausalLM(FULL_LLAMA)
    ours = {n: list(p.shape) for n, p in model.named_parameters()}
    assert ours == fixture["parameters"]
    assert len(ours) == 28 * 9 + 2
    # The head shares the embedding, as in the published config; a state dict still names it.
    assert set(model.state_dict()) - set(ours) == set(fixture["tied"]) == {"lm_head.weight"}
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(3.30e9, rel=0.01)


def _write_checkpoint(path: Path, state: dict[str, torch.Tensor], cfg: LlamaConfig) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    hf = {k: v for k, v in cfg.to_dict().items() if k != "rope_scaling"}
    hf["rope_scaling"] = cfg.rope_scaling
    hf["architectures"] = ["LlamaForCausalLM"]
    (path / "config.json").write_text(json.dumps(hf))
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
    return path


@pytest.mark.slow
def test_checkpoint_directory_loads_and_bad_names_or_shapes_raise_weights_error(tmp_path: Path) -> None:
    model, snac = build_tiny(TINY_LLAMA, TINY_SNAC, device=torch.device("cpu"), dtype=torch.float32)
    state = dict(model.state_dict())
    good = _write_checkpoint(tmp_path / "good", state, TINY_LLAMA)
    loaded = load_llama(good, device=torch.device("cpu"), dtype=torch.float32)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, state[k]), k

    missing = dict(state)
    del missing["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(WeightsError, match="missing 1: model.layers.1.mlp.up_proj.weight"):
        load_llama(
            _write_checkpoint(tmp_path / "missing", missing, TINY_LLAMA),
            device=torch.device("cpu"),
            dtype=torch.float32,
        )

    extra = dict(state, **{"model.layers.9.foo.weight": torch.zeros(2)})
    with pytest.raises(WeightsError, match="unexpected 1: model.layers.9.foo.weight"):
        load_llama(
            _write_checkpoint(tmp_path / "extra", extra, TINY_LLAMA), device=torch.device("cpu"), dtype=torch.float32
        )

    shaped = dict(state, **{"model.norm.weight": torch.ones(65)})
    with pytest.raises(WeightsError, match=r"wrong shape 1: model.norm.weight: checkpoint \(65,\), model \(64,\)"):
        load_llama(
            _write_checkpoint(tmp_path / "shape", shaped, TINY_LLAMA), device=torch.device("cpu"), dtype=torch.float32
        )


def test_snac_weights_load_from_a_directory_with_encoder_tensors_ignored(tmp_path: Path) -> None:
    _, snac = build_tiny(TINY_LLAMA, TINY_SNAC, device=torch.device("cpu"), dtype=torch.float32)
    d = tmp_path / "snac"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(TINY_SNAC.to_dict()))
    state = dict(snac.state_dict())
    state["encoder.block.0.bias"] = torch.zeros(4)  # published files carry the encoder too
    torch.save(state, d / "pytorch_model.bin")
    loaded = load_snac(str(d), device=torch.device("cpu"))
    assert all(torch.equal(v, snac.state_dict()[k]) for k, v in loaded.state_dict().items())
    del state["decoder.model.0.bias"]
    torch.save(state, d / "pytorch_model.bin")
    with pytest.raises(WeightsError, match="missing 1: decoder.model.0.bias"):
        load_snac(str(d), device=torch.device("cpu"))


def test_missing_checkpoint_is_a_weights_error(tmp_path: Path) -> None:
    from mstar.engine import Engine

    with pytest.raises(WeightsError):
        Engine("orpheus", weights=str(tmp_path / "nowhere"), device="cpu")


def _write_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"[UNK]": 0, "tara": 1, ":": 2, "hello": 3, "world": 4, "<|begin_of_text|>": 128000}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 128000)]
    )
    tok.save(str(path / "tokenizer.json"))


@pytest.mark.slow
def test_engine_runs_a_checkpoint_directory_with_its_tokenizer_and_snac_subdirectory(tmp_path: Path) -> None:
    from mstar.engine import Engine

    model, snac = build_tiny(TINY_LLAMA, TINY_SNAC, device=torch.device("cpu"), dtype=torch.float32)
    ckpt = _write_checkpoint(tmp_path / "orpheus", dict(model.state_dict()), TINY_LLAMA)
    _write_tokenizer(ckpt)
    (ckpt / "snac_24khz").mkdir()
    (ckpt / "snac_24khz" / "config.json").write_text(json.dumps(TINY_SNAC.to_dict()))
    torch.save(dict(snac.state_dict()), ckpt / "snac_24khz" / "pytorch_model.bin")
    with Engine("orpheus", weights=str(ckpt), device="cpu") as eng:
        runner = eng.runner
        assert runner.tokenizer.encode("tara: hello world") == [128000, 1, 2, 3, 4]
        audio = eng.tts("hello world", voice="tara", seed=1, max_output_tokens=35)
        assert audio.sample_rate == 24000 and len(audio) == 2 * 2048
