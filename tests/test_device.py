"""`--dtype auto`: bf16 exactly where the device multiplies bf16 natively."""
import pytest
import torch

from hart.device import auto_dtype, cpu_capabilities, native_bf16_feature, resolve_dtype

NO_BF16 = {"avx2": True, "avx512_f": True, "avx512_bf16": False, "amx_bf16": False}


@pytest.mark.parametrize("caps, name, feature", [
    (NO_BF16, "fp32", None),
    (dict(NO_BF16, avx512_bf16=True), "bf16", "AVX512-BF16"),
    (dict(NO_BF16, avx512_bf16=True, amx_bf16=True), "bf16", "AMX-BF16"),
    ({"architecture": "aarch64", "neon": True, "bf16": True}, "bf16", "ARM BF16"),
    ({"architecture": "aarch64", "neon": True, "bf16": False}, "fp32", None),
])
def test_auto_dtype_follows_native_bf16(caps, name, feature):
    choice = auto_dtype("cpu", caps)
    assert choice.name == name and choice.dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
    assert native_bf16_feature(caps) == feature
    assert (feature or "no native bf16") in choice.reason


def test_auto_dtype_on_this_cpu_matches_its_flags():
    caps = cpu_capabilities()
    native = bool(caps.get("amx_bf16") or caps.get("avx512_bf16") or caps.get("sve_bf16") or caps.get("bf16"))
    assert auto_dtype("cpu").dtype == (torch.bfloat16 if native else torch.float32)


def test_cuda_is_bf16_and_explicit_names_pass_through():
    assert auto_dtype("cuda").name == "bf16"
    assert resolve_dtype("fp32", "cpu").dtype == torch.float32
    assert resolve_dtype("bf16", "cpu").dtype == torch.bfloat16
    assert resolve_dtype("auto", "cuda").dtype == torch.bfloat16


def test_bad_dtype_names_fail_clearly():
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        resolve_dtype("float8")
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        resolve_dtype("fp16", "cpu")
