"""Orpheus constants (token layout, voices, sampling defaults) and the full and tiny configurations."""

from __future__ import annotations

from dataclasses import dataclass, replace

from mstar.codecs.snac import SNAC_24KHZ, SNACConfig
from mstar.layers.llama import LlamaConfig
from mstar.registry import get_model_info

__all__ = [
    "AUDIO_TOKEN_BASE",
    "BOS",
    "CODEBOOK_SIZE",
    "CODES_PER_FRAME",
    "DEFAULT_VOICE",
    "END_OF_HUMAN",
    "END_OF_TEXT",
    "FULL_LLAMA",
    "PROMPT_SUFFIX",
    "START_OF_HUMAN",
    "STOP_TOKEN",
    "TINY_LLAMA",
    "TINY_SNAC",
    "VOICES",
    "WINDOW_FRAMES",
    "OrpheusConfig",
]

# ---- token layout of the published tokenizer (Llama-3 ids plus 28,684 added tokens)
BOS = 128000  # <|begin_of_text|>, added by the tokenizer
END_OF_TEXT = 128009  # <|eot_id|>
CUSTOM_TOKEN_BASE = 128256  # id of <custom_token_0>
START_OF_HUMAN = 128259  # <custom_token_3>: opens the prompt
END_OF_HUMAN = 128260  # <custom_token_4>
START_OF_AI = 128261  # <custom_token_5>
START_OF_SPEECH = 128257  # <custom_token_1>: the model speaks next
STOP_TOKEN = 128258  # <custom_token_2>: end of speech
PROMPT_SUFFIX = (END_OF_TEXT, END_OF_HUMAN, START_OF_AI, START_OF_SPEECH)

# Audio code c at position j (0..6) of a frame is <custom_token_{10 + j*4096 + c}>.
AUDIO_TOKEN_BASE = CUSTOM_TOKEN_BASE + 10
CODEBOOK_SIZE = 4096
CODES_PER_FRAME = 7
#: SNAC decodes a sliding window of this many frames and keeps the second one.
WINDOW_FRAMES = 4

# The voice list lives in the registry (torch-free), so adapters and /v1/audio/voices read the same one.
VOICES = get_model_info("orpheus").voices
DEFAULT_VOICE = get_model_info("orpheus").default_voice or VOICES[0]

# ---- sampling defaults of the reference system
TEMPERATURE = 0.6
TOP_P = 0.8
REPETITION_PENALTY = 1.3

#: canopylabs/orpheus-3b-0.1-ft: Llama-3.2-3B with the vocabulary grown to 156,940.
FULL_LLAMA = LlamaConfig(
    vocab_size=156940,
    hidden_size=3072,
    intermediate_size=8192,
    num_hidden_layers=28,
    num_attention_heads=24,
    num_key_value_heads=8,
    head_dim=128,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    rope_scaling={
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    max_position_embeddings=131072,
    tie_word_embeddings=True,
)

#: Same layout and vocabulary (so the special ids are the real ones), a toy width.
#: Untied head: the tiny weights steer embeddings and head separately (see weights.py).
TINY_LLAMA = replace(
    FULL_LLAMA,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rope_scaling=dict(FULL_LLAMA.rope_scaling or {}),
    tie_word_embeddings=False,
)

#: The 24 kHz codec's structure and hop (2048 samples per frame) with narrow channels.
TINY_SNAC = SNACConfig(
    sampling_rate=24000,
    encoder_dim=4,
    encoder_rates=(2, 4, 8, 8),
    latent_dim=16,
    decoder_dim=32,
    decoder_rates=(8, 8, 4, 2),
    attn_window_size=None,
    codebook_size=4096,
    codebook_dim=4,
    vq_strides=(4, 2, 1),
    noise=True,
    depthwise=True,
)


@dataclass(frozen=True)
class OrpheusConfig:
    """The two networks a runner is built from; serving limits are :class:`mstar.settings.Sizing`."""

    llama: LlamaConfig
    snac: SNACConfig

    @classmethod
    def tiny(cls) -> OrpheusConfig:
        return cls(TINY_LLAMA, TINY_SNAC)

    @classmethod
    def full(cls, llama: LlamaConfig = FULL_LLAMA, snac: SNACConfig = SNAC_24KHZ) -> OrpheusConfig:
        return cls(llama, snac)
