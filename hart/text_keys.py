"""Only real text keys: the text prefix without its duplicate padding positions, exactly.

HART attends over all `context_tokens` (300) text positions, padding included: the released model
never masks padding in attention, and max pooling reads it too (docs/architecture.md). So simply
cutting the padding changes every image. But the padding positions of a row are *duplicates*: the
text encoder gives every pad the same feature (checked with the fixture's Qwen2 under transformers 5;
where an encoder does not, nothing is found to merge and nothing changes), and every pad has the same
position id (the last real one), so at every layer every pad has the same input, the same rotary
angle and the same keys to attend to, hence the same key and value. The unconditional rows are 300
duplicates of one token.

n identical keys weigh in a softmax exactly like one of them with `log(n)` added to its score. So
each row keeps its distinct positions plus one representative of its trailing run of duplicates, with
a key bias of `log(run length)`; rows are brought to a common length with filler positions whose key
bias is -inf. Max pooling is unchanged (the dropped positions duplicate a kept one) and so is
mask-weighted average pooling (the kept representative carries the run's mask, of which at most one
position is real: real positions have distinct position ids). The result is therefore the same up to
float rounding of the summed softmax terms (and, in bf16, of `log(n)` itself).

How the scale loop uses it: `cond, uncond, key_bias_2BT = compact_text(cond, uncond)` before
embedding (the unconditional rows given explicitly, `TextConditioning.unconditional(B, T, D)` for
the release's), then `attention_bias(key_bias_2BT, num_keys, dtype)` as the attention mask of every
block at every scale (text keys come first in the KV cache). The representative is the last
position of every row, so "the last text position predicts the 1x1 scale" and "the image positions
start after the last text position" still read column -1.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch

from hart.text import TextConditioning


def _trailing_run_B(cond: TextConditioning) -> torch.Tensor:
    """Length of each row's trailing run of positions identical to its last one (features and position)."""
    feats, pos = cond.features_BTC, cond.position_ids_BT
    same_BT = (feats == feats[:, -1:]).all(-1) & (pos == pos[:, -1:])
    return same_BT.flip(1).long().cumprod(1).sum(1)


def compact_text(
    cond: TextConditioning, uncond: TextConditioning
) -> Tuple[TextConditioning, TextConditioning, torch.Tensor]:
    """Both branches' text without duplicate trailing positions, at one common length T'.

    Returns the compacted conditional and unconditional conditioning `(B, T', ...)` and the key
    bias `(2B, T')` in float32 for the rows `[cond; uncond]`: 0 on distinct positions, `log(n)` on
    the representative of a run of n duplicates (the last column), -inf on fillers.
    """
    if cond.features_BTC.shape != uncond.features_BTC.shape:
        raise ValueError(
            f"conditional {tuple(cond.features_BTC.shape)} and unconditional {tuple(uncond.features_BTC.shape)} "
            "text features differ in shape: both branches must cover the same text positions"
        )
    both = TextConditioning(*(torch.cat([c, u]) for c, u in zip(cond, uncond)))
    N, T = both.mask_BT.shape
    device = both.mask_BT.device
    run_N = _trailing_run_B(both)
    distinct_N = T - run_N  # positions before the run, kept as they are
    T_new = int(distinct_N.max()) + 1

    # column j of row r reads position j if j < distinct[r], else the representative (position T-1)
    col_NT = torch.arange(T_new, device=device).expand(N, -1)
    is_distinct_NT = col_NT < distinct_N.unsqueeze(1)
    src_NT = torch.where(is_distinct_NT, col_NT, torch.full_like(col_NT, T - 1))
    features = both.features_BTC.gather(1, src_NT.unsqueeze(-1).expand(-1, -1, both.features_BTC.shape[-1]))
    positions = both.position_ids_BT.gather(1, src_NT)
    run_mask_N = (both.mask_BT & (torch.arange(T, device=device) >= distinct_N.unsqueeze(1))).any(1)
    mask = torch.where(is_distinct_NT, both.mask_BT.gather(1, src_NT), torch.zeros_like(is_distinct_NT))
    mask[:, -1] = run_mask_N

    key_bias = torch.where(is_distinct_NT, 0.0, -math.inf)
    key_bias[:, -1] = run_N.float().log()
    B = cond.batch_size
    cond_new = TextConditioning(features[:B], mask[:B], positions[:B])
    uncond_new = TextConditioning(features[B:], mask[B:], positions[B:])
    return cond_new, uncond_new, key_bias


def attention_bias(key_bias_NT: torch.Tensor, num_keys: int, dtype: torch.dtype) -> torch.Tensor:
    """The `(N, 1, 1, num_keys)` additive attention mask: the text key bias, then 0 on image keys."""
    N, T = key_bias_NT.shape
    if num_keys < T:
        raise ValueError(f"{num_keys} keys cannot hold the {T} text keys")
    bias = key_bias_NT.new_zeros(N, 1, 1, num_keys)
    bias[:, 0, 0, :T] = key_bias_NT
    return bias.to(dtype)
