"""Decoder refinement: the tokenizer's decoder learns to draw a training image from a latent the transformer
drew for it, so that it cleans up what the transformer's last scales get wrong.

The transformer is given the first `keep_scales` scales of a training image's own codes and draws the
rest from the image's caption, as at generation (guidance, top-k, residual diffusion). That latent is
close to the image's own, but carries the transformer's typical faults (on the bundled shapes world:
faint ghost outlines beside objects, ragged edges). The decoder (its post-quant convolution and the
decoder itself; encoder and codebook stay frozen, so cached codes stay valid) is then trained with an L1
loss to decode such latents to the image, and on a share of batches the image's own latent, so
reconstructions stay as sharp as before.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

from hart.sampling import ForcedTokens, SamplingOptions
from hart.training.runtime import warmup_cosine


@torch.no_grad()
def drawn_latents(pipe, images_B3HW: torch.Tensor, captions: Sequence[str], *, keep_scales: int,
                  guidance_scale: float, seeds: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(latent the transformer drew after the images' first `keep_scales` scales, the images' own latent).

    Images are (B, 3, H, W) in [-1, 1]; one seed per image. Both latents are (B, Cvae, h, w) float32.
    """
    if not 0 < keep_scales < len(pipe.transformer.patch_nums):
        raise ValueError(f"`keep_scales` must be between 1 and {len(pipe.transformer.patch_nums) - 1} "
                         f"(the transformer draws the scales after them), got {keep_scales}.")
    if not len(images_B3HW) == len(captions) == len(seeds):
        raise ValueError(f"got {len(images_B3HW)} images, {len(captions)} captions and {len(seeds)} seeds; "
                         "give one caption and one seed per image.")
    vae = pipe.vae
    idx, residual = vae.img_to_tokens(images_B3HW)
    own = vae.quantize.idx_to_fhat(idx, pipe.transformer.patch_nums, residual)
    cond = pipe.encode_prompt(list(captions), pipe._execution_device)
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    drawn = pipe.scale_loop(cond, None, SamplingOptions(guidance_scale=guidance_scale), generator=generators,
                            forced=ForcedTokens(idx=list(idx[:keep_scales])))
    return drawn.float(), own.float()


def refine_decoder(vae, drawn_NChw: torch.Tensor, own_NChw: torch.Tensor, images_N3HW: torch.Tensor, *,
                   steps: int, lr: float, batch_size: int = 16, own_share: float = 0.25, warmup_steps: int = 50,
                   min_lr_ratio: float = 0.05, seed: int = 0, log_every: int = 250) -> List[Tuple[int, float]]:
    """Train `vae`'s post-quant convolution and decoder in place; images are uint8 (N, 3, H, W).

    Each step decodes `batch_size` latents, each the drawn one or, with probability `own_share`, the
    image's own, with AdamW, a linear warm-up and a cosine decay to `min_lr_ratio` x `lr` (`warmup_cosine`).
    Returns (step, L1 loss) every `log_every` steps and at the last.
    """
    if not len(drawn_NChw) == len(own_NChw) == len(images_N3HW):
        raise ValueError(f"got {len(drawn_NChw)} drawn latents, {len(own_NChw)} own latents and "
                         f"{len(images_N3HW)} images; they must pair up.")
    if images_N3HW.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 (0-255), got {images_N3HW.dtype}.")
    if steps < 1 or not lr > 0 or not 0 <= own_share <= 1:
        raise ValueError(f"need steps >= 1, lr > 0 and own_share in [0, 1]; got {steps}, {lr}, {own_share}.")
    trained = list(vae.post_quant_conv.parameters()) + list(vae.decoder.parameters())
    vae.requires_grad_(False)
    for p in trained:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup_steps, steps, min_lr_ratio))
    rng = torch.Generator().manual_seed(seed)
    log = []
    vae.train()
    for step in range(steps):
        rows = torch.randint(len(images_N3HW), (batch_size,), generator=rng)
        use_own = torch.rand(batch_size, generator=rng) < own_share
        z_BChw = torch.where(use_own[:, None, None, None], own_NChw[rows], drawn_NChw[rows])
        target_B3HW = images_N3HW[rows].float() / 127.5 - 1
        decoded = vae.decoder(vae.post_quant_conv(z_BChw.contiguous(memory_format=torch.channels_last)))
        loss = (decoded - target_B3HW).abs().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % log_every == 0 or step == steps - 1:
            log.append((step, loss.item()))
    vae.requires_grad_(False)
    vae.eval()
    return log
