"""The model registry: which families mstar serves and what each can do.

Torch-free: ``mstar.list_models()`` and the client may read it without
loading any model code. Each family adds exactly one entry here; the runner
class is imported only when an Engine is built.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mstar.errors import UnknownModelError, UnsupportedModalityError

if TYPE_CHECKING:
    from mstar.models.base import ModelRunner

__all__ = ["ModelInfo", "get_model_info", "list_models", "load_runner_class", "register_model"]


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What a model family is and what it can do."""

    name: str
    description: str
    hub_id: str
    input_modalities: tuple[str, ...]
    output_modalities: tuple[str, ...]
    runner: str  # "package.module:ClassName", imported lazily
    #: Speaker names the model knows (the one list adapters, runners and /v1/audio/voices read).
    voices: tuple[str, ...] = ()
    default_voice: str | None = None
    #: What a request produces when it names no ``output_modalities`` (Engine, server and client);
    #: empty means the first of ``output_modalities``.
    default_output_modalities: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        stray = [m for m in self.default_output_modalities if m not in self.output_modalities]
        if stray:
            raise ValueError(f"model {self.name!r}: default output {stray} is not among its outputs {self.output_modalities}")

    @property
    def default_outputs(self) -> tuple[str, ...]:
        """The output modalities of a request that names none."""
        return self.default_output_modalities or self.output_modalities[:1]

    def check_inputs(self, modalities: tuple[str, ...] | list[str]) -> None:
        """Refuse input modalities this model does not take (the one wording, Engine and server)."""
        unsupported = [m for m in modalities if m not in self.input_modalities]
        if unsupported:
            raise UnsupportedModalityError(
                f"model {self.name!r} does not accept {', '.join(unsupported)} input; it accepts: "
                f"{', '.join(self.input_modalities)}",
                param="input_modalities",
            )

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "description": self.description,
            "hub_id": self.hub_id,
            "input_modalities": list(self.input_modalities),
            "output_modalities": list(self.output_modalities),
            "default_output_modalities": list(self.default_outputs),
            "voices": list(self.voices),
            "default_voice": self.default_voice,
        }


_MODELS: dict[str, ModelInfo] = {
    info.name: info
    for info in (
        ModelInfo(
            name="orpheus",
            description="Orpheus 3B text-to-speech: Llama-3.2-3B emitting SNAC 24 kHz codec tokens",
            hub_id="canopylabs/orpheus-3b-0.1-ft",
            input_modalities=("text",),
            output_modalities=("audio",),
            default_output_modalities=("audio",),
            runner="mstar.models.orpheus.runner:OrpheusRunner",
            voices=("tara", "zoe", "zac", "jess", "leo", "mia", "julia", "leah"),
            default_voice="tara",
        ),
        ModelInfo(
            name="pi05",
            description="Pi0.5 vision-language-action policy: PaliGemma + Gemma-300M flow-matching action expert",
            hub_id="lerobot/pi05_base",
            input_modalities=("text", "image"),
            output_modalities=("action",),
            default_output_modalities=("action",),
            runner="mstar.models.pi05.runner:Pi05Runner",
        ),
        ModelInfo(
            name="bagel",
            description="BAGEL-7B-MoT: Qwen2 mixture-of-transformers for chat, text-to-image and image editing",
            hub_id="ByteDance-Seed/BAGEL-7B-MoT",
            input_modalities=("text", "image"),
            output_modalities=("text", "image"),
            default_output_modalities=("text",),
            runner="mstar.models.bagel.runner:BagelRunner",
        ),
        ModelInfo(
            name="vjepa2",
            description="V-JEPA 2 ViT-L video encoder: a clip in, patch latents [tokens, 1024] out",
            hub_id="facebook/vjepa2-vitl-fpc64-256",
            input_modalities=("video",),
            output_modalities=("latent",),
            default_output_modalities=("latent",),
            runner="mstar.models.vjepa2.runner:VJEPA2Runner",
        ),
        ModelInfo(
            name="vjepa2_ac",
            description="V-JEPA 2-AC world model: ViT-g encoder + action-conditioned predictor (rollout, action scoring)",
            hub_id="facebook/vjepa2-vitg-fpc64-256",
            input_modalities=("video", "image"),
            output_modalities=("latent",),
            default_output_modalities=("latent",),
            runner="mstar.models.vjepa2.ac_runner:VJEPA2ACRunner",
        ),
        ModelInfo(
            name="qwen3_omni",
            description="Qwen3-Omni 30B-A3B: MoE Thinker (text, image, audio, video in) with a MoE Talker and Code2Wav for 24 kHz speech",
            hub_id="Qwen/Qwen3-Omni-30B-A3B-Instruct",
            input_modalities=("text", "image", "audio", "video"),
            output_modalities=("text", "audio"),
            default_output_modalities=("text",),
            runner="mstar.models.qwen3_omni.runner:Qwen3OmniRunner",
            # The published Talker's speaker table (talker_config.speaker_id), in its order.
            voices=("Chelsie", "Ethan", "Aiden"),
            default_voice="Ethan",
        ),
    )
}


def register_model(info: ModelInfo) -> None:
    """Add (or replace) a model family: for plugins and tests."""
    _MODELS[info.name] = info


def list_models() -> list[ModelInfo]:
    """Every model family this install can serve, with its capabilities."""
    return list(_MODELS.values())


def get_model_info(name: str) -> ModelInfo:
    try:
        return _MODELS[name]
    except KeyError:
        raise UnknownModelError(name, _MODELS) from None


def load_runner_class(name: str) -> type[ModelRunner]:
    module_name, _, cls_name = get_model_info(name).runner.partition(":")
    return getattr(importlib.import_module(module_name), cls_name)  # type: ignore[no-any-return]
