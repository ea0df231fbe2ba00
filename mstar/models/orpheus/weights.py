"""Orpheus weights: the published checkpoint (strictly checked) or the tiny deterministic variant.

Full weights: ``weights`` is a local directory or hub id of an Orpheus
checkpoint (HF ``LlamaForCausalLM`` layout: ``config.json``,
``*.safetensors``, ``tokenizer.json``). The SNAC 24 kHz codec is looked up,
in order, in ``$MSTAR_SNAC_WEIGHTS`` (a directory or hub id), a ``snac_24khz``
or ``snac`` sub-directory of the checkpoint, then the hub id
``hubertsiuzdak/snac_24khz`` (the local hub cache when offline). Names and
shapes must match exactly; anything missing, unexpected or mis-shaped raises
:class:`~mstar.errors.WeightsError` naming it.

Tiny weights: random, from a fixed seed, cached by
:func:`mstar.weights.tiny_state_dict`. Pure noise would almost never emit a
well-formed frame of audio codes, so a few reserved residual channels are
set to make the tiny model speak in frames: the embedding of an audio token
at frame position j (and of any non-audio token) lights the channel for the
position that should follow, no layer writes those channels, and the head
reads them to favour that position's 4,096 codes. Everything else (which
code, and the whole network path) stays random, so the tiny model exercises
exactly the full model's code path and emits audio after a few frames.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

import torch

from mstar.codecs.snac import SNACConfig, SNACDecoder
from mstar.errors import WeightsError
from mstar.layers.llama import LlamaConfig, LlamaForCausalLM
from mstar.models.orpheus.config import AUDIO_TOKEN_BASE, CODEBOOK_SIZE, CODES_PER_FRAME
from mstar.parallel.rank0 import deferred
from mstar.parallel.shard import params_on_meta
from mstar.parallel.spec import BackboneSpec
from mstar.progress import progress
from mstar.weights import component_override, resolve_checkpoint_dir, tiny_checkpoint_path, tiny_state_dict

__all__ = ["SNAC_HUB_ID", "backbone_spec", "build_tiny", "llama_files", "load_llama", "load_snac", "snac_location"]

log = logging.getLogger("mstar.orpheus")

SNAC_HUB_ID = "hubertsiuzdak/snac_24khz"
_TINY_RECIPE = 1  # bump when the tiny construction changes, to invalidate cached files


# ----------------------------------------------------------------------------- tiny


def _tiny_llama_state(cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
        reserved = CODES_PER_FRAME  # channels 0..6: "the next code is at frame position k"
        emb = model.model.embed_tokens.weight
        head = model.lm_head.weight
        emb[:, :reserved] = 0.0
        emb[:, 0] = 1.0  # non-audio tokens (the prompt's last one included): next is position 0
        head[:, :reserved] = 0.0
        for pos in range(CODES_PER_FRAME):
            ids = slice(AUDIO_TOKEN_BASE + pos * CODEBOOK_SIZE, AUDIO_TOKEN_BASE + (pos + 1) * CODEBOOK_SIZE)
            emb[ids, 0] = 0.0
            emb[ids, (pos + 1) % CODES_PER_FRAME] = 1.0
            head[ids, pos] = 1.0
        for name, p in model.named_parameters():  # layers never overwrite the reserved channels
            if name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
                p[:reserved] = 0.0
    return dict(model.state_dict())


def _tiny_llama_key(cfg: LlamaConfig) -> dict[str, object]:
    return {"llama": cfg.to_dict(), "recipe": _TINY_RECIPE}


def llama_files(ckpt: Path | None, cfg: LlamaConfig) -> tuple[str, ...]:
    """The safetensors files holding the LM: the tiny cache file (after :func:`build_tiny`), or the checkpoint's."""
    if ckpt is None:
        return (str(tiny_checkpoint_path("orpheus-llama", _tiny_llama_key(cfg))),)
    return tuple(str(f) for f in sorted(ckpt.glob("*.safetensors")))


