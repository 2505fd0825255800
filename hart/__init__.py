"""HART: hybrid autoregressive text-to-image generation in plain PyTorch."""
