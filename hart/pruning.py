"""Training-free cached token pruning at the largest scales (after FastVAR, Guo et al., ICCV 2025).

Most of a 1024 px image's transformer time goes to its largest scales (36, 48 and 64: 7696 of the
9451 image tokens), where most tokens only refine what the coarser scales already settled. At those
scales only the *pivotal* tokens are forwarded through the blocks' attention and SwiGLU branches; the
branch outputs of the other tokens are restored from the same block's branch outputs at the scale
before, upsampled. The residual stream stays full size, so the logits head and the next scale see
every token. At the last scale the residual diffusion runs on the pivotal tokens only: the others get
no continuous residual (`hart.sampling._diffuse`).

How the per-scale transformer step uses these functions (scale `si`, side `p`, CFG rows `2B`):

- Which scales, and how much of each: `pruned_scales(patch_nums, keep)`. The one knob `keep` is the
  fraction of tokens forwarded at the largest scale; the scale before forwards twice as much, and so
  on while the fraction stays under 1. At the default `DEFAULT_KEEP` (0.25, what pruning gets when
  asked for without a value) that is 0.25 and 0.5 of the two largest scales (48 and 64 at 1024 px,
  27 and 32 at 512 px, 12 and 16 at 256 px, 11 and 16 for the bundled model); 1.0 (the library's
  default) is off. Under MaskGIT (`num_maskgit_iters > 1`) the last scale is left whole: its steps
  already forward subsets.
- `hart.sampling.sample_scales` picks the pivotal tokens and passes them to
  `HARTTransformer.scale_step(..., pivotal_Bk=...)`; the blocks' branches go through `BranchCache`.
- At the scale before the first pruned one, the step keeps every block's two branch outputs
  (attention and SwiGLU, before the gates), `(2B, p_prev^2, C)` each: the cache.
- At a pruned scale, once per scale: `idx_2Bk = pivotal_indices(input_BCpp, prev_input_BCqq,
  pruned[si]).repeat(2, 1)` on the latent inputs of this scale and the one before (both CFG halves
  read the same input, so they share the choice); the RoPE angles of the kept tokens come from
  `stage_rope(si, offset, index_Bl=idx_2Bk)`, as for MaskGIT. Then in every block:
      h = modulated_norm(x_2BlC)                                    # full size: element-wise
      a_2BkC = attn(gather_tokens(h, idx_2Bk), rope_kept, kv_cache) # only pivotal keys enter the cache
      a_2BlC = restore_tokens(a_2BkC, idx_2Bk, attn_cache[block], p)
      x_2BlC = x_2BlC + gamma1 * a_2BlC                             # and the same for the SwiGLU branch
      attn_cache[block] = a_2BlC                                    # the next pruned scale restores from it
- Everything after the blocks (logits, sampling, next-scale input) is unchanged, but for the residual
  diffusion at a pruned last scale, which runs on its pivotal tokens only.

Where this differs from FastVAR's code, and why: FastVAR scores tokens in every block by their
distance from the token map's mean and always restores from the last unpruned scale (36). Here the
score is the distance of the scale's latent input from the previous scale's input upsampled, i.e.
exactly where the restored outputs (the previous scale's, upsampled) are least likely to be right;
one choice per scale also keeps one gather of the RoPE angles and one set of cached keys per scale.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

DEFAULT_KEEP = 0.25  # fraction forwarded at the largest scale when pruning is on (0.5 at the one before)


def check_keep(keep: float) -> float:
    if not isinstance(keep, (int, float)) or not 0 < keep <= 1:
        raise ValueError(f"the kept fraction of tokens must be in (0, 1], got {keep!r}")
    return float(keep)


def pruned_scales(patch_nums: Sequence[int], keep: float) -> Dict[int, float]:
    """The pruned scales' indices, ascending, each with the fraction of its tokens forwarded.

    `keep` is the largest scale's fraction; each smaller scale forwards twice its successor's
    fraction, as long as that is under 1. Doubling keeps the forwarded token count nearly level
    across the pruned scales (a scale has about 1.8x the tokens of the one before at the released
    sizes), and `keep=0.25` is FastVAR's setting for HART (0.5 at 48, 0.25 at 64). Scales 0 and 1
    are never pruned: scale 0 is the text prefix, and a pruned scale needs an image scale before it
    to restore from.
    """
    fraction, pruned = check_keep(keep), {}
    for si in range(len(patch_nums) - 1, 1, -1):
        if fraction >= 1:
            break
        pruned[si] = fraction
        fraction *= 2
    return dict(sorted(pruned.items()))


def num_kept(side: int, keep: float) -> int:
    """Tokens forwarded at a `side` x `side` scale: the fraction rounded, at least one."""
    return max(1, min(side * side, round(check_keep(keep) * side * side)))


def upsample_tokens(y_BqC: torch.Tensor, side: int) -> torch.Tensor:
    """A row-major `q x q` token map `(B, q^2, C)` resized to `side x side` (area, as FastVAR)."""
    B, n, C = y_BqC.shape
    q = round(n**0.5)
    if q * q != n:
        raise ValueError(f"{n} tokens are not a square token map")
    y_BCqq = y_BqC.transpose(1, 2).reshape(B, C, q, q)
    return F.interpolate(y_BCqq, size=(side, side), mode="area").flatten(2).transpose(1, 2)


def pivotal_indices(input_BCpp: torch.Tensor, prev_input_BCqq: torch.Tensor, keep: float) -> torch.Tensor:
    """Row-major indices `(B, k)`, ascending, of the tokens to forward at this scale.

    The pivotal tokens are those whose latent input differs most (squared L2 over channels) from
    the previous scale's input upsampled to this side: where the scale brings new detail.
    """
    if input_BCpp.dim() != 4 or prev_input_BCqq.dim() != 4 or input_BCpp.shape[:2] != prev_input_BCqq.shape[:2]:
        raise ValueError(
            f"inputs must be (B, C, p, p) and (B, C, q, q) with the same B and C, got "
            f"{tuple(input_BCpp.shape)} and {tuple(prev_input_BCqq.shape)}"
        )
    p = input_BCpp.shape[-1]
    if prev_input_BCqq.shape[-1] >= p:
        raise ValueError(f"the previous scale ({prev_input_BCqq.shape[-1]}) must be smaller than this one ({p})")
    up_BCpp = F.interpolate(prev_input_BCqq.float(), size=(p, p), mode="area")
    score_Bl = (input_BCpp.float() - up_BCpp).pow(2).sum(1).flatten(1)
    # topk's order among equal scores is unspecified; a stable descending sort makes the choice deterministic
    order_Bl = score_Bl.argsort(dim=1, descending=True, stable=True)
    return order_Bl[:, : num_kept(p, keep)].sort(dim=1).values


def gather_tokens(x_BlC: torch.Tensor, idx_Bk: torch.Tensor) -> torch.Tensor:
    """The pivotal tokens `(B, k, C)` of a full token map `(B, l, C)`."""
    return x_BlC.gather(1, idx_Bk.unsqueeze(-1).expand(-1, -1, x_BlC.shape[-1]))


# Eager inside compiled blocks: area upsampling of a scale whose side is symbolic does not trace.
@torch.compiler.disable
def restore_tokens(forwarded_BkC: torch.Tensor, idx_Bk: torch.Tensor, cached_BqC: torch.Tensor, side: int) -> torch.Tensor:
    """The full `(B, side^2, C)` branch output: the previous scale's cached output upsampled, with the
    forwarded tokens written over it at `idx_Bk`."""
    if forwarded_BkC.shape[:2] != idx_Bk.shape or cached_BqC.shape[0] != idx_Bk.shape[0]:
        raise ValueError(
            f"forwarded {tuple(forwarded_BkC.shape)}, indices {tuple(idx_Bk.shape)} and cache "
            f"{tuple(cached_BqC.shape)} disagree on batch or token count"
        )
    full_BlC = upsample_tokens(cached_BqC.to(forwarded_BkC.dtype), side)
    return full_BlC.scatter(1, idx_Bk.unsqueeze(-1).expand(-1, -1, full_BlC.shape[-1]), forwarded_BkC)


class BranchCache:
    """The blocks' branch outputs at the previous scale, and the pivotal tokens of the current one.

    Created by `HARTTransformer.prepare_inference` when pruning is on; each block's attention and
    SwiGLU branch go through `run`. At a recording scale (`idx_Bk` None) a branch runs on every token;
    at a pruned scale on the pivotal ones, the others restored from the recorded outputs. Either way
    the full output is recorded for the next scale, except at the last scale, which has none: there
    each recorded output is dropped once restored from (at 1024 px the 64 x 64 scale's outputs would
    hold 0.8 GB in bf16). `dtype` (None: the outputs' own) is what the recorded outputs are stored in.
    """

    def __init__(self, record_from: int, dtype: Optional[torch.dtype] = None):
        self.record_from = record_from  # the scale before the first pruned one
        self.dtype = dtype
        self.idx_Bk: Optional[torch.Tensor] = None
        self.side, self.record = 0, True
        self.outputs: Dict[Tuple[int, str], torch.Tensor] = {}

    def start_scale(self, side: int, idx_Bk: Optional[torch.Tensor], record: bool = True) -> None:
        if idx_Bk is not None and not self.outputs:
            raise ValueError("a pruned scale needs the branch outputs of the scale before it: none were recorded")
        self.side, self.idx_Bk, self.record = side, idx_Bk, record

    def run(self, key: Tuple[int, str], h_BlC: torch.Tensor, branch: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return self._complete(key, branch(self._forwarded(h_BlC)))

    # The bookkeeping on either side of a branch stays out of torch.compile graphs (as KVCache.extend):
    # tracing it would guard on this cache's Python state (how many outputs are recorded, which scale
    # it is), so each compiled block would compile again at every scale until Dynamo's recompile limit
    # turned compilation off for it.
    @torch.compiler.disable
    def _forwarded(self, h_BlC: torch.Tensor) -> torch.Tensor:
        """What the branch runs on: every token at a recording scale, the pivotal ones at a pruned one."""
        return h_BlC if self.idx_Bk is None else gather_tokens(h_BlC, self.idx_Bk)

    @torch.compiler.disable
    def _complete(self, key: Tuple[int, str], out_BkC: torch.Tensor) -> torch.Tensor:
        """The branch's full output (restored around the pivotal tokens), recorded for the next scale."""
        out_BlC = out_BkC if self.idx_Bk is None else restore_tokens(out_BkC, self.idx_Bk, self.outputs[key], self.side)
        if self.record:
            self.outputs[key] = out_BlC if self.dtype is None else out_BlC.to(self.dtype)
        else:
            self.outputs.pop(key, None)
        return out_BlC
