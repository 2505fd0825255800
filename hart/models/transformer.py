"""The scale-wise HART transformer (llama variant: RMSNorm, RoPE, SwiGLU, AdaLN).

The sequence is the text tokens followed by the token maps of scales 1..S-1; the 1x1 scale has no
input slot: the last text position predicts it. Attention is block-causal by scale (bidirectional
inside a scale). Training runs the whole sequence with that mask; inference runs one scale at a time
against a KV cache, which gives the same structure without any mask.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from diffusers import ModelMixin  # noqa: F401  (pipeline loading looks the base class up in this module)
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.utils.accelerate_utils import apply_forward_hook

from hart.device import check_compile_support
from hart.models.attention import KVCache, attention
from hart.models.diffusion import DiffusionHead
from hart.models.pretrained import CastWhileLoading
from hart.models.rope import Rope, apply_rope, image_positions
from hart.pruning import BranchCache
from hart.text import TextConditioning
from hart.text_keys import attention_bias


class RMSNorm(nn.Module):
    """RMSNorm reduced in fp32, weight applied in the input dtype (as HF LlamaRMSNorm)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight.to(x.dtype) * y.to(x.dtype)


class SelfAttention(nn.Module):
    """Llama-style attention with q/v biases, the VAR softmax scale and optional QK-norm."""

    def __init__(self, dim: int, num_heads: int, l2_norm: bool):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv_proj = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)
        self.l2_norm = l2_norm
        if l2_norm:
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), math.log(4.0)))
            self.scale = 1.0
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)  # VAR's convention, not 1/sqrt(hd)

    def forward(self, x_BLC, rope_cos_sin, mask_LL=None, *, cache: Optional[KVCache] = None, layer: int = 0):
        B, L, C = x_BLC.shape
        # K has no bias. The projection is called as a module so that adapters (LoRA) wrapping it apply.
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = (self.qkv_proj(x_BLC) + bias).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, hd)
        if self.l2_norm:
            q = F.normalize(q, dim=-1) * self.scale_mul_1H11.clamp(max=math.log(100.0)).exp()
            k = F.normalize(k, dim=-1)
        cos, sin = rope_cos_sin
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.extend(layer, k, v)
        out = attention(q, k, v, scale=self.scale, mask_LL=mask_LL)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class AdaLNBlock(nn.Module):
    """Pre-norm block whose norms are modulated (scale, shift) and branches gated by the text."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, eps: float, l2_norm: bool):
        super().__init__()
        self.ln_wo_grad = RMSNorm(dim, eps)
        self.attn = SelfAttention(dim, num_heads, l2_norm)
        self.ffn = SwiGLU(dim, mlp_hidden)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def modulation(self, cond_BD: torch.Tensor) -> torch.Tensor:
        """`(B, 1, 6, C)` gates, scales and shifts: text only, so computed once per sampling call. In the
        weights' dtype, which int8 models keep in bf16 (`hart.quantize`); `forward` casts them."""
        return self.ada_lin(cond_BD.to(self.ada_lin[1].weight.dtype)).view(cond_BD.shape[0], 1, 6, -1)

    def forward(self, x_BLC, ada_B16C, rope_cos_sin, mask_LL=None, *, cache: Optional[KVCache] = None, layer: int = 0,
                branches: Optional[BranchCache] = None):
        """`branches` (token pruning) runs both branches on its pivotal tokens only; the residual stream,
        norms and modulation stay full size."""
        gamma1, gamma2, scale1, scale2, shift1, shift2 = ada_B16C.to(x_BLC.dtype).unbind(2)

        def attn(h):
            return self.attn(h, rope_cos_sin, mask_LL, cache=cache, layer=layer)

        h = self.ln_wo_grad(x_BLC) * (1 + scale1) + shift1
        x_BLC = x_BLC + gamma1 * (attn(h) if branches is None else branches.run((layer, "attn"), h, attn))
        h = self.ln_wo_grad(x_BLC) * (1 + scale2) + shift2
        return x_BLC + gamma2 * (self.ffn(h) if branches is None else branches.run((layer, "ffn"), h, self.ffn))


class AdaLNHead(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.ln_wo_grad = RMSNorm(dim, eps)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x_BLC, cond_BD):
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, x_BLC.shape[-1]).to(x_BLC.dtype).unbind(2)
        return self.ln_wo_grad(x_BLC) * (1 + scale) + shift


def swiglu_hidden(dim: int, mlp_ratio: float) -> int:
    return int(dim * mlp_ratio * 2 / 3 + 255) // 256 * 256


