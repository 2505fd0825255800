"""Rotary position embeddings of the HART transformer: 1-D over text, the release's 2-D over image tokens."""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x_BHLd: torch.Tensor, cos_BLd: torch.Tensor, sin_BLd: torch.Tensor) -> torch.Tensor:
    cos, sin = cos_BLd.unsqueeze(1).to(x_BHLd.dtype), sin_BLd.unsqueeze(1).to(x_BHLd.dtype)
    return x_BHLd * cos + rotate_half(x_BHLd) * sin


class Rope:
    """Rotary angles: 1-D for text tokens, the reference's 2-D variant for image tokens.

    The 2-D angles are `[a*g, a*g, b*g, b*g]` in four blocks and are applied with the same
    rotate-half as 1-D, so dim d pairs with d + hd/2, which carries the other axis' angle. That is
    not a true rotation, but the released weights were trained with it (docs/architecture.md).
    """

    def __init__(self, head_dim: int, base: float):
        self.head_dim = head_dim
        self.inv_freq_1d = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        half = head_dim // 2
        self.inv_freq_2d = 1.0 / (base ** (torch.arange(0, half, 2, dtype=torch.int64).float() / half))

    def text(self, pos_BT: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        ang = pos_BT.float().unsqueeze(-1) * self.inv_freq_1d.to(pos_BT.device, non_blocking=True)
        ang = torch.cat([ang, ang], dim=-1)
        return ang.cos(), ang.sin()

    def image(self, a_Bl: torch.Tensor, b_Bl: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        g = self.inv_freq_2d.to(a_Bl.device)
        ang_a, ang_b = a_Bl.unsqueeze(-1) * g, b_Bl.unsqueeze(-1) * g
        ang = torch.cat([ang_a, ang_a, ang_b, ang_b], dim=-1)
        return ang.cos(), ang.sin()


def image_positions(
    side: int, final_side: int, offset_B: torch.Tensor, index_Bl: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """2-D RoPE coordinates of the tokens of one `side` x `side` scale (row-major).

    Coordinates live on the final grid: `(r / side) * final_side`, divided before multiplying, in
    fp32, plus the row's last text position on both axes, as released. `index_Bl` selects tokens.
    """
    k = torch.arange(side * side, device=offset_B.device)
    r = torch.div(k, side, rounding_mode="floor").float()
    c = (k % side).float()
    a = (r / side) * final_side
    b = (c / side) * final_side
    a_Bl = a.unsqueeze(0) + offset_B.float().unsqueeze(1)
    b_Bl = b.unsqueeze(0) + offset_B.float().unsqueeze(1)
    if index_Bl is not None:
        a_Bl, b_Bl = a_Bl.gather(1, index_Bl), b_Bl.gather(1, index_Bl)
    return a_Bl, b_Bl
