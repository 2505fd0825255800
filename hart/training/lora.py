"""LoRA adapters (peft) on chosen groups of HART's linear layers, and merging them back.

The groups (`LORA_GROUPS`): `attention` (every block's qkv and output projections), `mlp` (every
block's gated MLP), `modulation` (the AdaLN layers that turn the pooled text condition into every
block's scales and shifts, and the head norm's), `context` (the projection of the text features
into the transformer), `head` (the token classifier) and `diffusion` (every linear layer of the
residual diffusion head).

`add_lora` injects adapters in place, so the transformer keeps its class and methods (the sampler
and the objective call them directly). `merge_lora` folds them into the base weights and removes
the adapter layers, giving a plain `HARTTransformer` state dict again. `base_model_kl` compares a
model with its adapters on and off (prior distillation).
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Iterator, List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer

from hart.text import TextConditioning
from hart.training.objective import LossOutput, drop_conditions

LORA_GROUPS = {
    "attention": r"blocks\.\d+\.attn\.(qkv_proj|proj)",
    "mlp": r"blocks\.\d+\.ffn\.(gate_proj|up_proj|down_proj)",
    "modulation": r"(blocks\.\d+|head_nm)\.ada_lin\.\d+",
    "context": r"context_embed",
    "head": r"head",
    "diffusion": r"diffusion_head\.net\..*",
}


def lora_target_names(model: nn.Module, groups: Sequence[str]) -> List[str]:
    """Full names of the linear layers of `groups` (names of `LORA_GROUPS`)."""
    unknown = [g for g in groups if g not in LORA_GROUPS]
    if unknown or not groups:
        raise ValueError(f"unknown LoRA target group(s) {unknown or list(groups)}; expected some of {', '.join(LORA_GROUPS)}")
    pattern = re.compile("|".join(LORA_GROUPS[g] for g in groups))
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and pattern.fullmatch(n)]


def add_lora(model: nn.Module, rank: int, alpha: float, groups: Sequence[str]) -> List[str]:
    """Freeze `model` and add rank-`rank` adapters in place; returns the adapted layer names.

    The adapters' random initialisation uses the global torch generator: seed it (or wrap the call
    in `torch.random.fork_rng`) for a reproducible start.
    """
    targets = lora_target_names(model, groups)
    if not targets:
        raise ValueError("no linear layer of the model matches the LoRA targets")
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0)
    model.requires_grad_(False)
    inject_adapter_in_model(config, model)  # leaves only the adapter weights trainable
    return targets


@contextmanager
def adapters_off(model: nn.Module) -> Iterator[nn.Module]:
    """`model` computing as its base model inside the block: every adapter bypassed. Only peft's flag
    is switched (not `enable_adapters`, which also flips `requires_grad` and would break the step's
    graph built before)."""
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield model
    finally:
        for layer in layers:
            layer._disable_adapters = False


def lora_state_dict(model: nn.Module) -> dict:
    """The adapter weights alone (for saving beside an export)."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if ".lora_" in n}


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base layer and put the base layer back in place."""
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())
    return model


def unused_adapters(model: nn.Module) -> List[str]:
    """Adapter weights that received no gradient in the last backward pass."""
    return [n for n, p in model.named_parameters() if ".lora_" in n and p.requires_grad and p.grad is None]


def base_model_kl(
    transformer: nn.Module, cond: TextConditioning, x_BLCv_wo_first_l: torch.Tensor, out: LossOutput,
    rows_B: torch.Tensor,
) -> torch.Tensor:
    """Prior distillation: KL(base || tuned) of the token predictions, summed over the vocabulary and
    averaged over the tokens of each row, for the rows `rows_B` (0 for the others), `(B,)`.

    `out` is `hart_loss`'s output for the same batch; the base model (`transformer` with its LoRA
    adapters off) reads the same inputs: the same dropped conditions and kept last-scale tokens.
    Gradients flow through the tuned logits only.
    """
    kl_B = out.logits_BLV.new_zeros(out.logits_BLV.shape[0])
    if not bool(rows_B.any()):
        return kl_B
    c = drop_conditions(cond, out.drop_B)
    with torch.no_grad(), adapters_off(transformer):
        base_BLV, _ = transformer(c.features_BTC[rows_B], c.mask_BT[rows_B], c.position_ids_BT[rows_B],
                                  x_BLCv_wo_first_l[rows_B], out.keep_idx_BK[rows_B])
    kl_BLV = F.kl_div(out.logits_BLV[rows_B].log_softmax(-1), base_BLV.float().log_softmax(-1), log_target=True,
                      reduction="none")
    return kl_B.index_put((rows_B.nonzero()[:, 0],), kl_BLV.sum(-1).mean(-1))