@dataclass
class InferenceState:
    """What every scale of one sampling call reuses (`HARTTransformer.prepare_inference`)."""

    text_BTC: torch.Tensor  # the text tokens with scale 0's level embedding: scale 0's input
    text_rope: Tuple[torch.Tensor, torch.Tensor]
    modulations: List[torch.Tensor]  # each block's AdaLN (gates, scales, shifts), (B, 1, 6, C)
    head_cond_BD: torch.Tensor
    offset_B: torch.Tensor  # each row's last text position: where the image positions start
    cache: KVCache
    text_key_bias_NT: Optional[torch.Tensor] = None  # compacted text (hart.text_keys): its key bias
    branches: Optional[BranchCache] = None  # token pruning: recorded and restored branch outputs


class HARTTransformer(CastWhileLoading, ConfigMixin):
    """Predicts each scale's tokens from the text and all coarser scales; owns the diffusion head."""

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        *,
        patch_nums: Sequence[int] = (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64),
        context_tokens: int = 300,
        context_dim: int = 1536,
        embed_dim: int = 1536,
        depth: int = 16,
        num_heads: int = 24,
        mlp_ratio: float = 4.0,
        vocab_size: int = 4096,
        latent_channels: int = 32,
        norm_eps: float = 1e-6,
        attn_l2_norm: bool = False,
        cond_pooling: str = "max",
        use_context_norm: bool = False,
        cond_drop_rate: float = 0.1,
        rope_base: float = 10000.0,
        diff_width: int = 1024,
        diff_depth: int = 6,
        num_sampling_steps: str = "8",
        diffusion_batch_mul: int = 4,
    ):
        super().__init__()
        if cond_pooling not in ("max", "avg"):
            raise ValueError(f"cond_pooling must be 'max' or 'avg', got {cond_pooling!r}")
        if embed_dim % num_heads or (embed_dim // num_heads) % 4:
            raise ValueError(f"embed_dim {embed_dim} must split into heads of a size divisible by 4 (2-D RoPE)")
        C = embed_dim
        self.context_norm = RMSNorm(context_dim, norm_eps) if use_context_norm else nn.Identity()
        self.context_embed = nn.Linear(context_dim, C)
        self.word_embed = nn.Linear(latent_channels, C)
        self.lvl_embed = nn.Embedding(len(patch_nums), C)
        hidden = swiglu_hidden(C, mlp_ratio)
        self.blocks = nn.ModuleList(AdaLNBlock(C, num_heads, hidden, norm_eps, attn_l2_norm) for _ in range(depth))
        self.head_nm = AdaLNHead(C, norm_eps)
        self.head = nn.Linear(C, vocab_size)
        self.decoder_norm = RMSNorm(C, norm_eps)
        self.diffusion_head = DiffusionHead(latent_channels, C, width=diff_width, depth=diff_depth,
                                            num_sampling_steps=num_sampling_steps, batch_mul=diffusion_batch_mul)
        self.rope = Rope(C // num_heads, rope_base)
        self.gradient_checkpointing = False

    @property
    def patch_nums(self) -> Tuple[int, ...]:
        return tuple(self.config.patch_nums)

    def compile_blocks(self) -> "HARTTransformer":
        """torch.compile each block and the diffusion head's MLP, in place. Shapes are dynamic, so one graph
        per module serves every scale and batch size; the KV cache and the pruning cache stay outside the
        graphs (`KVCache.extend`, `hart.pruning.BranchCache`). The first call compiles. Returns self; raises
        `hart.device.CompilerMissing` where no kernels can be built for the model's device."""
        check_compile_support(self.device)
        for module in (*self.blocks, self.diffusion_head.net):
            module.compile(dynamic=True)
        return self

    # ---- conditioning and blocks, shared by training and inference ---------------------------
    def _embed_context(self, context_BTC: torch.Tensor, compacted: bool = False) -> torch.Tensor:
        """Text features -> `cond_BTD`: the text input tokens and the AdaLN conditioning source.
        `compacted` text (hart.text_keys) may have fewer positions than the model's context."""
        T = context_BTC.shape[1] if compacted and context_BTC.shape[1] <= self.config.context_tokens else None
        if context_BTC.shape[1:] != (T or self.config.context_tokens, self.config.context_dim):
            raise ValueError(
                f"text features must have shape (B, {self.config.context_tokens}, {self.config.context_dim}), "
                f"got {tuple(context_BTC.shape)}: is the text encoder the one this model was trained with?"
            )
        dtype = self.context_embed.weight.dtype
        return self.context_embed(self.context_norm(context_BTC.to(dtype)))

    def _pool_condition(self, cond_BTD: torch.Tensor, mask_BT: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(block conditioning, head conditioning). Max pooling includes padding, as released."""
        cond_max = cond_BTD.max(dim=1).values
        if self.config.cond_pooling == "max":
            return cond_max, cond_max
        m = mask_BT.to(cond_BTD.dtype).unsqueeze(-1)
        return (cond_BTD * m).sum(1) / m.sum(1).clamp(min=1), cond_max

    def _run_blocks(self, x_BLC, modulations, rope_cos_sin, mask_LL=None, *, cache: Optional[KVCache] = None,
                    branches: Optional[BranchCache] = None):
        for i, (block, ada_B16C) in enumerate(zip(self.blocks, modulations)):
            if self.gradient_checkpointing and self.training:
                x_BLC = torch.utils.checkpoint.checkpoint(
                    block, x_BLC, ada_B16C, rope_cos_sin, mask_LL, use_reentrant=False
                )
            else:
                x_BLC = block(x_BLC, ada_B16C, rope_cos_sin, mask_LL, cache=cache, layer=i, branches=branches)
        return x_BLC

    def _logits(self, hidden_BLC: torch.Tensor, head_cond_BD: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_nm(hidden_BLC, head_cond_BD)).float()

    def diffusion_condition(self, hidden_BlC: torch.Tensor, code_embed_BlCv: torch.Tensor) -> torch.Tensor:
        """Condition of the residual diffusion: the last hidden state plus the sampled code's embedding."""
        return self.decoder_norm(hidden_BlC + self.word_embed(code_embed_BlCv.to(hidden_BlC.dtype)))

    # ---- training forward ------------------------------------------------------------------
    def forward(
        self,
        context_BTC: torch.Tensor,
        context_mask_BT: torch.Tensor,
        context_position_ids_BT: torch.Tensor,
        x_BLCv_wo_first_l: torch.Tensor,
        keep_idx_BK: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced pass over the whole sequence.

        `x_BLCv_wo_first_l` holds the inputs of scales 1..S-1 (the tokenizer's teacher-forcing
        input). `keep_idx_BK` (ascending row-major indices) keeps only those last-scale tokens, as
        HART's MAR-style subsampling; None keeps all. Returns the logits from the last text position
        on, `(B, 1 + sum_{k=1}^{S-2} p_k^2 + K, V)`, and the last scale's hidden states `(B, K, C)`.
        """
        B, T = context_BTC.shape[0], self.config.context_tokens
        pn, P = self.patch_nums, self.patch_nums[-1]
        n_prev = x_BLCv_wo_first_l.shape[1] - P * P
        if x_BLCv_wo_first_l.shape[1] != sum(p * p for p in pn) - 1:
            raise ValueError(f"x_BLCv_wo_first_l has {x_BLCv_wo_first_l.shape[1]} tokens, expected {sum(p * p for p in pn) - 1}")
        cond_BTD = self._embed_context(context_BTC)
        cond_blocks, cond_head = self._pool_condition(cond_BTD, context_mask_BT)
        tokens = self.word_embed(x_BLCv_wo_first_l.to(cond_BTD.dtype))
        last = tokens[:, n_prev:]
        if keep_idx_BK is not None:
            last = last.gather(1, keep_idx_BK.unsqueeze(-1).expand(-1, -1, last.shape[-1]))
        K = last.shape[1]
        levels = torch.cat([
            torch.full((p * p,), k, dtype=torch.long) for k, p in enumerate(pn[1:-1], start=1)
        ] + [torch.full((K,), len(pn) - 1, dtype=torch.long)]).to(context_BTC.device)
        x = torch.cat([cond_BTD, tokens[:, :n_prev], last], dim=1)
        x = x + self.lvl_embed(torch.cat([levels.new_zeros(T), levels])).unsqueeze(0)

        offset_B = context_position_ids_BT[:, -1]
        cos_sin = [self.rope.text(context_position_ids_BT)]
        for k, p in enumerate(pn[1:], start=1):
            index = keep_idx_BK if (k == len(pn) - 1 and keep_idx_BK is not None) else None
            cos_sin.append(self.rope.image(*image_positions(p, P, offset_B, index)))
        rope_cos_sin = (torch.cat([c for c, _ in cos_sin], 1), torch.cat([s for _, s in cos_sin], 1))

        all_levels = torch.cat([levels.new_zeros(T), levels])
        mask_LL = all_levels.unsqueeze(1) >= all_levels.unsqueeze(0)  # block-causal by scale
        hidden = self._run_blocks(x, [b.modulation(cond_blocks) for b in self.blocks], rope_cos_sin, mask_LL)
        logits = self._logits(hidden[:, T - 1 :], cond_head)
        return logits, hidden[:, -K:]

    # ---- inference: the text once, then one scale at a time against the KV cache ---------------
    # Model offload (diffusers' enable_model_cpu_offload) moves a model to the device when its
    # `forward` runs; `apply_forward_hook` gives these entry points the same hook.
    @apply_forward_hook
    def prepare_inference(
        self, text: TextConditioning, *, text_key_bias_NT: Optional[torch.Tensor] = None, record_from: Optional[int] = None,
        cache_dtype: Optional[torch.dtype] = None,
    ) -> InferenceState:
        """Everything the scales of one sampling call share: the text tokens (scale 0's input), the
        AdaLN modulations (they depend on the text only) and an empty KV cache.

        `text_key_bias_NT`: the text was compacted by `hart.text_keys.compact_text`, which gave this
        key bias. `record_from`: token pruning is on; the scales from this one on record their
        blocks' branch outputs (`hart.pruning.BranchCache`). `cache_dtype`: what the KV cache and the
        recorded branch outputs are stored in (None: the model's dtype).
        """
        cond_BTD = self._embed_context(text.features_BTC, compacted=text_key_bias_NT is not None)
        cond_blocks, head_cond_BD = self._pool_condition(cond_BTD, text.mask_BT)
        return InferenceState(
            text_BTC=cond_BTD + self.lvl_embed.weight[0],
            text_rope=self.rope.text(text.position_ids_BT),
            modulations=[block.modulation(cond_blocks) for block in self.blocks],
            head_cond_BD=head_cond_BD,
            offset_B=text.position_ids_BT[:, -1],
            cache=KVCache(len(self.blocks), self.config.context_tokens + sum(p * p for p in self.patch_nums[1:]),
                          cache_dtype),
            text_key_bias_NT=text_key_bias_NT,
            branches=None if record_from is None else BranchCache(record_from, cache_dtype),
        )

    @apply_forward_hook
    def scale_step(
        self, state: InferenceState, si: int, tokens_BlCv: Optional[torch.Tensor] = None, *,
        index_Bl: Optional[torch.Tensor] = None, pivotal_Bk: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Run scale `si` against the KV cache (scales 0..si-1 must have run): `(hidden_BlC, logits_BlV)`.

        Scale 0 reads the text (`tokens_BlCv` None); only its last position (it predicts the 1x1 scale)
        is returned. Scale si >= 1 reads `tokens_BlCv`, f-hat area-downsampled to p x p (latent channels),
        at the positions `index_Bl` of its row-major map (None: all, in order). Every text row of an
        image (conditional and unconditional under guidance) reads that image's one token row, as released.
        `pivotal_Bk` (token pruning, the whole map given): only these tokens run the blocks' branches.
        """
        if si == 0:
            mask = self._key_bias(state, state.text_BTC.shape[1])
            hidden_BLC = self._run_blocks(state.text_BTC, state.modulations, state.text_rope, mask, cache=state.cache)
            return hidden_BLC[:, -1:], self._logits(hidden_BLC[:, -1:], state.head_cond_BD)
        rows, B = state.offset_B.shape[0], tokens_BlCv.shape[0]
        if rows % B:
            raise ValueError(f"{B} token rows for {rows} text rows: give one per image or one per text row")
        x_BlC = self.word_embed(tokens_BlCv.to(self.word_embed.weight.dtype)) + self.lvl_embed.weight[si]
        x_BlC = x_BlC.repeat(rows // B, 1, 1)
        # branch outputs are recorded (and restored) over whole token maps only: not at MaskGIT steps
        whole = index_Bl is None and state.branches is not None and si >= state.branches.record_from
        branches = state.branches if whole else None
        if pivotal_Bk is not None:
            if branches is None or index_Bl is not None:
                raise ValueError("pivotal tokens need pruning set up in prepare_inference and the whole token map")
            index_Bl = pivotal_Bk
        index_Bl = None if index_Bl is None else index_Bl.repeat(rows // B, 1)
        if branches is not None:
            branches.start_scale(self.patch_nums[si], index_Bl if pivotal_Bk is not None else None,
                                 record=si < len(self.patch_nums) - 1)
        positions = image_positions(self.patch_nums[si], self.patch_nums[-1], state.offset_B, index_Bl)
        mask = self._key_bias(state, x_BlC.shape[1] if index_Bl is None else index_Bl.shape[1])
        hidden_BlC = self._run_blocks(
            x_BlC, state.modulations, self.rope.image(*positions), mask, cache=state.cache, branches=branches
        )
        return hidden_BlC, self._logits(hidden_BlC, state.head_cond_BD)

    def _key_bias(self, state: InferenceState, new_keys: int) -> Optional[torch.Tensor]:
        """The additive attention mask of compacted text over the cache after `new_keys` join it."""
        if state.text_key_bias_NT is None:
            return None
        return attention_bias(state.text_key_bias_NT, state.cache.len[0] + new_keys, state.text_BTC.dtype)
