"""Model families: one sub-package each, plus the runner contract and kwarg validation."""