def backbone_spec(ckpt: Path | None, cfg: LlamaConfig) -> BackboneSpec:
    """The tensor-parallel backbone: the whole Llama LM (its embedding and head vocabulary-parallel)."""
    return BackboneSpec("mstar.layers.llama:LlamaForCausalLM", cfg, "forward", llama_files(ckpt, cfg))


def build_tiny(
    llama_cfg: LlamaConfig,
    snac_cfg: SNACConfig,
    *,
    device: torch.device,
    dtype: torch.dtype,
    tensor_parallel_size: int = 1,
) -> tuple[LlamaForCausalLM, SNACDecoder]:
    """The tiny Orpheus LM and codec, from cached deterministic weights. With
    ``tensor_parallel_size > 1`` the LM's parameters stay on the meta device (see
    :mod:`mstar.parallel.rank0`)."""
    defer = deferred(tensor_parallel_size, lambda: [backbone_spec(None, llama_cfg)])
    lm_state = tiny_state_dict(
        "orpheus-llama", _tiny_llama_key(llama_cfg), lambda: _tiny_llama_state(llama_cfg), exclude=defer
    )
    snac_state = tiny_state_dict(
        "orpheus-snac",
        {"snac": snac_cfg.to_dict(), "recipe": _TINY_RECIPE},
        lambda: dict(SNACDecoder(snac_cfg).state_dict()),
    )
    if defer:
        with params_on_meta():
            model = LlamaForCausalLM(llama_cfg)
        defer.assign(model, lm_state, what="the tiny Orpheus LM")
    else:
        model = LlamaForCausalLM(llama_cfg)
        model.load_state_dict(lm_state, strict=True)
    snac = SNACDecoder(snac_cfg)
    snac.load_state_dict(snac_state, strict=True)
    return defer.to(model, device=device, dtype=dtype).eval(), snac.to(device).eval()


# ----------------------------------------------------------------------------- full


def _check_names(
    what: str, expected: dict[str, torch.Size], found: dict[str, torch.Size], optional: Iterable[str] = ()
) -> None:
    optional = set(optional)
    missing = sorted(set(expected) - set(found) - optional)
    unexpected = sorted(set(found) - set(expected) - optional)
    wrong = sorted(
        f"{k}: checkpoint {tuple(found[k])}, model {tuple(expected[k])}"
        for k in set(expected) & set(found)
        if found[k] != expected[k]
    )
    problems = []
    if missing:
        problems.append(f"missing {len(missing)}: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(
            f"unexpected {len(unexpected)}: {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}"
        )
    if wrong:
        problems.append(f"wrong shape {len(wrong)}: {'; '.join(wrong[:8])}")
    if problems:
        raise WeightsError(f"{what} does not match the model: " + " | ".join(problems))


def _read_json(path: Path) -> dict:
    try:
        return dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise WeightsError(f"{str(path)!r} not found") from None
    except (OSError, ValueError) as exc:
        raise WeightsError(f"could not read {str(path)!r}: {exc}") from exc


