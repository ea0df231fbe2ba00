"""V-JEPA 2 (video encoder latents) and V-JEPA 2-AC (action-conditioned world model).

The runners are ``runner.VJEPA2Runner`` and ``ac_runner.VJEPA2ACRunner``;
the modules live in ``encoder`` and ``predictor``, weights loading in
``checkpoint``.
"""
