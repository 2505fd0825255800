"""HART hybrid tokenizer: convolutional autoencoder + multi-scale residual quantizer.

Submodule names follow the official checkpoint (`encoder.down.{l}.block.{b}.norm1`, `...attn.{b}.qkv`,
`decoder.up.{l}.upsample.conv`, ...) so its weights load after only the quantizer renames.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin  # noqa: F401  (pipeline loading looks ModelMixin up here)
from diffusers.configuration_utils import register_to_config

from .pretrained import CastWhileLoading
from .quantizer import MultiScaleQuantizer


def _norm(C: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, C, eps=1e-6)


def _norm_silu(norm: nn.GroupNorm, x_BChw: torch.Tensor) -> torch.Tensor:
    h_BChw = norm(x_BChw)
    # In place when nothing records gradients: at 1024 px a fresh activation costs more to allocate and
    # fault in than the SiLU itself (0.39 s vs 0.14 s for 160 x 1024^2 bf16 on two EPYC cores).
    return F.silu(h_BChw, inplace=not h_BChw.requires_grad)


class ResnetBlock(nn.Module):
    def __init__(self, C_in: int, C_out: int, dropout: float, groups: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(C_in, groups), nn.Conv2d(C_in, C_out, 3, padding=1)
        self.norm2, self.conv2 = _norm(C_out, groups), nn.Conv2d(C_out, C_out, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.nin_shortcut = nn.Conv2d(C_in, C_out, 1) if C_in != C_out else nn.Identity()

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        h_BChw = self.conv1(_norm_silu(self.norm1, x_BChw))
        # One statement per step: rebinding h frees conv1's output before conv2 allocates its own, so the
        # block holds three activations at most (at 1024 px, 320 MiB each at the decoder's finest level).
        h_BChw = _norm_silu(self.norm2, h_BChw)
        h_BChw = self.conv2(self.dropout(h_BChw))
        return h_BChw.add_(self.nin_shortcut(x_BChw))  # in place: the conv output is ours (see _norm_silu)


class AttnBlock(nn.Module):
    """Single-head self-attention over the spatial positions (scale C^-1/2, SDPA's default)."""

    def __init__(self, C: int, groups: int):
        super().__init__()
        self.norm = _norm(C, groups)
        self.qkv = nn.Conv2d(C, 3 * C, 1)
        self.proj_out = nn.Conv2d(C, C, 1)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x_BChw.shape
        qkv_B3CL = self.qkv(self.norm(x_BChw)).view(B, 3, C, H * W)
        # One head as a (B, 1, L, C) head axis: SDPA's CPU flash kernel takes 4-D inputs only (3-D falls
        # back to the unfused math path, a quarter slower at the 64 x 64 latent).
        q_B1LC, k_B1LC, v_B1LC = qkv_B3CL.transpose(2, 3).unsqueeze(2).unbind(1)
        o_BLC = F.scaled_dot_product_attention(q_B1LC, k_B1LC, v_B1LC).squeeze(1)
        return x_BChw + self.proj_out(o_BLC.transpose(1, 2).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, C: int):
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, stride=2)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        # Asymmetric zero pad (right/bottom only), as the checkpoint was trained with.
        return self.conv(F.pad(x_BChw, (0, 1, 0, 1)))


# Nearest 2x upsampling repeats each input row, so a 3x3 convolution over the upsampled map sees only
# two distinct input rows per output row: output row 2i reads input rows (i-1, i) with the kernel's rows
# (0, 1+2), row 2i+1 reads (i, i+1) with rows (0+1, 2); columns likewise. _PHASE_ROWS_a2u[a] sums the
# kernel's three rows into the two taps of phase a.
_PHASE_ROWS_a2u = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]], [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])


class Upsample(nn.Module):
    """Nearest 2x upsampling, then a 3x3 convolution.

    Computed as one 2x2 convolution on the small map with four outputs per channel, one per sub-pixel
    phase (row parity a, column parity b), interleaved into the large map: the same result up to float
    rounding with 16/36 of the multiply-adds and no upsampled copy of the input. At 1024 px the
    decoder's four upsamplings are a sixth of its convolution work.
    """

    def __init__(self, C: int):
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        B, _, h, w = x_BChw.shape
        weight, bias = self.conv.weight, self.conv.bias
        O = weight.shape[0]
        rows_a2u = _PHASE_ROWS_a2u.to(weight)
        phase_kernels = torch.einsum("aiu,ocuv,bjv->abocij", rows_a2u, weight, rows_a2u).reshape(4 * O, -1, 2, 2)
        # On the input padded by one, the 2x2 window at (k, l) covers input rows k-1, k and columns
        # l-1, l: phase (a, b) of output (2i+a, 2j+b) is the window at (i+a, j+b).
        y_B4Ohw = F.conv2d(F.pad(x_BChw, (1, 1, 1, 1)), phase_kernels, bias.repeat(4))
        out_BOHW = torch.empty(B, O, 2 * h, 2 * w, dtype=y_B4Ohw.dtype, device=y_B4Ohw.device,
                               memory_format=_memory_format(x_BChw))
        for a in (0, 1):
            for b in (0, 1):
                phase = 2 * a + b
                out_BOHW[:, :, a::2, b::2] = y_B4Ohw[:, phase * O:(phase + 1) * O, a:a + h, b:b + w]
        return out_BOHW