def load_llama(
    ckpt: Path, *, device: torch.device, dtype: torch.dtype, tensor_parallel_size: int = 1
) -> LlamaForCausalLM:
    """Build the LM from ``ckpt/config.json`` and load its safetensors, checking every name and shape.
    With ``tensor_parallel_size > 1`` the sharded names are checked but not read: they stay on the
    meta device (see :mod:`mstar.parallel.rank0`)."""
    from safetensors import safe_open

    cfg = LlamaConfig.from_hf_dict(_read_json(ckpt / "config.json"))
    needed = AUDIO_TOKEN_BASE + CODES_PER_FRAME * CODEBOOK_SIZE
    if cfg.vocab_size < needed:
        raise WeightsError(f"{ckpt} has vocab_size {cfg.vocab_size}; Orpheus audio tokens need at least {needed}")
    files = sorted(ckpt.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"no *.safetensors files in {str(ckpt)!r}")
    defer = deferred(tensor_parallel_size, lambda: [backbone_spec(ckpt, cfg)])
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    expected = {n: p.shape for n, p in model.named_parameters()}
    optional = ["lm_head.weight"] if cfg.tie_word_embeddings else []
    handles = [safe_open(str(f), framework="pt") for f in files]
    where = {k: h for h in handles for k in h.keys()}  # noqa: SIM118 - safe_open has keys(), not iteration
    found = {k: torch.Size(h.get_slice(k).get_shape()) for k, h in where.items()}
    _check_names(f"checkpoint {str(ckpt)!r}", expected, found, optional)
    state = {
        k: where[k].get_tensor(k).to(device=device, dtype=dtype)
        for k in progress(expected, desc="loading Orpheus", unit="tensor")
        if k not in defer
    }
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def snac_location(ckpt: Path | None) -> str:
    """Where the codec comes from (see the module docstring for the order)."""
    override = component_override("snac")
    if override:
        return override
    if ckpt is not None:
        for sub in ("snac_24khz", "snac"):
            if (ckpt / sub / "config.json").is_file():
                return str(ckpt / sub)
    return SNAC_HUB_ID


def _legacy_weight_norm_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``weight_g``/``weight_v`` (old torch weight_norm) -> the parametrization names."""
    out = {}
    for k, v in state.items():
        if k.endswith(".weight_g"):
            k = k[: -len("weight_g")] + "parametrizations.weight.original0"
        elif k.endswith(".weight_v"):
            k = k[: -len("weight_v")] + "parametrizations.weight.original1"
        out[k] = v
    return out


def load_snac(source: str, *, device: torch.device) -> SNACDecoder:
    """The SNAC decoder from a directory or hub id holding ``config.json`` and ``pytorch_model.bin``."""
    path = resolve_checkpoint_dir(source, allow_patterns=["config.json", "pytorch_model.bin", "*.safetensors"])
    cfg = SNACConfig.from_dict(_read_json(path / "config.json"))
    try:
        snac = SNACDecoder(cfg)
    except ValueError as exc:
        raise WeightsError(f"unsupported SNAC config in {str(path)!r}: {exc}") from exc
    st_files = sorted(path.glob("*.safetensors"))
    try:
        if st_files:
            from safetensors.torch import load_file

            raw: dict[str, torch.Tensor] = {}
            for f in st_files:
                raw.update(load_file(str(f)))
        else:
            raw = torch.load(str(path / "pytorch_model.bin"), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WeightsError(f"no pytorch_model.bin or *.safetensors in {str(path)!r}") from None
    except Exception as exc:
        raise WeightsError(f"could not read SNAC weights in {str(path)!r}: {exc}") from exc
    raw = _legacy_weight_norm_names(raw)
    # The encoder half (and the quantizers' input projections) only serve encoding.
    state = {k: v for k, v in raw.items() if not k.startswith("encoder.") and ".in_proj." not in k}
    expected = {k: v.shape for k, v in snac.state_dict().items()}
    _check_names(f"SNAC weights {str(path)!r}", expected, {k: v.shape for k, v in state.items()})
    snac.load_state_dict(state, strict=True)
    return snac.to(device).eval()


def load_full(
    weights: str, *, device: torch.device, dtype: torch.dtype, tensor_parallel_size: int = 1
) -> tuple[LlamaForCausalLM, SNACDecoder, Path]:
    """LM and codec for a checkpoint directory or hub id; returns the resolved directory too. With
    ``tensor_parallel_size > 1`` the LM's parameters stay on the meta device (see
    :mod:`mstar.parallel.rank0`)."""
    ckpt = resolve_checkpoint_dir(weights)
    model = load_llama(ckpt, device=device, dtype=dtype, tensor_parallel_size=tensor_parallel_size)
    snac = load_snac(snac_location(ckpt), device=device)
    log.info("loaded Orpheus from %s", ckpt)
    return model, snac, ckpt
