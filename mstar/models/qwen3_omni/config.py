"""Qwen3-Omni configurations: the published 30B-A3B layout and a tiny random variant.

Both are plain dicts in the layout of transformers' ``Qwen3OmniMoeConfig``
(``thinker_config`` / ``talker_config`` / ``code2wav_config``), so the same
numbers build our modules and, in tests, transformers' reference model.
The published values come from the checkpoint's ``config.json``; where
transformers' dataclass defaults differ (they still carry Qwen2.5-Omni token
ids and a smaller text stack) the published value wins.
"""

from __future__ import annotations

import copy
from typing import Any

__all__ = ["FULL_CONFIG", "TINY_CONFIG", "build_hf_config", "head_dim", "speakers"]

_MROPE = {
    "rope_type": "default",
    "rope_theta": 1000000.0,
    "mrope_section": [24, 20, 20],
    "interleaved": True,
    "mrope_interleaved": True,
}

_TOKEN_IDS: dict[str, Any] = {
    "im_start_token_id": 151644,
    "im_end_token_id": 151645,
    "tts_pad_token_id": 151671,
    "tts_bos_token_id": 151672,
    "tts_eos_token_id": 151673,
    "system_token_id": 8948,
    "user_token_id": 872,
    "assistant_token_id": 77091,
}
_MM_IDS: dict[str, Any] = {
    "audio_token_id": 151675,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "audio_start_token_id": 151669,
    "position_id_per_seconds": 13,
}

FULL_CONFIG: dict[str, Any] = {
    **_TOKEN_IDS,
    "enable_audio_output": True,
    "thinker_config": {
        **_MM_IDS,
        "vision_start_token_id": 151652,
        "user_token_id": 872,
        "audio_config": {
            "num_mel_bins": 128,
            "encoder_layers": 32,
            "encoder_attention_heads": 20,
            "encoder_ffn_dim": 5120,
            "d_model": 1280,
            "output_dim": 2048,
            "max_source_positions": 1500,
            "n_window": 50,
            "n_window_infer": 800,
            "conv_chunksize": 500,
            "downsample_hidden_size": 480,
            "activation_function": "gelu",
        },
        "vision_config": {
            "depth": 27,
            "hidden_size": 1152,
            "intermediate_size": 4304,
            "num_heads": 16,
            "in_channels": 3,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": 2048,
            "num_position_embeddings": 2304,
            "deepstack_visual_indexes": [8, 16, 24],
            "hidden_act": "gelu_pytorch_tanh",
        },
        "text_config": {
            "vocab_size": 152064,
            "hidden_size": 2048,
            "intermediate_size": 768,
            "moe_intermediate_size": 768,
            "num_hidden_layers": 48,
            "num_attention_heads": 32,
            "num_key_value_heads": 4,
            "head_dim": 128,
            "num_experts": 128,
            "num_experts_per_tok": 8,
            "norm_topk_prob": True,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "rms_norm_eps": 1e-6,
            "max_position_embeddings": 65536,
            "rope_parameters": dict(_MROPE),
        },
    },
    "talker_config": {
        **_MM_IDS,
        "vision_start_token_id": 151652,
        "spatial_merge_size": 2,
        "num_code_groups": 16,
        "thinker_hidden_size": 2048,
        "accept_hidden_layer": 24,
        "codec_eos_token_id": 2150,
        "codec_nothink_id": 2155,
        "codec_think_bos_id": 2156,
        "codec_think_eos_id": 2157,
        "codec_pad_id": 2148,
        "codec_bos_id": 2149,
        "speaker_id": {"chelsie": 2301, "ethan": 2302, "aiden": 2303},
        "text_config": {
            "vocab_size": 3072,
            "hidden_size": 1024,
            "intermediate_size": 2048,
            "moe_intermediate_size": 384,
            "shared_expert_intermediate_size": 768,
            "num_hidden_layers": 20,
            "num_attention_heads": 16,
            "num_key_value_heads": 2,
            "head_dim": 128,
            "num_experts": 128,
            "num_experts_per_tok": 6,
            "norm_topk_prob": True,
            "rms_norm_eps": 1e-6,
            "max_position_embeddings": 65536,
            "rope_parameters": dict(_MROPE),
        },
        "code_predictor_config": {
            "vocab_size": 2048,
            "hidden_size": 1024,
            "intermediate_size": 3072,
            "num_hidden_layers": 5,
            "num_attention_heads": 16,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "num_code_groups": 16,
            "rms_norm_eps": 1e-6,
            "max_position_embeddings": 32768,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        },
    },
    "code2wav_config": {
        "codebook_size": 2048,
        "hidden_size": 1024,
        "num_hidden_layers": 8,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "intermediate_size": 3072,
        "num_quantizers": 16,
        "sliding_window": 72,
        "upsample_rates": [8, 5, 4, 3],
        "upsampling_ratios": [2, 2],
        "decoder_dim": 1536,
        "layer_scale_initial_scale": 0.01,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 8000,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    },
}


