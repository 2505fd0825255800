"""Which weights dtype a device runs fastest: the `--dtype auto` choice.

bf16 halves the bytes every GEMM reads, but on a CPU it only pays where the CPU multiplies bf16
natively: AMX tiles (Intel Sapphire Rapids and later) or AVX512-BF16 dot products (Intel Cooper
Lake, AMD Zen 4 and later), or the BF16 extension on ARM. Elsewhere oneDNN converts bf16 to fp32 on
the fly and bf16 runs slower than fp32, so fp32 is the only sensible choice there (and int8 weights,
`hart.quantize`, are the way to go faster). CUDA devices all run bf16 (Ampere and later natively).
"""
from __future__ import annotations

from typing import Mapping, NamedTuple, Union

import torch

# `get_capabilities` keys that mean native bf16 arithmetic, strongest first.
_NATIVE_BF16 = (
    ("amx_bf16", "AMX-BF16"),
    ("avx512_bf16", "AVX512-BF16"),
    ("sve_bf16", "SVE-BF16"),
    ("bf16", "ARM BF16"),
)
DTYPE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class DtypeChoice(NamedTuple):
    name: str  # "fp32" | "bf16" | "fp16"
    dtype: torch.dtype
    reason: str  # one line saying why, for the CLI, the app and the benchmark record


def cpu_capabilities() -> Mapping[str, object]:
    """The CPU's instruction-set flags as torch detected them (cpuinfo)."""
    if hasattr(torch.cpu, "get_capabilities"):
        return torch.cpu.get_capabilities()
    # torch < 2.8 only exposes the two x86 probes that matter here.
    return {
        "amx_bf16": torch.cpu._is_amx_tile_supported(),
        "avx512_bf16": torch.cpu._is_avx512_bf16_supported(),
    }


def native_bf16_feature(capabilities: Mapping[str, object] = None) -> Union[str, None]:
    """The name of the CPU feature that multiplies bf16 natively ("AMX-BF16", ...), or None."""
    caps = cpu_capabilities() if capabilities is None else capabilities
    for key, name in _NATIVE_BF16:
        if caps.get(key):
            return name
    return None


def auto_dtype(device: Union[str, torch.device] = "cpu", capabilities: Mapping[str, object] = None) -> DtypeChoice:
    """bf16 on CUDA and on CPUs with native bf16, fp32 on the others; with the reason."""
    device = torch.device(device)
    if device.type == "cuda":
        return DtypeChoice("bf16", torch.bfloat16, f"bf16: {device.type} device")
    if device.type != "cpu":
        return DtypeChoice("fp32", torch.float32, f"fp32: no bf16 rule for {device.type} devices")
    feature = native_bf16_feature(capabilities)
    if feature is not None:
        return DtypeChoice("bf16", torch.bfloat16, f"bf16: the CPU has {feature}")
    return DtypeChoice("fp32", torch.float32, "fp32: the CPU has no native bf16 (neither AMX nor AVX512-BF16)")


def head_and_decoder_dtype(weights_dtype: torch.dtype, device: Union[str, torch.device] = "cpu",
                           capabilities: Mapping[str, object] = None) -> torch.dtype:
    """The dtype to run the residual diffusion head and the tokenizer's decoder in, for a run whose weights
    are `weights_dtype`: bf16 for fp32 weights where the device multiplies bf16 natively (`auto_dtype`),
    else the weights' own. It changes the image only by float rounding (exact's option set, hart benchmark)."""
    if weights_dtype == torch.float32 and auto_dtype(device, capabilities).dtype == torch.bfloat16:
        return torch.bfloat16
    return weights_dtype


def resolve_dtype(name: str, device: Union[str, torch.device] = "cpu") -> DtypeChoice:
    """A `--dtype` value ("auto", "fp32", "bf16", "fp16") as the dtype to load the weights in."""
    if name == "auto":
        return auto_dtype(device)
    if name not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}: choose one of auto, {', '.join(DTYPE_NAMES)}")
    if name == "fp16" and torch.device(device).type != "cuda":
        raise ValueError(f"dtype fp16 needs a CUDA device (device is {torch.device(device).type}); use fp32 or bf16")
    return DtypeChoice(name, DTYPE_NAMES[name], f"{name}: asked for")


class CompilerMissing(RuntimeError):
    """torch.compile cannot build kernels for the device (`check_compile_support`)."""


def check_compile_support(device: Union[str, torch.device] = "cpu") -> None:
    """Raise CompilerMissing, naming what is missing, where torch.compile cannot build kernels for `device`:
    on a CPU, inductor compiles C++ and needs a compiler (it would otherwise fail at the first call)."""
    if torch.device(device).type != "cpu":
        return
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:  # moved in a later torch: let the first call report it
        return
    try:
        get_cpp_compiler()
    except Exception as e:  # inductor's InvalidCxxCompiler, or its own lookup failing
        raise CompilerMissing(f"compiling for the CPU needs a C++ compiler (g++ or clang++, or set CXX): {e}") from None
