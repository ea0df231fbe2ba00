"""Neural codecs that turn model tokens or latents into media (SNAC, VAEs, ...)."""