def _memory_format(x_BChw: torch.Tensor) -> torch.memory_format:
    channels_last = x_BChw.is_contiguous(memory_format=torch.channels_last) and not x_BChw.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def _mid(C: int, dropout: float, groups: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1, mid.attn_1 = ResnetBlock(C, C, dropout, groups), AttnBlock(C, groups)
    mid.block_2 = ResnetBlock(C, C, dropout, groups)
    return mid


def _run_mid(mid: nn.Module, h_BChw: torch.Tensor) -> torch.Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(h_BChw)))


def _level(C_in: int, C_out: int, num_blocks: int, with_attn: bool, dropout: float, groups: int) -> nn.Module:
    """One resolution level: ResnetBlocks (first one changes width), attention after each if asked."""
    level = nn.Module()
    level.block = nn.ModuleList(ResnetBlock(C_in if b == 0 else C_out, C_out, dropout, groups) for b in range(num_blocks))
    level.attn = nn.ModuleList(AttnBlock(C_out, groups) for _ in range(num_blocks if with_attn else 0))
    return level


def _level_steps(level: nn.Module):
    """A level's modules in running order: each ResnetBlock, then its attention if the level has any.

    The caller applies them one by one (`for step in _level_steps(level): h = step(h)`): a function that
    ran the whole level would leave its input held by the caller for the level's duration, at 1024 px
    one more 320 MiB activation at the decoder's finest level.
    """
    for b, block in enumerate(level.block):
        yield block
        if len(level.attn):
            yield level.attn[b]