# Widths shared by the tiny variant's three decoders (Thinker, Talker, code predictor).
_TINY_DECODER: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 4096,
}
# And the experts of the two MoE ones.
_TINY_MOE: dict[str, Any] = {"moe_intermediate_size": 16, "num_experts": 8, "num_experts_per_tok": 2}


def _tiny() -> dict[str, Any]:
    cfg = copy.deepcopy(FULL_CONFIG)
    small_rope = {**_MROPE, "mrope_section": [4, 2, 2]}
    th = cfg["thinker_config"]
    th["audio_config"].update(
        encoder_layers=2,
        encoder_attention_heads=2,
        encoder_ffn_dim=64,
        d_model=32,
        output_dim=32,
        downsample_hidden_size=8,
    )
    th["vision_config"].update(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=32,
        deepstack_visual_indexes=[0, 1],
    )
    th["text_config"].update(_TINY_DECODER, **_TINY_MOE, num_hidden_layers=4, rope_parameters=dict(small_rope))
    tk = cfg["talker_config"]
    tk.update(num_code_groups=4, thinker_hidden_size=32, accept_hidden_layer=3)
    tk["text_config"].update(
        _TINY_DECODER,
        **_TINY_MOE,
        shared_expert_intermediate_size=32,
        num_hidden_layers=2,
        rope_parameters=dict(small_rope),
    )
    tk["code_predictor_config"].update(_TINY_DECODER, num_hidden_layers=2, num_code_groups=4)
    cfg["code2wav_config"].update(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=64,
        num_quantizers=4,
        decoder_dim=32,
    )
    return cfg


#: Small random variant: every structural feature of the full model, tiny widths.
TINY_CONFIG: dict[str, Any] = _tiny()


def head_dim(cfg: dict[str, Any]) -> int:
    """Per-head width of a decoder config (``head_dim``, else ``hidden_size / num_attention_heads``)."""
    return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


def speakers(cfg: dict[str, Any]) -> dict[str, int]:
    """Voice name (lower case) -> codec speaker token id."""
    return dict(cfg["talker_config"]["speaker_id"])


def build_hf_config(cfg: dict[str, Any]) -> Any:
    """transformers' ``Qwen3OmniMoeConfig`` for ``cfg`` (used for the encoders, Code2Wav and tests)."""
    import logging

    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeConfig

    # The published rope dict carries mrope keys the validator does not know; that warning is noise here.
    logging.getLogger("transformers.modeling_rope_utils").setLevel(logging.ERROR)
    hf: Any = Qwen3OmniMoeConfig(**copy.deepcopy(cfg))
    for sub in (
        hf.thinker_config.text_config,
        hf.thinker_config.audio_config,
        hf.thinker_config.vision_config,
        hf.talker_config.text_config,
        hf.talker_config.code_predictor_config,
        hf.code2wav_config,
    ):
        sub._attn_implementation = "sdpa"
    return hf
