"""Building Qwen3-Omni and filling it with weights: the tiny random variant or a checkpoint directory."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from mstar.errors import WeightsError
from mstar.models.qwen3_omni.config import FULL_CONFIG, TINY_CONFIG, build_hf_config
from mstar.models.qwen3_omni.model import Qwen3Omni
from mstar.parallel.rank0 import Deferred, deferred
from mstar.parallel.spec import BackboneSpec
from mstar.progress import progress
from mstar.weights import TINY, resolve_checkpoint_dir, tiny_checkpoint_path, tiny_state_dict

__all__ = ["backbone_specs", "build_model", "load_model", "random_state_dict"]


def build_model(cfg: dict[str, Any], device: torch.device | str = "cpu") -> Qwen3Omni:
    """The module tree for ``cfg`` (parameters uninitialised on ``device``; use "meta" for shapes only)."""
    hf = build_hf_config(cfg)
    with torch.device(device):
        return Qwen3Omni(cfg, hf)


def random_state_dict(cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Deterministic random weights (call under a fixed seed): norms near 1, everything else small."""
    model = build_model(cfg, "meta")
    out: dict[str, torch.Tensor] = {}
    for name, p in model.state_dict().items():
        leaf = name.rsplit(".", 1)[-1]
        if "norm" in name and leaf == "weight" or name.endswith("layer_scale.scale") or name.endswith(".gamma"):
            t = 1.0 + 0.1 * torch.randn(p.shape)
        elif leaf in ("alpha", "beta"):
            t = 0.1 * torch.randn(p.shape)
        elif leaf == "bias":
            t = 0.02 * torch.randn(p.shape)
        else:
            t = 0.05 * torch.randn(p.shape)
        out[name] = t.float()
    return out


def _read_config(path: Path) -> dict[str, Any]:
    cfg_file = path / "config.json"
    return _normalise_config(json.loads(cfg_file.read_text()) if cfg_file.is_file() else FULL_CONFIG)


def _read_tensors(path: Path, device: torch.device, dtype: torch.dtype, defer: Deferred) -> dict[str, torch.Tensor]:
    """A checkpoint directory's tensors, straight to ``device``/``dtype`` file by file (the deferred
    ones are not read)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"no *.safetensors files in {str(path)!r}")
    state: dict[str, torch.Tensor] = {}
    for f in progress(files, desc="loading Qwen3-Omni", unit="file"):
        if defer:
            with safe_open(str(f), framework="pt", device=str(device)) as handle:
                tensors = {k: handle.get_tensor(k) for k in handle.keys() if k not in defer}  # noqa: SIM118
        else:
            tensors = load_file(str(f), device=str(device))
        for name, tensor in tensors.items():
            state[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return state


def _normalise_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Published configs spell rotary settings ``rope_scaling``/``rope_theta``; ours use ``rope_parameters``."""
    for sub in (
        cfg.get("thinker_config", {}).get("text_config"),
        cfg.get("talker_config", {}).get("text_config"),
        cfg.get("talker_config", {}).get("code_predictor_config"),
        cfg.get("code2wav_config"),
    ):
        if isinstance(sub, dict) and "rope_parameters" not in sub:
            rope = dict(sub.pop("rope_scaling", None) or {"rope_type": "default"})
            rope["rope_theta"] = float(sub.pop("rope_theta", 1000000.0))
            sub["rope_parameters"] = rope
    talker_text = cfg.get("talker_config", {}).get("text_config")
    if isinstance(talker_text, dict) and "num_experts" not in talker_text and "num_local_experts" in talker_text:
        talker_text["num_experts"] = talker_text["num_local_experts"]
    return cfg


def load_model(
    weights: str, device: torch.device, dtype: torch.dtype, *, tensor_parallel_size: int = 1
) -> tuple[dict[str, Any], Qwen3Omni, Path | None]:
    """(config, model in eval mode on ``device``/``dtype``, checkpoint dir or None for tiny).

    With ``tensor_parallel_size > 1`` the Thinker's and the Talker's decoder stacks are not read:
    their parameters stay on the meta device (see :mod:`mstar.parallel.rank0`)."""
    ckpt: Path | None = None
    if weights == TINY:
        cfg = TINY_CONFIG
        defer = deferred(tensor_parallel_size, lambda: backbone_specs(cfg, None))
        state = tiny_state_dict("qwen3_omni", cfg, lambda: random_state_dict(cfg), exclude=defer)
    else:
        ckpt = resolve_checkpoint_dir(weights)
        cfg = _read_config(ckpt)
        defer = deferred(tensor_parallel_size, lambda: backbone_specs(cfg, ckpt))
        state = _read_tensors(ckpt, device, dtype, defer)
    with _params_on_meta():
        model = build_model(cfg, "cpu")
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = defer.unexpected_missing(missing)
    if missing or unexpected:
        raise WeightsError(
            f"checkpoint does not match Qwen3-Omni: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    # Rotary frequency tables stay float32 whatever the weights' dtype: bf16 would blur long positions.
    tables = {n: b.clone() for n, b in model.named_buffers() if n.endswith("inv_freq")}
    model = defer.to(model, device=device, dtype=dtype).eval()
    for name, table in tables.items():
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._buffers[leaf] = table.to(device)
    return cfg, model, ckpt


def backbone_specs(cfg: dict[str, Any], ckpt: Path | None) -> list[BackboneSpec]:
    """The tensor-parallel backbones: the Thinker's MoE text stack, and the Talker's when the model
    speaks. Token and codec embeddings, heads, encoders, the code predictor and Code2Wav stay on
    rank 0 (the runner applies them around these stacks)."""
    files = (
        (str(tiny_checkpoint_path("qwen3_omni", cfg)),)
        if ckpt is None
        else tuple(str(f) for f in sorted(ckpt.glob("*.safetensors")))
    )
    specs = [
        BackboneSpec(
            "mstar.models.qwen3_omni.model:ThinkerTextModel", cfg["thinker_config"]["text_config"], "forward_embeds",
            files, prefix="thinker.model.language_model.", skip=("embed_tokens",),
        )
    ]
    if cfg.get("enable_audio_output", True):
        specs.append(
            BackboneSpec(
                "mstar.models.qwen3_omni.model:TalkerModel", cfg["talker_config"]["text_config"], "forward_embeds",
                files, prefix="talker.model.", skip=("codec_embedding",),
            )
        )
    return specs


@contextmanager
def _params_on_meta() -> Iterator[None]:
    """Build modules with real (CPU) buffers but parameters on the meta device.

    Each parameter is moved to meta as it is registered, so a 30B model never
    holds more than one real tensor at a time; ``load_state_dict(assign=True)``
    then puts the checkpoint's tensors in place, and buffers (rotary tables,
    codebook offsets) keep the values their constructors computed.
    """
    original = torch.nn.Module.register_parameter

    def register(self: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        original(self, name, param)

    torch.nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original  # type: ignore[method-assign]