class Encoder(nn.Module):
    def __init__(self, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int, *, dropout: float,
                 groups: int, patch_size: int):
        super().__init__()
        n, widths = len(ch_mult), [ch * m for m in ch_mult]
        self.patch_size = patch_size
        self.conv_in = nn.Conv2d(3 * patch_size**2, ch, 3, padding=1)
        self.down = nn.ModuleList()
        for l in range(n):
            level = _level(widths[l - 1] if l else ch, widths[l], num_res_blocks, l == n - 1, dropout, groups)
            if l != n - 1:
                level.downsample = Downsample(widths[l])
            self.down.append(level)
        self.mid = _mid(widths[-1], dropout, groups)
        self.norm_out = _norm(widths[-1], groups)
        self.conv_out = nn.Conv2d(widths[-1], z_channels, 3, padding=1)

    def forward(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        h_BChw = self.conv_in(F.pixel_unshuffle(x_B3HW, self.patch_size))
        for level in self.down:
            for step in _level_steps(level):
                h_BChw = step(h_BChw)
            if hasattr(level, "downsample"):
                h_BChw = level.downsample(h_BChw)
        h_BChw = _run_mid(self.mid, h_BChw)
        return self.conv_out(_norm_silu(self.norm_out, h_BChw))


class Decoder(nn.Module):
    def __init__(self, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int, *, dropout: float,
                 groups: int, patch_size: int):
        super().__init__()
        n, widths = len(ch_mult), [ch * m for m in ch_mult]
        self.patch_size = patch_size
        self.conv_in = nn.Conv2d(z_channels, widths[-1], 3, padding=1)
        self.mid = _mid(widths[-1], dropout, groups)
        # Stored as up[l] (finest first) but built and run coarsest first.
        up = []
        for l in range(n):
            level = _level(widths[l + 1] if l < n - 1 else widths[-1], widths[l], num_res_blocks + 1, l == n - 1, dropout,
                           groups)
            if l != 0:
                level.upsample = Upsample(widths[l])
            up.append(level)
        self.up = nn.ModuleList(up)
        self.norm_out = _norm(ch * ch_mult[0], groups)
        self.conv_out = nn.Conv2d(ch * ch_mult[0], 3 * patch_size**2, 3, padding=1)

    def forward(self, z_BChw: torch.Tensor) -> torch.Tensor:
        h_BChw = _run_mid(self.mid, self.conv_in(z_BChw))
        for level in reversed(self.up):
            for step in _level_steps(level):
                h_BChw = step(h_BChw)
            if hasattr(level, "upsample"):
                h_BChw = level.upsample(h_BChw)
        return F.pixel_shuffle(self.conv_out(_norm_silu(self.norm_out, h_BChw)), self.patch_size)


class HybridTokenizer(CastWhileLoading, ConfigMixin):
    """Image <-> (per-scale codes, continuous residual). Images are (B, 3, H, W) in [-1, 1]."""

    @register_to_config
    def __init__(
        self,
        *,
        vocab_size: int = 4096,
        latent_channels: int = 32,
        base_channels: int = 160,
        channel_multipliers: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        dropout: float = 0.0,
        beta: float = 0.25,
        quant_conv_kernel_size: int = 3,
        phi_ratio: float = 0.5,
        num_phi: int = 4,
        using_znorm: bool = False,
        patch_nums: Sequence[int] = (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64),
        norm_groups: int = 32,
        patch_size: int = 1,
    ):
        super().__init__()
        # GroupNorm groups: 32 in the release. A narrow tokenizer needs fewer: at one channel per group
        # the norm removes each channel's per-image mean, i.e. the flat colours of simple images.
        # patch_size p > 1 folds p x p pixels into channels before the first conv (and unfolds after the
        # last), so no level runs at full resolution: 1 in the release; the bundled recipe's small
        # tokenizer uses 4, because full-resolution convolutions made its CPU training far too slow.
        args = (base_channels, tuple(channel_multipliers), num_res_blocks, latent_channels)
        kwargs = dict(dropout=dropout, groups=norm_groups, patch_size=patch_size)
        self.encoder, self.decoder = Encoder(*args, **kwargs), Decoder(*args, **kwargs)
        ks = quant_conv_kernel_size
        self.quant_conv = nn.Conv2d(latent_channels, latent_channels, ks, padding=ks // 2)
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, ks, padding=ks // 2)
        self.quantize = MultiScaleQuantizer(vocab_size, latent_channels, num_phi=num_phi, phi_ratio=phi_ratio,
                                            beta=beta, using_znorm=using_znorm)

    @property
    def downsample_factor(self) -> int:
        return self.config.patch_size * 2 ** (len(self.config.channel_multipliers) - 1)

    def _patch_nums(self, patch_nums: Optional[Sequence[int]]) -> Tuple[int, ...]:
        return tuple(self.config.patch_nums if patch_nums is None else patch_nums)

    def encode_latent(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) image in [-1, 1] -> latent f (B, Cvae, H/d, W/d), d = `downsample_factor` (16 as released)."""
        d = self.downsample_factor
        if img_B3HW.ndim != 4 or img_B3HW.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(img_B3HW.shape)}")
        if img_B3HW.shape[2] % d or img_B3HW.shape[3] % d:
            raise ValueError(f"image height and width must be multiples of {d}, got {tuple(img_B3HW.shape[2:])}")
        # channels last, as in decoding: 9-17% faster encoding of a 256 px image on two CPU cores
        img_B3HW = img_B3HW.contiguous(memory_format=torch.channels_last)
        return self.quant_conv(self.encoder(img_B3HW)).contiguous()

    def decode_latent(self, f_hat_BChw: torch.Tensor) -> torch.Tensor:
        # Channels-last activations let the convolution libraries pick their NHWC kernels: decoding a
        # 256 px image on two CPU cores is 12-23% faster, with the same values up to float rounding.
        # The weights follow once (loading hands them over in NCHW): NCHW weights are
        # reordered at every call, 9% of a 256 px bf16 decode on two cores. Same images up to float rounding.
        if not self.post_quant_conv.weight.is_contiguous(memory_format=torch.channels_last):
            with torch.inference_mode(False):  # weights made under inference mode could not be trained later
                self.decoder.to(memory_format=torch.channels_last)
                self.post_quant_conv.to(memory_format=torch.channels_last)
        # in the decoder's dtype: it may be bf16 while the quantizer stays fp32 (`decoder_to`)
        f_hat_BChw = f_hat_BChw.to(self.post_quant_conv.weight.dtype).contiguous(memory_format=torch.channels_last)
        return self.decoder(self.post_quant_conv(f_hat_BChw)).clamp(-1, 1).contiguous()

    def decoder_to(self, dtype: torch.dtype) -> "HybridTokenizer":
        """The decoding half (post-quant conv and decoder) in `dtype`, the encoder and quantizer as they are."""
        self.post_quant_conv.to(dtype)
        self.decoder.to(dtype)
        return self

    def img_to_tokens(self, img_B3HW: torch.Tensor, patch_nums: Optional[Sequence[int]] = None
                      ) -> Tuple[List[torch.Tensor], torch.Tensor]:
        """Per-scale codes (B, p*p) and the continuous residual (B, P*P, Cvae) of an image."""
        return self.quantize.encode(self.encode_latent(img_B3HW), self._patch_nums(patch_nums))

    def tokens_to_img(self, idx_list: Sequence[torch.Tensor], residual_BLC: Optional[torch.Tensor] = None,
                      patch_nums: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Decode codes (plus the residual; discrete-only when None) to an image in [-1, 1]."""
        f_hat_BChw = self.quantize.idx_to_fhat(idx_list, self._patch_nums(patch_nums), residual_BLC)
        return self.decode_latent(f_hat_BChw)

    def forward(self, img_B3HW: torch.Tensor, skip_continuous: bool = False
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training forward: (unclamped reconstruction, VQ loss, per-scale code hits (S, V))."""
        f_BChw = self.encode_latent(img_B3HW)
        f_hat_BChw, vq_loss, hits_SV = self.quantize(f_BChw, self._patch_nums(None), skip_continuous)
        return self.decoder(self.post_quant_conv(f_hat_BChw)), vq_loss, hits_SV
