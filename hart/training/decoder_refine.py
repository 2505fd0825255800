"""Decoder refinement: the tokenizer's decoder learns to draw a training image from a latent the transformer
drew for it, so that it cleans up what the transformer's last scales get wrong.

The transformer is given the first `keep_scales` scales of a training image's own codes and draws the
rest from the image's caption, as at generation (guidance, top-k, residual diffusion). That latent is
close to the image's own, but carries the transformer's typical faults (on the bundled shapes world:
faint ghost outlines beside objects, ragged edges). The decoder (its post-quant convolution and the
decoder itself; encoder and codebook stay frozen, so cached codes stay valid) is then trained with an L1
loss to decode such latents to the image, and on a share of batches the image's own latent, so
reconstructions stay as sharp as before.

A decoder refined so has learnt to turn what its transformer draws into the world's own shapes, and does
the same to a concept a fine-tune teaches (a star's points come out blunt). So when the base model's notes
say its decoder was refined (`"decoder_refined": true` in its bundled.json), a fine-tune refines the
exported decoder again (`refine_after_finetune`): on latents the fine-tuned transformer draws for the
user's images, mixed with as many rendered scenes of the model's world.
"""
from __future__ import annotations

import logging
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from hart.sampling import ForcedTokens, SamplingOptions
from hart.training.runtime import warmup_cosine

logger = logging.getLogger(__name__)

FINETUNE_USER_DRAWS = 256  # latents drawn from the user's images after a fine-tune (cycling through them)
FINETUNE_WORLD_DRAWS = 256  # and from rendered scenes of the model's world, so its old shapes stay clean
FINETUNE_STEPS = 300  # with the star run's 48 images: found in 14 of 16 seeds again (8 without refining)
FINETUNE_LR = 2e-4
DRAW_BATCH = 64


@torch.no_grad()
def drawn_latents(pipe, images_N3HW: torch.Tensor, captions: Sequence[str], *, keep_scales: int,
                  guidance_scale: float, seeds: Sequence[int],
                  use_system_prompt: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """(latent the transformer drew after the images' first `keep_scales` scales, the images' own latent).

    Images are uint8 (N, 3, H, W), drawn `DRAW_BATCH` at a time; one seed per image; captions are
    encoded as the pipeline does (`use_system_prompt` as its argument). Both latents are
    (N, Cvae, h, w) float32, on the pipeline's device.
    """
    if not 0 < keep_scales < len(pipe.transformer.patch_nums):
        raise ValueError(f"`keep_scales` must be between 1 and {len(pipe.transformer.patch_nums) - 1} "
                         f"(the transformer draws the scales after them), got {keep_scales}.")
    if not len(images_N3HW) == len(captions) == len(seeds):
        raise ValueError(f"got {len(images_N3HW)} images, {len(captions)} captions and {len(seeds)} seeds; "
                         "give one caption and one seed per image.")
    if images_N3HW.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 (0-255), got {images_N3HW.dtype}.")
    vae, device, drawn, own = pipe.vae, pipe._execution_device, [], []
    for lo in range(0, len(images_N3HW), DRAW_BATCH):
        x_B3HW = images_N3HW[lo:lo + DRAW_BATCH].to(device).float() / 127.5 - 1
        idx, residual = vae.img_to_tokens(x_B3HW)
        own.append(vae.quantize.idx_to_fhat(idx, pipe.transformer.patch_nums, residual).float())
        cond = pipe.encode_prompt(list(captions[lo:lo + DRAW_BATCH]), device, use_system_prompt=use_system_prompt)
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds[lo:lo + DRAW_BATCH]]
        drawn.append(pipe.scale_loop(cond, None, SamplingOptions(guidance_scale=guidance_scale), generator=generators,
                                     forced=ForcedTokens(idx=list(idx[:keep_scales]))).float())
    return torch.cat(drawn), torch.cat(own)


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


def refining_due(cfg) -> bool:
    """Whether a fine-tune (`cfg`: its `FinetuneConfig`) refines its exported decoder."""
    from hart.training.checks import model_notes

    if cfg.refine_decoder == "auto":
        return bool(model_notes(cfg.pretrained).get("decoder_refined"))
    return cfg.refine_decoder == "always"


def refine_after_finetune(pipe, cfg, world: Optional[str]) -> Optional[str]:
    """Refine `pipe`'s decoder in place on latents its (fine-tuned) transformer draws at the pipeline's own
    guidance, the last scale drawn and the others kept: `FINETUNE_USER_DRAWS` for the run's images
    (`cfg.data_dir`, centre-cropped; cycling through them, each draw from its own seed) and
    `FINETUNE_WORLD_DRAWS` for rendered scenes of `world` (None: the user's images alone), then
    `cfg.refine_steps` steps (None: `FINETUNE_STEPS`). Returns what it did, in words, or None when the
    run has no images to refine on (it reads a cache)."""
    from hart.training.data import ImageCaptionFolder
    from hart.training.prior import render_world

    if cfg.data_dir is None:
        logger.warning("the decoder is not refined after training: the run reads a cache, which holds no pixels "
                       "(give --data_dir as well)")
        return None
    patch_nums = pipe.transformer.patch_nums
    folder = ImageCaptionFolder(cfg.data_dir, patch_nums[-1] * pipe.vae.downsample_factor, crop="center",
                                flip=False, seed=cfg.seed, min_size=cfg.min_image_size)
    examples = [folder[(0, i)] for i in range(min(len(folder), FINETUNE_USER_DRAWS))]
    to_uint8 = [((e["pixel_values"] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8) for e in examples]
    user = [(to_uint8[i % len(examples)], examples[i % len(examples)]["caption"]) for i in range(FINETUNE_USER_DRAWS)]
    scenes = []
    if world is not None:
        scenes = [(torch.from_numpy(np.array(image)).permute(2, 0, 1), text)
                  for image, text in render_world(world, FINETUNE_WORLD_DRAWS, cfg.seed)]
    pairs = user + scenes
    logger.info("refining the decoder on %d latents the fine-tuned model draws for your images%s (a minute or two "
                "for the bundled model)", len(pairs), " and scenes of its world" if scenes else "")
    images = torch.stack([x for x, _ in pairs])
    drawn, own = drawn_latents(pipe, images, [c for _, c in pairs], keep_scales=len(patch_nums) - 1,
                               guidance_scale=pipe.config.guidance_scale,
                               seeds=[cfg.seed * 1_000_003 + i for i in range(len(pairs))],
                               use_system_prompt=cfg.use_system_prompt)
    steps = cfg.refine_steps or FINETUNE_STEPS
    refine_decoder(pipe.vae, drawn, own, images.to(drawn.device), steps=steps, lr=FINETUNE_LR, seed=cfg.seed)
    return (f"refined the decoder for {steps} steps on {len(pairs)} latents the fine-tuned model drew "
            f"({len(user)} for your {len(examples)} images" + (f", {len(scenes)} scenes of its world" if scenes else "")
            + ")")
