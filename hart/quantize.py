"""int8 weights for the transformer blocks, for CPUs without native bf16 (`hart.device`).

Each block's attention and SwiGLU projections become int8 x int8 GEMMs through torchao: weights
quantized once per output channel (symmetric), activations quantized per token at run time
(symmetric, dynamic). The weights take a quarter of fp32's bytes. Speed in eager mode, 0.7B sizes,
2592 tokens, two AVX512-VNNI EPYC cores (`scripts/speed_parts.py int8`, medians of two runs of five
interleaved calls on a shared machine): 0.85-1.6x fp32 depending on the projection, where bf16 gives
2.2-2.8x on the same CPU. Quantizing the activations is separate memory-bound work in eager mode,
which torch.compile can fuse into the GEMM's neighbours.

The AdaLN modulation weights (a third of the 0.7B model's parameters, 0.9 GB in fp32) go to bf16 instead:
they run once per call on the pooled text, a GEMM of two rows that reading the weights bounds, as fast
in bf16 as in fp32 on a CPU without native bf16; int8 there would be 4-6x slower (torchao, eager), and
their gates scale every residual branch. On the fixture the logits' relative error goes from 0.020 to
0.021 with them in bf16. Left in float on purpose: the context and word embeddings (one pass each), the
logits head (its errors land straight on the sampling distribution) and the residual diffusion head
(small, and its output is the continuous detail of the image).
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

INSTALL_HINT = "pip install 'hart[int8]'  (installs torchao)"


def _torchao_int8():
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError as e:
        raise ImportError(f"int8 weights need torchao: {INSTALL_HINT}") from e
    return quantize_, Int8DynamicActivationInt8WeightConfig


def quantizable_linears(transformer: nn.Module) -> list[str]:
    """Names of the Linear layers that int8 replaces: every block's attention and SwiGLU projections."""
    names = []
    for name, module in transformer.named_modules():
        if isinstance(module, nn.Linear) and name.startswith("blocks.") and (".attn." in name or ".ffn." in name):
            names.append(name)
    return names


def quantize_transformer_int8(transformer: nn.Module) -> nn.Module:
    """Swap the block projections of a HARTTransformer for int8 ones and its AdaLN modulation weights for
    bf16 ones, in place; returns it.

    Irreversible (the float weights are dropped); quantize after loading and after any LoRA merge,
    and only for inference. Projections already in int8 are left as they are, so a second call changes
    nothing. Raises if the model is training or has no block projections.
    """
    if transformer.training:
        raise ValueError("int8 weights are for inference: call transformer.eval() first")
    names = set(quantizable_linears(transformer))
    if not names:
        raise ValueError("no block projections to quantize: is this a HARTTransformer?")
    modules = dict(transformer.named_modules())
    # torchao swaps a quantized weight for its own tensor subclass; quantizing that again fails inside torchao
    names = {n for n in names if type(modules[n].weight) is nn.Parameter}
    if not names:
        return transformer
    quantize_, Int8Config = _torchao_int8()
    # Compiling the quantized blocks warns, once, that torchao's weight tensors don't hash for AOT
    # autograd's on-disk cache (compilation works; only that cache is skipped): advice for torchao.
    warnings.filterwarnings("ignore", "Int8Tensor does not implement _stable_hash_for_caching", UserWarning)
    quantize_(transformer, Int8Config(), filter_fn=lambda module, fqn: fqn in names and modules[fqn] is module)
    for block in transformer.blocks:
        block.ada_lin.to(torch.bfloat16)
    return transformer
