"""The coarse-to-fine scale loop: guidance, top-k/top-p, gumbel smoothing, forced tokens, diffusion.

For each scale the transformer predicts token logits from the text and all coarser scales (KV
cache); guidance mixes the conditional and unconditional rows; a token map is drawn; the quantizer
adds its embedding to f-hat and area-downsamples f-hat into the next scale's input. At the last
scale the residual diffusion head adds the continuous detail the codebook cannot express.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Union

import torch

from hart import rng
from hart.models.transformer import HARTTransformer
from hart.text import TextConditioning


@dataclass
class ForcedTokens:
    """Tokens to impose instead of sampling them (parity tests, inpainting, variations).

    `idx[si]` is `(B, p_si^2)` or None (nothing forced at that scale); `mask[si]` (bool, same shape)
    marks the forced positions, None meaning all of them. A forced position takes the hard code
    embedding. With `target_BChw` (inpainting) the forced codes are not given but chosen at each
    scale as the tokenizer would encode the target from the f-hat drawn so far, so the known region
    heads back to the target whatever was sampled at coarser scales; `mask[si]` then says where.
    `residual_BLCv` replaces the diffusion output at the last scale. `latent_BChw` pins the final
    f-hat where `latent_mask_Bhw` is True (inpainting: the known region ends exactly at the input's
    latent). Random draws still happen at forced positions, so the free positions see the same
    random stream whatever is forced.
    """

    idx: Sequence[Optional[torch.Tensor]] = ()
    mask: Sequence[Optional[torch.Tensor]] = ()
    target_BChw: Optional[torch.Tensor] = None
    residual_BLCv: Optional[torch.Tensor] = None
    latent_BChw: Optional[torch.Tensor] = None
    latent_mask_Bhw: Optional[torch.Tensor] = None

    def at(self, si: int, p: int, f_hat_BChw: torch.Tensor, quantizer):
        """(codes, mask) forced at scale `si` (side `p`), given the f-hat drawn so far; (None, None) if none."""
        mask = self.mask[si] if si < len(self.mask) else None
        if self.target_BChw is not None:
            if mask is None:
                return None, None
            return quantizer.residual_codes(self.target_BChw.to(f_hat_BChw) - f_hat_BChw, p), mask
        idx = self.idx[si] if si < len(self.idx) else None
        if idx is not None and mask is None:
            mask = torch.ones(idx.shape, dtype=torch.bool, device=idx.device)
        return idx, mask


@dataclass
class StageOutput:
    """What the callback sees after each scale."""

    si: int
    idx_Bl: torch.Tensor
    logits_BlV: torch.Tensor  # guided logits before top-k/top-p filtering
    f_hat_BChw: torch.Tensor  # accumulated latent so far (float32)


def reference_top_k(si: int) -> int:
    """The release's per-scale top-k: 600 for the first 7 scales, then 300."""
    return 600 if si < 7 else 300


