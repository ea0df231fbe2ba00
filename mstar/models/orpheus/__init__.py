"""Orpheus text-to-speech: a Llama-3.2-3B that writes SNAC 24 kHz codes, decoded as they arrive."""
