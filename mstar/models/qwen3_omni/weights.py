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
from mstar.progress import progress
from mstar.weights import TINY, resolve_checkpoint_dir, tiny_state_dict

__all__ = ["build_model", "load_model", "random_state_dict"]


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


def _read_checkpoint(
    path: Path, device: torch.device, dtype: torch.dtype
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Config and tensors of a checkpoint directory; tensors go straight to ``device``/``dtype`` file by file."""
    from safetensors.torch import load_file

    cfg_file = path / "config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else FULL_CONFIG
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"no *.safetensors files in {str(path)!r}")
    state: dict[str, torch.Tensor] = {}
    for f in progress(files, desc="loading Qwen3-Omni", unit="file"):
        for name, tensor in load_file(str(f), device=str(device)).items():
            state[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return _normalise_config(cfg), state


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


def load_model(weights: str, device: torch.device, dtype: torch.dtype) -> tuple[dict[str, Any], Qwen3Omni, Path | None]:
    """(config, model in eval mode on ``device``/``dtype``, checkpoint dir or None for tiny)."""
    ckpt: Path | None = None
    if weights == TINY:
        cfg = TINY_CONFIG
        state = tiny_state_dict("qwen3_omni", cfg, lambda: random_state_dict(cfg))
    else:
        ckpt = resolve_checkpoint_dir(weights)
        cfg, state = _read_checkpoint(ckpt, device, dtype)
    with _params_on_meta():
        model = build_model(cfg, "cpu")
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise WeightsError(
            f"checkpoint does not match Qwen3-Omni: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    # Rotary frequency tables stay float32 whatever the weights' dtype: bf16 would blur long positions.
    tables = {n: b.clone() for n, b in model.named_buffers() if n.endswith("inv_freq")}
    model = model.to(device=device, dtype=dtype).eval()
    for name, table in tables.items():
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._buffers[leaf] = table.to(device)
    return cfg, model, ckpt


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
