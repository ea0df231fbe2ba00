"""Qwen3-Omni (Thinker-Talker MoE with Code2Wav): text, image, audio and video in; text and 24 kHz speech out.

Where things are:

- ``config``: the published 30B-A3B config and the tiny random variant (transformers' layout).
- ``model`` / ``decoder``: the module tree, named as the checkpoint; our batched MoE decoders
  (Thinker text model, Talker, code predictor) plus transformers' encoders and Code2Wav.
- ``weights``: building the tree, tiny weights, checkpoint directories.
- ``tokenizer`` / ``prompt`` / ``processor``: tokens, chat template with media placeholders and
  MRoPE positions, log-mel and patch preprocessing.
- ``runner`` (entry point), ``thinker_steps``, ``talker_steps``, ``state``: the per-step batched
  state machine the scheduler drives.
"""
