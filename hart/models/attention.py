"""Scaled dot-product attention (torch SDPA everywhere, xformers on CUDA when it is installed) and the
inference KV cache."""
from __future__ import annotations

import importlib.util
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

_HAS_XFORMERS = importlib.util.find_spec("xformers") is not None
_xops = None


def _xformers_ops():
    # Imported lazily: a CUDA build of xformers warns at import on CPU-only machines.
    global _xops
    if _xops is None:
        import xformers.ops as xops

        _xops = xops
    return _xops


def attention(
    q_BHLd: torch.Tensor, k_BHSd: torch.Tensor, v_BHSd: torch.Tensor, scale: float, mask_LL: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Attention of q over k/v; `mask_LL` is a boolean "may attend" mask or an additive one in q's dtype,
    broadcastable to (B, H, L, S), or None (no mask)."""
    if mask_LL is None and q_BHLd.is_cuda and _HAS_XFORMERS and q_BHLd.dtype in (torch.float16, torch.bfloat16):
        out = _xformers_ops().memory_efficient_attention(
            q_BHLd.transpose(1, 2), k_BHSd.transpose(1, 2), v_BHSd.transpose(1, 2), scale=scale
        )
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q_BHLd, k_BHSd, v_BHSd, attn_mask=mask_LL, scale=scale)


class KVCache:
    """Per-layer keys and values (after RoPE) of the scales run so far in one sampling call.

    Buffers for the whole sequence are allocated at the first call, so each scale writes in place
    instead of re-copying every earlier scale (their pages become resident only as they are written).
    Once `keep_new` is False (the last scale, when nothing runs after it) new keys and values are
    attended to but not stored: at 1024 px that keeps the 64 x 64 scale's 0.8 GB (bf16) out of memory.
    `dtype` (None: the keys' own) is what the buffers store; attention reads them back in the keys' dtype
    (a bf16 cache for a model computing in fp32 halves the cache, 2.1 GB at 1024 px, and rounds it).
    """

    def __init__(self, depth: int, max_len: int, dtype: Optional[torch.dtype] = None):
        self.max_len, self.dtype = max_len, dtype
        self.k: List[Optional[torch.Tensor]] = [None] * depth
        self.v: List[Optional[torch.Tensor]] = [None] * depth
        self.len = [0] * depth
        self.keep_new = True

    # Kept out of torch.compile graphs: tracing it would guard on the cache's Python state (allocated
    # or not, filled length), so every scale of every layer would compile again.
    @torch.compiler.disable
    def extend(self, layer: int, k_BHld: torch.Tensor, v_BHld: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.k[layer] is None:
            B, H, _, d = k_BHld.shape
            self.k[layer] = k_BHld.new_empty(B, H, self.max_len, d, dtype=self.dtype or k_BHld.dtype)
            self.v[layer] = v_BHld.new_empty(B, H, self.max_len, d, dtype=self.dtype or v_BHld.dtype)
        start, end = self.len[layer], self.len[layer] + k_BHld.shape[2]
        if end > self.max_len:
            raise RuntimeError(f"KV cache overflow: {end} > {self.max_len} positions")
        if not self.keep_new:
            # cat promotes a bf16 cache to the new keys' fp32 as it copies: no converted copy first
            return (torch.cat((self.k[layer][:, :, :start], k_BHld), dim=2),
                    torch.cat((self.v[layer][:, :, :start], v_BHld), dim=2))
        self.k[layer][:, :, start:end] = k_BHld
        self.v[layer][:, :, start:end] = v_BHld
        self.len[layer] = end
        return self.k[layer][:, :, :end].to(k_BHld.dtype), self.v[layer][:, :, :end].to(v_BHld.dtype)
