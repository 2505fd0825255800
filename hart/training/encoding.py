"""Frozen-encoder pass shared by live training and the cache: images and captions -> loss inputs.

A training example is four tensors: the text features `(T, Ctxt)` and mask `(T,)` of its caption,
its multi-scale token indices concatenated over the scales `(L,)`, and its continuous residual
`(P*P, Cvae)` (the part of the last-scale latent the code does not explain). `loss_inputs` turns a
batch of them into what `hart_loss` takes.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from hart.text import TextConditioning, encode_prompts


@torch.no_grad()
def encode_examples(
    pixel_values_B3HW: torch.Tensor,
    captions: Sequence[str],
    vae,
    text_encoder,
    text_tokenizer,
    *,
    patch_nums: Sequence[int],
    max_length: int,
    system_prompt: Optional[str],
) -> dict:
    """`{"features", "mask", "tokens", "residual"}` of a batch (on the encoders' devices)."""
    cond = encode_prompts(list(captions), text_encoder, text_tokenizer, max_length, system_prompt)
    tokens_BL, residual_BLCv = encode_images(pixel_values_B3HW, vae, patch_nums)
    return {"features": cond.features_BTC, "mask": cond.mask_BT, "tokens": tokens_BL, "residual": residual_BLCv}


@torch.no_grad()
def encode_images(pixel_values_B3HW: torch.Tensor, vae, patch_nums: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Token indices `(B, L)` (all scales, coarse first) and the float32 residual `(B, P*P, Cvae)`."""
    weight = vae.quant_conv.weight
    idx_list, residual_BLCv = vae.img_to_tokens(pixel_values_B3HW.to(weight.device, weight.dtype), patch_nums)
    return torch.cat(idx_list, dim=1), residual_BLCv.float()


def split_scales(tokens_BL: torch.Tensor, patch_nums: Sequence[int]) -> List[torch.Tensor]:
    """`(B, L)` -> one `(B, p*p)` tensor per scale."""
    if tokens_BL.shape[1] != sum(p * p for p in patch_nums):
        raise ValueError(f"{tokens_BL.shape[1]} tokens per example do not fit patch_nums {tuple(patch_nums)}")
    return list(tokens_BL.long().split([p * p for p in patch_nums], dim=1))


@torch.no_grad()
def loss_inputs(batch: dict, quantizer, patch_nums: Sequence[int]):
    """(conditioning, teacher-forcing input `(B, L-1, Cvae)`, per-scale indices, last-scale target)."""
    mask_BT = batch["mask"].bool()
    cond = TextConditioning(batch["features"].float(), mask_BT, mask_BT.long().cumsum(dim=1) - 1)
    gt_idx = split_scales(batch["tokens"], patch_nums)
    x_BLCv_wo_first_l = quantizer.teacher_forcing_input(gt_idx, patch_nums)
    # the last scale's continuous target is its code's embedding plus the residual: the f-hat the diffusion
    # head completes at inference (docs/architecture.md, step 5)
    target_BLCv = batch["residual"].float() + quantizer.embedding(gt_idx[-1]).float()
    return cond, x_BLCv_wo_first_l, gt_idx, target_BLCv
