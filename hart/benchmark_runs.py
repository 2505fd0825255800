"""The runs of one `hart benchmark`: their options (`--compare`: plain, exact, fast) and transformers."""
from __future__ import annotations

import copy
import importlib.util
from typing import List

import torch

from hart.device import auto_dtype
from hart.pruning import DEFAULT_KEEP
from hart.quantize import quantize_transformer_int8


def run_options(compare: bool, *, dtype: str, device: torch.device, compile_model: bool, int8: bool, prune: float,
                compact_text: bool) -> List[tuple]:
    """(name, options) of the runs: plain, exact and fast with `compare`, else the options given."""
    options = dict(compact_text=compact_text, prune=prune, int8=int8, compile=compile_model)
    plain = dict(compact_text=False, prune=1.0, int8=False, compile=False)
    if not compare:
        return [("single", options)]
    exact = dict(plain, compact_text=True, compile=compile_model)
    # int8 pays where bf16 does not: CPUs whose auto dtype is fp32 (hart.device), or when asked for
    # (auto only where torchao, the optional `int8` extra, is installed)
    int8_fast = int8 or (device.type == "cpu" and dtype == "fp32" and auto_dtype(device).name == "fp32"
                         and importlib.util.find_spec("torchao") is not None)
    return [("plain", plain), ("exact", exact), ("fast", dict(exact, prune=DEFAULT_KEEP, int8=int8_fast))]


def transformer_for(pipe, options: dict, made: dict):
    """The transformer of a run: the pipeline's own, or a copy compiled or with int8 block projections
    (both change a model in place), made once per kind."""
    key = (options["int8"], options["compile"])
    if key not in made:
        transformer = pipe.transformer if key == (False, False) else copy.deepcopy(pipe.transformer)
        if options["int8"]:
            quantize_transformer_int8(transformer)  # ImportError without torchao
        if options["compile"]:
            for module in (*transformer.blocks, transformer.diffusion_head.net):
                module.compile(dynamic=True)
        made[key] = transformer
    return made[key]
