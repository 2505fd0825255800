"""Checking the image tokenizer on a fine-tuning run's images, and adapting it when it falls short.

A tokenizer can only show what its latent space holds: the bundled one has seen eight colours, and
gives a pink ring back as an orange-yellow one (22 dB, against 32 dB on its own world). No training
of the transformer can fix that, so before a fine-tune `check_reconstruction` measures the PSNR of
the hybrid reconstruction of the user's images next to the same figure on the base model's own
images (rendered from its world), and `adapt_decoder` adapts the tokenizer when the user's images
fall more than `ADAPT_MARGIN_DB` short.

Adapting trains the decoder (and the conv before it) on the user's images mixed one to one with
world images: the encoder, its quant conv and the codebook stay frozen, so every token index and
residual the transformer is trained on keeps its meaning. The decoder learns to draw the new colour
from the code combinations the user's images get (a pink ring decoded from its codes alone comes
back pink) and from the continuous residual, which carries the finer detail; the fine-tune then
trains the diffusion head, which draws that residual, in full (`hart.training.finetune`).
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from hart.training.checks import model_world
from hart.training.data import ImageCaptionFolder

logger = logging.getLogger(__name__)

ADAPT_MARGIN_DB = 3.0  # adapt when the user's images reconstruct this much worse than the world's
USER_IMAGES = 256  # at most this many of the user's images are measured and adapted to
REFERENCE_IMAGES = 64  # world images that give the reference PSNR
ADAPT_WORLD_IMAGES = 256  # world images the adaptation mixes in: with 64, the world's samples lost 0.01 of ShapesEval
ADAPT_LR = 3e-4
ADAPT_BATCH = 8  # half user images, half world images (all user images when there is no world)
EVAL_BATCH = 32


@dataclass
class TokenizerCheck:
    user_psnr: float  # dB, hybrid reconstruction of the user's images
    reference_psnr: Optional[float]  # dB, of the base model's world images (None: no world known)
    adapted: bool = False
    adapted_user_psnr: Optional[float] = None
    adapted_reference_psnr: Optional[float] = None
    steps: int = 0

    @property
    def short_by(self) -> Optional[float]:
        return None if self.reference_psnr is None else self.reference_psnr - self.user_psnr

    def summary(self) -> str:
        text = f"tokenizer reconstructs your images at {self.user_psnr:.1f} dB"
        if self.reference_psnr is not None:
            text += f" (its own world: {self.reference_psnr:.1f} dB)"
        if self.adapted:
            text += (f"; adapted its decoder for {self.steps} steps: now {self.adapted_user_psnr:.1f} dB"
                     + (f" (world {self.adapted_reference_psnr:.1f} dB)" if self.adapted_reference_psnr else ""))
        return text

    @classmethod
    def measure(cls, vae, user_B3HW: torch.Tensor, world_B3HW: Optional[torch.Tensor]) -> "TokenizerCheck":
        """The tokenizer's PSNR on the user's images and on the world's (when there is one)."""
        return cls(reconstruction_psnr(vae, user_B3HW), None if world_B3HW is None else reconstruction_psnr(vae, world_B3HW))

    def adapt(self, vae, user_B3HW: torch.Tensor, world_B3HW: Optional[torch.Tensor], *,
              train_world_B3HW: Optional[torch.Tensor], steps: int, seed: int) -> None:
        """`adapt_decoder` on `vae` in place (user images mixed with `train_world_B3HW`), then measure again on the
        user's images and the reference `world_B3HW`."""
        adapt_decoder(vae, user_B3HW, train_world_B3HW, steps, seed)
        after = TokenizerCheck.measure(vae, user_B3HW, world_B3HW)
        self.adapted, self.steps = True, steps
        self.adapted_user_psnr, self.adapted_reference_psnr = after.user_psnr, after.reference_psnr

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> "TokenizerCheck":
        return cls(**json.loads(path.read_text()))


def world_images(world: Optional[str], n: int = REFERENCE_IMAGES, seed: int = 0) -> Optional[torch.Tensor]:
    """`(n, 3, 128, 128)` images in [-1, 1] of the named world (only "shapes" exists), or None."""
    if world != "shapes":
        return None
    from hart.data.shapes import render, sample_scene

    rng = np.random.default_rng(seed)
    pixels = np.stack([np.asarray(render(sample_scene(rng)), dtype=np.float32) for _ in range(n)])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2) / 127.5 - 1