def filter_logits(logits_BlV: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k (ties at the threshold survive), then top-p (the most likely token always survives)."""
    V = logits_BlV.shape[-1]
    if 0 < top_k < V:
        kth = logits_BlV.topk(top_k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
        logits_BlV = logits_BlV.masked_fill(logits_BlV < kth, -torch.inf)
    if 0 < top_p < 1:
        sorted_logits, sorted_idx = logits_BlV.sort(dim=-1)
        drop = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        drop[..., -1] = False
        logits_BlV = logits_BlV.masked_fill(drop.scatter(-1, sorted_idx, drop), -torch.inf)
    return logits_BlV


def _guide(logits_2BlV: torch.Tensor, t: float) -> torch.Tensor:
    cond, uncond = logits_2BlV.chunk(2)
    return (1 + t) * cond - t * uncond


@torch.no_grad()
def sample_scales(
    transformer: HARTTransformer,
    quantizer,
    cond: TextConditioning,
    uncond: Optional[TextConditioning] = None,
    guidance_scale: float = 4.5,
    top_k: Union[None, int, Sequence[int]] = None,
    top_p: float = 0.0,
    more_smooth: bool = False,
    generator: rng.Generator = None,
    stale_last_scale_guidance: bool = True,
    num_maskgit_iters: int = 1,
    forced: Optional[ForcedTokens] = None,
    callback: Optional[Callable[[StageOutput], Optional[bool]]] = None,
    logits_processor: Optional[Callable[[int, torch.Tensor], torch.Tensor]] = None,
) -> torch.Tensor:
    """Generate the latent f-hat `(B, Cvae, P, P)` (float32) for a batch of text conditions.

    guidance_scale: the guidance weight at the last scales; scale k uses `w * k / (S - 1)`.
    top_k: None gives the release's schedule (600, then 300 from scale 7); an int or one per scale.
    top_p: nucleus filtering, 0 (or 1) is off.
    more_smooth: the release's gumbel-softmax soft codes (its scripts' default) instead of hard codes.
    uncond: text conditioning of the unconditional branch (a negative prompt); None uses the
        release's unconditional input (zero features, zero positions).
    stale_last_scale_guidance: the release computes the last scale's guidance with the ratio of the
        scale before it ((S-2)/(S-1) instead of 1, spec 8.1); True (default) reproduces the released
        model's images, False uses the full weight.
    num_maskgit_iters: the release's MaskGIT loop at the last scale; 1 predicts all tokens at once.
    callback: called after each scale with a `StageOutput`; returning False stops early (the
        partial f-hat is returned).
    logits_processor: `fn(scale_index, guided_logits_BlV) -> logits_BlV`, applied before filtering
        and sampling (ban or boost tokens; the parity tests replay recorded logits with it).
    """
    pn = transformer.patch_nums
    S, P, B = len(pn), pn[-1], cond.batch_size
    rng.check_generator(generator, B)
    forced = forced or ForcedTokens()
    if uncond is None:
        uncond = TextConditioning.unconditional(B, *cond.features_BTC.shape[1:], device=cond.features_BTC.device)
    if uncond.batch_size != B:
        raise ValueError(f"unconditional batch {uncond.batch_size} != conditional batch {B}")
    top_ks = [reference_top_k(si) for si in range(S)] if top_k is None else (
        [int(top_k)] * S if isinstance(top_k, int) else list(top_k)
    )
    codebook_VCv = quantizer.embedding.weight.float()

    context = torch.cat([cond.features_BTC, uncond.features_BTC])
    mask_2BT = torch.cat([cond.mask_BT, uncond.mask_BT])
    pos_2BT = torch.cat([cond.position_ids_BT, uncond.position_ids_BT])
    cond_2BTD = transformer.embed_context(context)
    cond_blocks, cond_head = transformer.pool_condition(cond_2BTD, mask_2BT)
    modulations = transformer.block_modulations(cond_blocks)
    offset_2B = pos_2BT[:, -1]
    device = cond_2BTD.device

    cache = transformer.new_cache()
    f_hat = torch.zeros(B, codebook_VCv.shape[1], P, P, device=device)
    x_2BlC = cond_2BTD + transformer.lvl_embed.weight[0]
    ratio = 0.0
    for si in range(S):
        last = si == S - 1
        if not last or not stale_last_scale_guidance:
            ratio = si / (S - 1) if S > 1 else 1.0
        t = guidance_scale * ratio
        forced_idx, forced_mask = forced.at(si, pn[si], f_hat, quantizer)
        if last:
            return _last_scale(
                transformer, codebook_VCv, x_2BlC, modulations, cond_head, offset_2B, cache, f_hat, t, ratio,
                top_ks[si], top_p, more_smooth, generator, num_maskgit_iters, forced, forced_idx, forced_mask,
                callback, logits_processor,
            )
        rope = transformer.stage_rope(si, offset_2B, pos_2BT)
        hidden = transformer.run_blocks(x_2BlC, modulations, rope, cache=cache)
        if si == 0:
            hidden = hidden[:, -1:]  # the last text position predicts the 1x1 scale
        logits_BlV = _guide(transformer.logits(hidden, cond_head), t)
        if logits_processor is not None:
            logits_BlV = logits_processor(si, logits_BlV)
        idx_Bl, h_BlCv = _draw_tokens(
            logits_BlV, codebook_VCv, top_ks[si], top_p, more_smooth, ratio, generator, forced_idx, forced_mask
        )
        p = pn[si]
        h_BCvpp = h_BlCv.transpose(1, 2).reshape(B, -1, p, p)
        f_hat, next_BCvpp = quantizer.next_scale_input(si, pn, f_hat, h_BCvpp)
        if callback is not None and callback(StageOutput(si, idx_Bl, logits_BlV, f_hat)) is False:
            return f_hat
        # both CFG halves read the conditional stream's next-scale input (as released)
        x_2BlC = transformer.stage_input(si + 1, next_BCvpp.flatten(2).transpose(1, 2)).repeat(2, 1, 1)


def _draw_tokens(logits_BlV, codebook_VCv, top_k, top_p, more_smooth, ratio, generator, forced_idx, forced_mask):
    """Sample a token map; return the indices and the embeddings to add (hard or gumbel-soft)."""
    logits_BlV = filter_logits(logits_BlV, top_k, top_p)
    idx_Bl = rng.multinomial(logits_BlV.softmax(dim=-1), generator)
    if more_smooth:
        tau = max(0.27 * (1 - 0.95 * ratio), 0.005)
        gumbel = rng.gumbel(logits_BlV.shape, generator, logits_BlV.device)
        h_BlCv = ((logits_BlV * (1 + ratio) + gumbel) / tau).softmax(dim=-1) @ codebook_VCv
    else:
        h_BlCv = codebook_VCv[idx_Bl]
    if forced_idx is not None:
        idx_Bl = torch.where(forced_mask, forced_idx.to(idx_Bl.device), idx_Bl)
        h_BlCv = torch.where(forced_mask.unsqueeze(-1), codebook_VCv[idx_Bl], h_BlCv)
    return idx_Bl, h_BlCv


def _maskgit_steps(num_tokens: int, num_iters: int, batch: int, generator, device) -> List[torch.Tensor]:
    """Index sets `(B, n_step)` predicted at each MaskGIT step, ascending within a step."""
    if num_iters == 1:
        return [torch.arange(num_tokens, device=device).expand(batch, -1)]
    order_BN = rng.permutation(batch, num_tokens, generator, device)
    steps, remaining = [], num_tokens
    for step in range(num_iters):
        if step == num_iters - 1:
            still_masked = 0
        else:
            ratio = torch.cos(torch.tensor(torch.pi / 2 * (step + 1) / num_iters)).item()
            still_masked = max(1, min(remaining - 1, int(num_tokens * ratio)))
        start = num_tokens - remaining
        steps.append(order_BN[:, start : num_tokens - still_masked].sort(dim=1).values)
        remaining = still_masked
    return steps


def _last_scale(
    transformer, codebook_VCv, x_2BLC, modulations, cond_head, offset_2B, cache, f_hat, t, ratio,
    top_k, top_p, more_smooth, generator, num_maskgit_iters, forced, forced_idx, forced_mask, callback,
    logits_processor,
):
    """The last scale: tokens (optionally over MaskGIT steps) plus the residual diffusion."""
    B, Cv, P, _ = f_hat.shape
    si = len(transformer.patch_nums) - 1
    tokens_BLCv = torch.zeros(B, P * P, Cv, device=f_hat.device)
    idx_BL = torch.zeros(B, P * P, dtype=torch.long, device=f_hat.device)
    logits_BLV = None
    for pred_Bn in _maskgit_steps(P * P, num_maskgit_iters, B, generator, f_hat.device):
        pred_2Bn = pred_Bn.repeat(2, 1)
        x = x_2BLC.gather(1, pred_2Bn.unsqueeze(-1).expand(-1, -1, x_2BLC.shape[-1]))
        rope = transformer.stage_rope(si, offset_2B, index_Bl=pred_2Bn)
        hidden_2BnC = transformer.run_blocks(x, modulations, rope, cache=cache)
        logits_BnV = _guide(transformer.logits(hidden_2BnC, cond_head), t)
        if logits_processor is not None:
            logits_BnV = logits_processor(si, logits_BnV)
        step_forced = None if forced_idx is None else (forced_idx.gather(1, pred_Bn), forced_mask.gather(1, pred_Bn))
        idx_Bn, h_BnCv = _draw_tokens(
            logits_BnV, codebook_VCv, top_k, top_p, more_smooth, ratio, generator, *(step_forced or (None, None))
        )
        # the diffusion is conditioned on the hard code, even when the soft code is what gets added
        z_2BnC = transformer.diffusion_condition(hidden_2BnC, codebook_VCv[idx_Bn].repeat(2, 1, 1))
        n = idx_Bn.shape[1]
        z_cond, z_uncond = z_2BnC.flatten(0, 1).chunk(2)
        residual = transformer.diffusion_head.sample(
            z_cond, z_uncond, guidance_scale=t, generator=generator, num_images=B
        ).view(B, n, Cv).float()
        if forced.residual_BLCv is not None:
            residual = forced.residual_BLCv.to(residual).gather(1, pred_Bn.unsqueeze(-1).expand(-1, -1, Cv))
        tokens_BLCv.scatter_(1, pred_Bn.unsqueeze(-1).expand(-1, -1, Cv), h_BnCv + residual)
        idx_BL.scatter_(1, pred_Bn, idx_Bn)
        logits_BLV = logits_BnV if num_maskgit_iters == 1 else None
    f_hat = f_hat + tokens_BLCv.transpose(1, 2).reshape(B, Cv, P, P)  # no phi at the last scale
    if forced.latent_BChw is not None:
        f_hat = torch.where(forced.latent_mask_Bhw.unsqueeze(1), forced.latent_BChw.to(f_hat), f_hat)
    if callback is not None:
        callback(StageOutput(si, idx_BL, logits_BLV, f_hat))
    return f_hat
