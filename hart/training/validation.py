"""Validation images: fixed prompts and seeds, sampled with the current weights, saved as one grid.

The draws come only from per-image generators seeded by the fixed seeds, so validation never
changes the training run's random streams.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from hart.sampling import sample_scales
from hart.text import TextConditioning


@torch.no_grad()
def sample_images(transformer, vae, cond: TextConditioning, seeds: Sequence[int], guidance_scale: float) -> np.ndarray:
    """`(B, H, W, 3)` uint8 images for the prompts encoded in `cond`, one seed each."""
    device = next(transformer.parameters()).device
    generators = [torch.Generator(device).manual_seed(int(s)) for s in seeds]
    cond = TextConditioning(*(t.to(device) for t in cond))
    was_training = transformer.training
    transformer.eval()
    try:
        f_hat_BChw = sample_scales(transformer, vae.quantize, cond, None, guidance_scale=guidance_scale,
                                   more_smooth=True, generator=generators)
    finally:
        transformer.train(was_training)
    weight = vae.post_quant_conv.weight
    images_B3HW = vae.decode_latent(f_hat_BChw.to(weight.device, weight.dtype)).float()
    images = ((images_B3HW + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images_BHWC: np.ndarray, path, columns: int = 4, pad: int = 2) -> Path:
    """Tile the images in rows of `columns` with a white gap, as a PNG."""
    B, H, W, _ = images_BHWC.shape
    cols = min(columns, B)
    rows = (B + cols - 1) // cols
    grid = np.full((rows * (H + pad) + pad, cols * (W + pad) + pad, 3), 255, dtype=np.uint8)
    for i, img in enumerate(images_BHWC):
        r, c = divmod(i, cols)
        grid[pad + r * (H + pad): pad + r * (H + pad) + H, pad + c * (W + pad): pad + c * (W + pad) + W] = img
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return path
