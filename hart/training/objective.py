"""The HART training objective: token cross-entropy over all scales plus the residual
diffusion loss on a random subset of last-scale tokens, with condition dropout for guidance.

Every random choice (kept tokens, dropped conditions, the model's own code sample, diffusion
timesteps and noise) comes from the caller's generator and can be injected, which is how the parity
tests replay the reference's draws.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

from hart import rng
from hart.models.transformer import HARTTransformer
from hart.sampling import filter_logits
from hart.text import TextConditioning

MIN_KEPT_LAST_SCALE_TOKENS = 32


class LossOutput(NamedTuple):
    loss: torch.Tensor
    token_loss: torch.Tensor
    diffusion_loss: torch.Tensor
    logits_BLV: torch.Tensor
    keep_idx_BK: torch.Tensor
    drop_B: torch.Tensor  # the rows whose condition was dropped (classifier-free guidance training)


def draw_kept_tokens(batch: int, num_tokens: int, generator, device) -> torch.Tensor:
    """Kept last-scale token indices `(B, K)`, ascending.

    One mask rate per batch from N(1, 0.25) truncated to [0.5, 1] (drawn by inverse CDF), and at
    least 32 tokens kept (all of them when the scale has 32 or fewer; the reference's negative slice
    for small scales is not reproduced).
    """
    u = rng.rand((1,), generator, device).double().item()
    normal = torch.distributions.Normal(torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.25, dtype=torch.float64))
    lo, hi = normal.cdf(torch.tensor(0.5, dtype=torch.float64)), normal.cdf(torch.tensor(1.0, dtype=torch.float64))
    rate = normal.icdf(lo + u * (hi - lo)).item()
    n_mask = max(0, min(math.ceil(num_tokens * rate), num_tokens - MIN_KEPT_LAST_SCALE_TOKENS))
    order_BN = rng.permutation(batch, num_tokens, generator, device)
    return order_BN[:, n_mask:].sort(dim=1).values


def draw_dropped(batch: int, rate: float, generator, device) -> torch.Tensor:
    """Which rows lose their text condition: each with probability `rate` (the reference's
    `randn < rate` dropped about 54% at rate 0.1; this is the intended rate)."""
    return rng.rand((batch,), generator, device) < rate


def drop_conditions(cond: TextConditioning, drop_B: torch.Tensor) -> TextConditioning:
    """Replace dropped rows by the unconditional input used at inference (features, positions, mask)."""
    B, T, C = cond.features_BTC.shape
    uncond = TextConditioning.unconditional(B, T, C, cond.features_BTC.device)
    pick = lambda a, b: torch.where(drop_B.view(-1, *([1] * (a.dim() - 1))), b.to(a.dtype), a)
    return TextConditioning(*(pick(a, b) for a, b in zip(cond, uncond)))


def hart_loss(
    transformer: HARTTransformer,
    quantizer,
    cond: TextConditioning,
    x_BLCv_wo_first_l: torch.Tensor,
    gt_idx: Sequence[torch.Tensor],
    last_scale_target_BLCv: torch.Tensor,
    *,
    generator: Optional[torch.Generator] = None,
    keep_idx_BK: Optional[torch.Tensor] = None,
    drop_B: Optional[torch.Tensor] = None,
    sampled_idx_BK: Optional[torch.Tensor] = None,
    diffusion_t: Optional[torch.Tensor] = None,
    diffusion_noise: Optional[torch.Tensor] = None,
) -> LossOutput:
    """The loss of one batch.

    gt_idx: the tokenizer's per-scale indices `(B, p_k^2)`; `last_scale_target_BLCv`: the last
    scale's continuous target (`r_cont`: last code plus residual, from `encoding.loss_inputs`).
    """
    B = cond.batch_size
    P2 = transformer.patch_nums[-1] ** 2
    device = x_BLCv_wo_first_l.device
    if keep_idx_BK is None:
        keep_idx_BK = draw_kept_tokens(B, P2, generator, device)
    if drop_B is None:
        drop_B = draw_dropped(B, transformer.config.cond_drop_rate, generator, device)
    cond = drop_conditions(cond, drop_B)

    logits_BLV, hidden_BKC = transformer(
        cond.features_BTC, cond.mask_BT, cond.position_ids_BT, x_BLCv_wo_first_l, keep_idx_BK
    )
    targets_BL = torch.cat([*gt_idx[:-1], gt_idx[-1].gather(1, keep_idx_BK)], dim=1)
    token_loss = F.cross_entropy(logits_BLV.flatten(0, 1), targets_BL.flatten())

    K = keep_idx_BK.shape[1]
    codebook_VCv = quantizer.embedding.weight
    if sampled_idx_BK is None:
        with torch.no_grad():
            probs = filter_logits(logits_BLV[:, -K:].detach(), 600, 0.96).softmax(dim=-1)
            sampled_idx_BK = rng.multinomial(probs, generator)
    code_BKCv = codebook_VCv[sampled_idx_BK].detach()
    z_BKC = transformer.diffusion_condition(hidden_BKC, code_BKCv)
    target_BKCv = last_scale_target_BLCv.gather(1, keep_idx_BK.unsqueeze(-1).expand(-1, -1, code_BKCv.shape[-1]))
    # the head learns the residual relative to the model's own sampled code, not the ground truth's
    target_BKCv = target_BKCv - code_BKCv
    mul = transformer.config.diffusion_batch_mul
    diff = transformer.diffusion_head.loss(
        target_BKCv.flatten(0, 1).repeat(mul, 1).float(),
        z_BKC.flatten(0, 1).repeat(mul, 1),
        generator=generator,
        t=diffusion_t,
        noise=diffusion_noise,
    )
    diffusion_loss = diff.loss.mean()
    return LossOutput(token_loss + diffusion_loss, token_loss, diffusion_loss, logits_BLV, keep_idx_BK, drop_B)
