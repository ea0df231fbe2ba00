"""Shared building blocks: attention with a KV cache, rotary embeddings, sampling, decoders."""
