"""Qwen3-Omni (Thinker-Talker MoE with Code2Wav): text, image, audio and video in; text and 24 kHz speech out.

Where things are:

- ``config``: the published 30B-A3B config and the tiny random variant (transformers' layout).
- ``model`` / ``decoder``: the module tree, named as the checkpoint; our batched MoE decoders
  (Thinker text model, Talker, code predictor) plus transformers' encoders and Code2Wav.
- ``weights``: building the tree, tiny weights, checkpoint directories.
- ``tokenizer`` / ``prompt`` / ``processor``: tokens, chat template with media placeholders and
  MRoPE positions, log-mel and patch preprocessing.
- ``state``: what ``prepare`` builds (``Encoded``) and ``admit`` sets (``OmniState``) per request.
- ``thinker``: ``ThinkerStage``, the Thinker and its KV cache (batched prefill with the encoders, decode).
- ``talker``: ``TalkerStage``, the Talker, code predictor, their KV caches and Code2Wav streaming.
- ``runner`` (entry point): validate/prepare/admit/step/release/stats, orchestrating the two stages.
"""