@torch.no_grad()
def reconstruction_psnr(vae, images_B3HW: torch.Tensor) -> float:
    """Mean PSNR (dB) of the tokenizer's hybrid reconstruction (codes plus residual) of the images."""
    weight = vae.post_quant_conv.weight
    psnrs = []
    for x in images_B3HW.split(EVAL_BATCH):
        x = x.to(weight.device, weight.dtype)
        idx, residual = vae.img_to_tokens(x)
        mse = (vae.tokens_to_img(idx, residual).float() - x.float()).square().mean(dim=(1, 2, 3))
        psnrs.append(10 * torch.log10(4 / mse.clamp_min(1e-10)))  # images span 2 (from -1 to 1)
    return float(torch.cat(psnrs).mean())


def needs_adapting(check: TokenizerCheck, mode: str) -> bool:
    """`mode`: "auto" (when the user's images fall `ADAPT_MARGIN_DB` short), "always" or "never"."""
    if mode == "auto":
        return check.short_by is not None and check.short_by > ADAPT_MARGIN_DB
    return mode == "always"


def adapt_decoder(vae, user_B3HW: torch.Tensor, world_B3HW: Optional[torch.Tensor], steps: int, seed: int) -> None:
    """Train `vae`'s decoder in place (encoder, quant conv and codebook frozen) to reconstruct the
    user's images from their continuous latents, mixed one to one with world images when given."""
    weight = vae.post_quant_conv.weight
    with torch.no_grad():
        latents = [torch.cat([vae.encode_latent(x.to(weight.device, weight.dtype)) for x in images.split(EVAL_BATCH)])
                   for images in (user_B3HW, world_B3HW) if images is not None]
    sources = [user_B3HW] + ([world_B3HW] if world_B3HW is not None else [])
    trained = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    vae.requires_grad_(False)
    for p in trained:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(trained, lr=ADAPT_LR, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    per_source = ADAPT_BATCH // len(sources)
    vae.train()
    try:
        for _ in range(steps):
            picks = [torch.randint(len(x), (per_source,), generator=generator) for x in sources]
            f_BChw = torch.cat([f[i.to(f.device)] for f, i in zip(latents, picks)])
            x_B3HW = torch.cat([x[i] for x, i in zip(sources, picks)]).to(weight.device, weight.dtype)
            loss = F.mse_loss(vae.decoder(vae.post_quant_conv(f_BChw)).float(), x_B3HW.float())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    finally:
        vae.eval()
        vae.requires_grad_(False)



def check_and_adapt(vae, cfg, resolution: int, adapt_here: bool) -> Tuple[bool, Optional[TokenizerCheck]]:
    """A fine-tune's tokenizer check (`cfg`: its `FinetuneConfig`): measure `vae` on the run's images
    and, where they fall short, adapt it in place when `adapt_here` (the process that decodes). A
    resumed run reloads the tokenizer it adapted at its start from OUTPUT/tokenizer/.

    Returns (whether the run's tokenizer is adapted, the check to save when it was adapted now)."""
    saved = Path(cfg.output_dir) / "tokenizer"
    if cfg.resume and (saved / "check.json").exists():  # adapted when the run started
        vae.load_state_dict(type(vae).from_pretrained(saved).state_dict())
        check = TokenizerCheck.load(saved / "check.json")
        logger.info("%s (kept from the run's start)", check.summary())
        return check.adapted, None
    if cfg.adapt_tokenizer == "never":
        return False, None
    if cfg.data_dir is None:
        logger.info("tokenizer not checked: the run reads a cache, which holds no pixels")
        return False, None
    folder = ImageCaptionFolder(cfg.data_dir, resolution, crop="center", flip=False, seed=cfg.seed,
                                min_size=cfg.min_image_size)
    user = torch.stack([folder[(0, i)]["pixel_values"] for i in range(min(len(folder), USER_IMAGES))])
    world_name = model_world(cfg.pretrained)
    world = world_images(world_name)
    check = TokenizerCheck.measure(vae, user, world)
    if not needs_adapting(check, cfg.adapt_tokenizer):
        logger.info("%s: kept as it is", check.summary())
        return False, None
    if not adapt_here:
        return True, None
    check.adapt(vae, user, world, train_world_B3HW=world_images(world_name, ADAPT_WORLD_IMAGES, seed=cfg.seed),
                steps=cfg.tokenizer_steps, seed=cfg.seed)
    logger.info("%s", check.summary())
    return True, check
