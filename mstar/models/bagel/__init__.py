"""BAGEL (ByteDance-Seed/BAGEL-7B-MoT): unified multimodal understanding and generation."""
