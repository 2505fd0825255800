"""The runs of one `hart benchmark`: their options (`--compare`: plain, exact, fast) and models."""
from __future__ import annotations

import copy
import importlib.util
from typing import List

import torch

from hart.device import auto_dtype, head_and_decoder_dtype
from hart.pruning import DEFAULT_KEEP
from hart.quantize import quantize_transformer_int8


def run_options(compare: bool, *, dtype: str, device: torch.device, compile_model: bool, int8: bool, prune: float,
                compact_text: bool, bf16_cache: bool = False) -> List[tuple]:
    """(name, options) of the runs: plain, exact and fast with `compare`, else the options given.

    `bf16_head_decoder`: the diffusion head and the decoder in bf16 inside an fp32 run, where the device
    multiplies bf16 natively (`hart.device.head_and_decoder_dtype`): part of exact (float rounding only).
    `bf16_cache`: the KV and pruning caches stored in bf16 (`SamplingOptions.bf16_cache`), a memory option:
    off in plain, exact and fast.
    """
    options = dict(compact_text=compact_text, prune=prune, int8=int8, compile=compile_model, bf16_head_decoder=False,
                   bf16_cache=bf16_cache)
    plain = dict(compact_text=False, prune=1.0, int8=False, compile=False, bf16_head_decoder=False, bf16_cache=False)
    if not compare:
        return [("single", options)]
    bf16_tail = dtype == "fp32" and head_and_decoder_dtype(torch.float32, device) == torch.bfloat16
    exact = dict(plain, compact_text=True, compile=compile_model, bf16_head_decoder=bf16_tail)
    # int8 pays where bf16 does not: CPUs whose auto dtype is fp32 (hart.device), or when asked for
    # (auto only where torchao, the optional `int8` extra, is installed)
    int8_fast = int8 or (device.type == "cpu" and dtype == "fp32" and auto_dtype(device).name == "fp32"
                         and importlib.util.find_spec("torchao") is not None)
    return [("plain", plain), ("exact", exact), ("fast", dict(exact, prune=DEFAULT_KEEP, int8=int8_fast))]


def models_for(pipe, options: dict, made: dict):
    """(transformer, vae) of a run: the pipeline's own, or copies compiled, with int8 block projections or
    with the diffusion head and decoder in bf16 (each changes a model in place), made once per kind."""
    bf16 = options["bf16_head_decoder"]
    key = (options["int8"], options["compile"], bf16)
    if key not in made:
        transformer = pipe.transformer if key == (False, False, False) else copy.deepcopy(pipe.transformer)
        if options["int8"]:
            quantize_transformer_int8(transformer)  # ImportError without torchao
        if bf16:
            transformer.diffusion_head.to(torch.bfloat16)
        if options["compile"]:
            transformer.compile_blocks()
        if ("vae", bf16) not in made:
            made["vae", bf16] = copy.deepcopy(pipe.vae).decoder_to(torch.bfloat16) if bf16 else pipe.vae
        made[key] = transformer, made["vae", bf16]
    return made[key]
