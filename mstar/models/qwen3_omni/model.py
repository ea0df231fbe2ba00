"""Qwen3-Omni's module tree, named exactly as the published checkpoint (``thinker.*``, ``talker.*``, ``code2wav.*``).

The autoregressive parts (Thinker text model, Talker, code predictor) are our
own modules on the shared slot KV cache, so every decode step batches all
requests. The audio and vision encoders and Code2Wav are transformers'
modules built from the same config (stateless per call; we batch their inputs).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mstar.layers.attention import AttnBatch
from mstar.layers.invariant import BatchInvariantLinear
from mstar.layers.kv_cache import KVCache
from mstar.layers.mrope import mrope_cos_sin
from mstar.layers.norms import RMSNorm
from mstar.layers.rotary import RotaryEmbedding, rope_inv_freq
from mstar.models.qwen3_omni.config import head_dim
from mstar.models.qwen3_omni.decoder import DecoderLayer, StackOutput, run_layers

__all__ = ["CodePredictor", "Qwen3Omni", "Talker", "Thinker"]


class _MRopeStack(nn.Module):
    """Shared MRoPE set-up for the Thinker and Talker text stacks."""

    inv_freq: torch.Tensor

    def _init_rope(self, cfg: dict[str, Any]) -> None:
        rope = cfg["rope_parameters"]
        self.register_buffer("inv_freq", rope_inv_freq(head_dim(cfg), float(rope["rope_theta"])), persistent=False)
        self.mrope_section = list(rope.get("mrope_section", [24, 20, 20]))
        self.interleaved = bool(rope.get("interleaved", rope.get("mrope_interleaved", True)))

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return mrope_cos_sin(positions, self.inv_freq, self.mrope_section, interleaved=self.interleaved)


class ThinkerTextModel(_MRopeStack):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg["num_hidden_layers"]))
        self.norm = RMSNorm(cfg["hidden_size"], cfg.get("rms_norm_eps", 1e-6))
        self._init_rope(cfg)

    def forward_embeds(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        batch: AttnBatch,
        *,
        capture: int | None = None,
        deepstack: list[torch.Tensor] | None = None,
        deepstack_mask: torch.Tensor | None = None,
    ) -> StackOutput:
        """The decoder stack over input embeddings ``x`` (the tensor-parallel seam: it uses only
        the layers, the norm and the rotary table, never the token embedding)."""
        cos, sin = self.rope(positions)
        return run_layers(
            self.layers, self.norm, x, cos, sin, cache, batch,
            capture=capture, deepstack=deepstack, deepstack_mask=deepstack_mask,
        )


class ThinkerModel(nn.Module):
    """Audio tower, vision tower and the MoE language model."""

    def __init__(self, cfg: dict[str, Any], hf_cfg: Any) -> None:
        super().__init__()
        from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
            Qwen3OmniMoeAudioEncoder,
            Qwen3OmniMoeVisionEncoder,
        )

        self.audio_tower = Qwen3OmniMoeAudioEncoder(hf_cfg.audio_config)
        self.visual = Qwen3OmniMoeVisionEncoder(hf_cfg.vision_config)
        self.language_model = ThinkerTextModel(cfg["text_config"])


class Thinker(nn.Module):
    def __init__(self, cfg: dict[str, Any], hf_cfg: Any) -> None:
        super().__init__()
        text = cfg["text_config"]
        self.model = ThinkerModel(cfg, hf_cfg)
        self.lm_head = BatchInvariantLinear(text["hidden_size"], text["vocab_size"], bias=False)

    def forward_embeds(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        batch: AttnBatch,
        *,
        capture: int | None = None,
        deepstack: list[torch.Tensor] | None = None,
        deepstack_mask: torch.Tensor | None = None,
    ) -> StackOutput:
        return self.model.language_model.forward_embeds(
            x, positions, cache, batch, capture=capture, deepstack=deepstack, deepstack_mask=deepstack_mask
        )


class ResizeMLP(nn.Module):
    """Thinker width -> Talker width (two biased linears with SiLU between)."""

    def __init__(self, d_in: int, d_mid: int, d_out: int) -> None:
        super().__init__()
        self.linear_fc1 = BatchInvariantLinear(d_in, d_mid, bias=True)
        self.linear_fc2 = BatchInvariantLinear(d_mid, d_out, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(F.silu(self.linear_fc1(x)))


class TalkerModel(_MRopeStack):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg["num_hidden_layers"]))
        self.norm = RMSNorm(cfg["hidden_size"], cfg.get("rms_norm_eps", 1e-6))
        self.codec_embedding = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])
        self._init_rope(cfg)

    def forward_embeds(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache, batch: AttnBatch) -> torch.Tensor:
        """The decoder stack over input embeddings ``x`` (the tensor-parallel seam; the codec
        embedding is applied by the caller)."""
        cos, sin = self.rope(positions)
        return run_layers(self.layers, self.norm, x, cos, sin, cache, batch).hidden


class CodePredictorModel(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, dense=True) for i in range(cfg["num_hidden_layers"]))
        self.norm = RMSNorm(cfg["hidden_size"], cfg.get("rms_norm_eps", 1e-6))
        self.codec_embedding = nn.ModuleList(
            nn.Embedding(cfg["vocab_size"], cfg["hidden_size"]) for _ in range(cfg["num_code_groups"] - 1)
        )
        self.rotary = RotaryEmbedding(head_dim(cfg), float(cfg["rope_parameters"]["rope_theta"]))


class CodePredictor(nn.Module):
    """Predicts the residual codebooks 1..G-1 of one frame from the Talker state and code 0."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.model = CodePredictorModel(cfg)
        self.lm_head = nn.ModuleList(
            BatchInvariantLinear(cfg["hidden_size"], cfg["vocab_size"], bias=False)
            for _ in range(cfg["num_code_groups"] - 1)
        )

    def forward_embeds(self, x: torch.Tensor, cache: KVCache, batch: AttnBatch) -> torch.Tensor:
        cos, sin = self.model.rotary(batch.positions)
        return run_layers(self.model.layers, self.model.norm, x, cos, sin, cache, batch).hidden


class Talker(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        text = cfg["text_config"]
        self.model = TalkerModel(text)
        self.text_projection = ResizeMLP(cfg["thinker_hidden_size"], text["intermediate_size"], text["hidden_size"])
        self.hidden_projection = ResizeMLP(cfg["thinker_hidden_size"], text["intermediate_size"], text["hidden_size"])
        self.codec_head = BatchInvariantLinear(text["hidden_size"], text["vocab_size"], bias=False)
        self.code_predictor = CodePredictor(cfg["code_predictor_config"])

    def forward_embeds(
        self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache, batch: AttnBatch
    ) -> torch.Tensor:
        return self.model.forward_embeds(x, positions, cache, batch)


class Qwen3Omni(nn.Module):
    """The whole model; ``talker``/``code2wav`` are None when audio output is disabled."""

    def __init__(self, cfg: dict[str, Any], hf_cfg: Any) -> None:
        super().__init__()
        from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeCode2Wav

        self.thinker = Thinker(cfg["thinker_config"], hf_cfg.thinker_config)
        self.talker: Talker | None = None
        self.code2wav: nn.Module | None = None
        if cfg.get("enable_audio_output", True):
            self.talker = Talker(cfg["talker_config"])
            self.code2wav = Qwen3OmniMoeCode2Wav(hf_cfg.code2wav_config)
