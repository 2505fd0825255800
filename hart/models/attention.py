"""Scaled dot-product attention: torch SDPA everywhere, xformers on CUDA when it is installed."""
from __future__ import annotations

import importlib.util
from typing import Optional

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
    """Attention of q over k/v; `mask_LL` is a boolean (L, S) "may attend" mask or None (no mask)."""
    if mask_LL is None and q_BHLd.is_cuda and _HAS_XFORMERS and q_BHLd.dtype in (torch.float16, torch.bfloat16):
        out = _xformers_ops().memory_efficient_attention(
            q_BHLd.transpose(1, 2), k_BHSd.transpose(1, 2), v_BHSd.transpose(1, 2), scale=scale
        )
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q_BHLd, k_BHSd, v_BHSd, attn_mask=mask_LL, scale=scale)
