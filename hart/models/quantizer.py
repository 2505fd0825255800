"""Multi-scale residual quantizer of the HART hybrid tokenizer (VAR-style).

A latent `f` (B, Cvae, P, P) is explained coarse to fine: at scale `si` the residual is area-pooled to
`p_si`, snapped to the codebook, bicubic-upsampled back to `P`, refined by a shared conv `phi` and
subtracted. What the discrete scales cannot explain is the continuous residual that HART's diffusion
head learns; the last scale is added without phi and without resampling (the hybrid rule).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def area_down(f_BChw: torch.Tensor, p: int) -> torch.Tensor:
    """Average-pool to p x p (PyTorch "area" windows); identity at equal size."""
    if f_BChw.shape[-2:] == (p, p):
        return f_BChw
    return F.interpolate(f_BChw, size=(p, p), mode="area")


def bicubic_up(h_BChw: torch.Tensor, P: int) -> torch.Tensor:
    """Bicubic resize to P x P (A = -0.75, align_corners=False); identity at equal size."""
    if h_BChw.shape[-2:] == (P, P):
        return h_BChw
    return F.interpolate(h_BChw, size=(P, P), mode="bicubic", align_corners=False)


def phi_ticks(num_phi: int) -> List[float]:
    """Tick points of the shared phi convs, computed in float64 the way NumPy's linspace does.

    The exact float64 arithmetic matters: at 10 scales, scales 2 and 7 fall exactly between two ticks
    and the last bit decides which phi conv they use (`phi_index`); torch.linspace rounds differently and
    would pick other convs than the release.
    """
    K = num_phi
    denom = 3 * K if K == 4 else 2 * K
    start, stop = 1.0 / denom, 1.0 - 1.0 / denom
    if K == 1:
        return [start]
    step = (stop - start) / (K - 1)
    return [i * step + start for i in range(K - 1)] + [stop]


class MultiScaleQuantizer(nn.Module):
    def __init__(self, vocab_size: int, latent_channels: int, *, num_phi: int = 4, phi_ratio: float = 0.5,
                 beta: float = 0.25, using_znorm: bool = False):
        super().__init__()
        self.vocab_size, self.Cvae = vocab_size, latent_channels
        self.num_phi, self.phi_ratio = num_phi, abs(phi_ratio)
        self.beta, self.using_znorm = beta, using_znorm
        self.embedding = nn.Embedding(vocab_size, latent_channels)
        # A ratio of ~0 makes phi the identity and the official checkpoint then has no phi weights.
        n = num_phi if self.phi_ratio > 1e-6 else 0
        self.phi = nn.ModuleList(nn.Conv2d(latent_channels, latent_channels, 3, padding=1) for _ in range(n))
        self._ticks = phi_ticks(num_phi)

    # ---------------------------------------------------------------- phi
    def phi_index(self, si: int, num_scales: int) -> int:
        u = si / (num_scales - 1) if num_scales > 1 else 0.0
        dists = [abs(t - u) for t in self._ticks]
        return dists.index(min(dists))  # first minimum wins, like np.argmin

    def apply_phi(self, h_BChw: torch.Tensor, si: int, num_scales: int) -> torch.Tensor:
        if len(self.phi) == 0:
            return h_BChw
        conv = self.phi[self.phi_index(si, num_scales)]
        r = self.phi_ratio
        # f-hat accumulates in float32 whatever the weights' dtype (bf16/fp16 pipelines)
        return h_BChw * (1 - r) + conv(h_BChw.to(conv.weight.dtype)).to(h_BChw.dtype) * r

    # ---------------------------------------------------------------- codebook
    @torch.no_grad()
    def lookup(self, z_NC: torch.Tensor, using_znorm: Optional[bool] = None) -> torch.Tensor:
        """Nearest code per row; `using_znorm=None` follows the config (the hybrid encode forces L2)."""
        E_VC = self.embedding.weight
        if self.using_znorm if using_znorm is None else using_znorm:
            return (F.normalize(z_NC, dim=-1) @ F.normalize(E_VC, dim=-1).T).argmax(dim=1)
        # Same expansion as the reference (|z|^2 + |e|^2 - 2 z.e) so near-ties resolve identically.
        d_NV = z_NC.square().sum(dim=1, keepdim=True) + E_VC.square().sum(dim=1)
        d_NV.addmm_(z_NC, E_VC.T, alpha=-2)
        return d_NV.argmin(dim=1)

    def embed(self, idx_Bl: torch.Tensor) -> torch.Tensor:
        """Codes of a square row-major p x p map -> (B, Cvae, p, p)."""
        B, l = idx_Bl.shape
        p = math.isqrt(l)
        if p * p != l:
            raise ValueError(f"a scale must hold a square number of tokens, got {l}")
        return self.embedding(idx_Bl).transpose(1, 2).reshape(B, self.Cvae, p, p)

    def _lookup_map(self, z_BChw: torch.Tensor, using_znorm: Optional[bool] = None) -> torch.Tensor:
        B, C, p, _ = z_BChw.shape
        return self.lookup(z_BChw.permute(0, 2, 3, 1).reshape(-1, C), using_znorm).view(B, p * p)

    @staticmethod
    def _check_latent(f_BChw: torch.Tensor, patch_nums: Sequence[int]) -> int:
        P = patch_nums[-1]
        if f_BChw.ndim != 4 or f_BChw.shape[-2:] != (P, P):
            raise ValueError(f"latent must be (B, C, {P}, {P}) for patch_nums ending in {P}, got {tuple(f_BChw.shape)}")
        return P

    # ---------------------------------------------------------------- encoders
    @torch.no_grad()
    def residual_codes(self, rest_BChw: torch.Tensor, p: int) -> torch.Tensor:
        """The codes `encode` picks at a p x p scale for what is left of the latent: (B, p*p)."""
        return self._lookup_map(area_down(rest_BChw, p), using_znorm=False)

    @torch.no_grad()
    def encode(self, f_BChw: torch.Tensor, patch_nums: Sequence[int]) -> Tuple[List[torch.Tensor], torch.Tensor]:
        """Hybrid encode: per-scale codes plus the continuous residual (B, P*P, Cvae).

        The residual is `f - f_hat_discrete` under the inference rule (no phi at the last scale).
        """
        P, S = self._check_latent(f_BChw, patch_nums), len(patch_nums)
        rest_BChw = f_BChw.detach()
        idx_list = []
        for si, p in enumerate(patch_nums[:-1]):
            idx_Bl = self.residual_codes(rest_BChw, p)
            idx_list.append(idx_Bl)
            rest_BChw = rest_BChw - self.apply_phi(bicubic_up(self.embed(idx_Bl), P), si, S)
        rest_BLC = rest_BChw.flatten(2).transpose(1, 2)
        idx_list.append(self.residual_codes(rest_BChw, P))
        return idx_list, rest_BLC - self.embedding(idx_list[-1])

    def _var_walk(self, f_BChw: torch.Tensor, patch_nums: Sequence[int]):
        """The plain VAR walk (phi at every scale): per scale, the pooled residual the lookup
        sees and its codes."""
        P, S = self._check_latent(f_BChw, patch_nums), len(patch_nums)
        rest_BChw = f_BChw.detach()
        for si, p in enumerate(patch_nums):
            r_BChw = area_down(rest_BChw, p)
            idx_Bl = self._lookup_map(r_BChw)
            yield r_BChw, idx_Bl
            rest_BChw = rest_BChw - self.apply_phi(bicubic_up(self.embed(idx_Bl), P), si, S)

    @torch.no_grad()
    def encode_var(self, f_BChw: torch.Tensor, patch_nums: Sequence[int]) -> List[torch.Tensor]:
        """Plain VAR encode: phi at every scale, including the last."""
        return [idx_Bl for _, idx_Bl in self._var_walk(f_BChw, patch_nums)]

    # ---------------------------------------------------------------- decoders
    def add_scale(self, si: int, patch_nums: Sequence[int], f_hat_BChw: torch.Tensor, h_BChw: torch.Tensor):
        """f_hat plus scale si's codes `h` (B, Cvae, p, p), upsampled and refined by phi."""
        return f_hat_BChw + self.apply_phi(bicubic_up(h_BChw, patch_nums[-1]), si, len(patch_nums))

    def next_scale_input(self, si: int, patch_nums: Sequence[int], f_hat_BChw: torch.Tensor,
                         h_BChw: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """AR step for si <= S-2: add scale si to f_hat, return it and the next scale's input."""
        if not 0 <= si < len(patch_nums) - 1:
            raise ValueError(f"next_scale_input covers scales 0..{len(patch_nums) - 2}, got si={si}")
        f_hat_BChw = self.add_scale(si, patch_nums, f_hat_BChw, h_BChw)
        return f_hat_BChw, area_down(f_hat_BChw, patch_nums[si + 1])

    def teacher_forcing_input(self, idx_list: Sequence[torch.Tensor], patch_nums: Sequence[int]) -> torch.Tensor:
        """Inputs of scales 1..S-1 built from ground-truth codes: (B, L-1, Cvae) float32."""
        if len(idx_list) != len(patch_nums):
            raise ValueError(f"got {len(idx_list)} scales of codes for {len(patch_nums)} patch_nums")
        B, P = idx_list[0].shape[0], patch_nums[-1]
        f_hat_BChw = self.embedding.weight.new_zeros(B, self.Cvae, P, P, dtype=torch.float32)
        next_BLC = []
        for si in range(len(patch_nums) - 1):
            f_hat_BChw, next_BChw = self.next_scale_input(si, patch_nums, f_hat_BChw, self.embed(idx_list[si]))
            next_BLC.append(next_BChw.flatten(2).transpose(1, 2))
        return torch.cat(next_BLC, dim=1)

    def idx_to_fhat(self, idx_list: Sequence[torch.Tensor], patch_nums: Sequence[int],
                    residual_BLC: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The sampler's f_hat: phi'd scales 0..S-2, then the last scale (plus residual) added as is.

        Accumulates in float32 whatever the model dtype (the reference's fp16 accumulation loses detail).
        """
        if len(idx_list) != len(patch_nums):
            raise ValueError(f"got {len(idx_list)} scales of codes for {len(patch_nums)} patch_nums")
        B, P = idx_list[0].shape[0], patch_nums[-1]
        f_hat_BChw = self.embedding.weight.new_zeros(B, self.Cvae, P, P, dtype=torch.float32)
        for si in range(len(patch_nums) - 1):
            f_hat_BChw = self.add_scale(si, patch_nums, f_hat_BChw, self.embed(idx_list[si]))
        f_hat_BChw = f_hat_BChw + self.embed(idx_list[-1])
        if residual_BLC is not None:
            f_hat_BChw = f_hat_BChw + residual_BLC.transpose(1, 2).reshape(B, self.Cvae, P, P)
        return f_hat_BChw

    # ---------------------------------------------------------------- training
    def forward(self, f_BChw: torch.Tensor, patch_nums: Sequence[int],
                skip_continuous: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tokenizer training forward: straight-through f_hat, VQ loss, per-scale code hits (S, V).

        Unlike `encode`, phi is applied at the last scale too (the reference's training rule).
        """
        P, S = self._check_latent(f_BChw, patch_nums), len(patch_nums)
        with torch.autocast(device_type=f_BChw.device.type, enabled=False):
            f_BChw = f_BChw.float()
            f_ng = f_BChw.detach()
            rest_BChw, f_hat_BChw = f_ng, torch.zeros_like(f_ng)
            vq_loss, hits = 0.0, []
            for si, p in enumerate(patch_nums):
                idx_Bl = self._lookup_map(area_down(rest_BChw, p))
                hits.append(idx_Bl.flatten().bincount(minlength=self.vocab_size))
                h_BChw = self.apply_phi(bicubic_up(self.embed(idx_Bl), P), si, S)
                f_hat_BChw = f_hat_BChw + h_BChw
                rest_BChw = rest_BChw - h_BChw.detach()  # only feeds lookups and the final residual
                vq_loss = vq_loss + self.beta * F.mse_loss(f_hat_BChw.detach(), f_BChw) + F.mse_loss(f_hat_BChw, f_ng)
            vq_loss = vq_loss / S
            if not skip_continuous:
                f_hat_BChw = f_hat_BChw + rest_BChw  # the hybrid path: the residual restores f exactly
            f_hat_BChw = (f_hat_BChw.detach() - f_ng) + f_BChw  # straight-through to the encoder
            hits_SV = torch.stack(hits).float()
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(hits_SV)
        return f_hat_BChw, vq_loss, hits_SV

    @torch.no_grad()
    def restart_codes(self, dead_V: torch.Tensor, f_BChw: torch.Tensor, patch_nums: Sequence[int],
                      generator: Optional[torch.Generator] = None) -> int:
        """Re-seed unused codes (`dead_V`, bool (V,)) with vectors the lookup actually sees.

        A code no residual comes near never gets a gradient again (codebook collapse); moving it onto
        a random per-scale residual of the current batch puts it back in play. Returns how many moved.
        Under several processes every one must call this; rank 0's choice is broadcast.
        """
        dead = dead_V.nonzero().flatten()
        if len(dead):
            seen_NC = torch.cat([r_BChw.permute(0, 2, 3, 1).reshape(-1, self.Cvae)
                                 for r_BChw, _ in self._var_walk(f_BChw.float(), patch_nums)])
            pick = torch.randint(len(seen_NC), (len(dead),), generator=generator,
                                 device=None if generator is None else generator.device).to(seen_NC.device)
            weight = self.embedding.weight
            weight[dead.to(weight.device)] = seen_NC[pick].to(weight.dtype)
        if dist.is_available() and dist.is_initialized():
            dist.broadcast(self.embedding.weight.data, src=0)
        return len(dead)

