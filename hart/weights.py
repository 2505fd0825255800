"""Reading weights files and filling models from them, cast while reading (no module of `hart.models` imported).

Every failure is a `CheckpointError` saying what is wrong with which file. Weights are cast while
loading: a model is built empty (parameters on `meta`) and each tensor is read and cast to the requested
dtype one at a time, so loading in bf16 never holds the whole checkpoint in fp32 (safetensors files are
read tensor by tensor with `pread`; a torch pickle is memory-mapped, and on Linux each tensor's pages
are handed back to the kernel once it is cast). `HARTTransformer` and `HybridTokenizer.from_pretrained` load a local
diffusers-format folder the same way (`load_model_folder`).
"""
from __future__ import annotations

import ctypes
import json
import mmap
import re
import sys
import zipfile
from pathlib import Path
from typing import Dict, Iterable, Mapping, Optional, Type, Union

import torch
import torch.nn as nn
from safetensors import safe_open

PathLike = Union[str, Path]
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint file or folder that cannot be loaded as asked."""


def _cast(t: torch.Tensor, dtype: Optional[torch.dtype], mapped: bool = False) -> torch.Tensor:
    """`t` in `dtype` if it is floating-point; `mapped`: `t` lies in a memory-mapped file, so it is
    copied out (a model must not depend on a file that may be rewritten) and the pages read are
    dropped from this process's memory."""
    cast = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    if mapped and cast is t:
        cast = t.clone()
    if mapped and sys.platform.startswith("linux"):
        # Mapped file pages stay resident (and count) until the whole file is unmapped: a 0.7B
        # model's pickle would add its 2.9 GB fp32 to the bf16 copy. MADV_DONTNEED drops the clean
        # pages of a private file mapping; read again, they would come back from the file.
        storage = t.untyped_storage()
        start = -(-storage.data_ptr() // mmap.PAGESIZE) * mmap.PAGESIZE
        end = (storage.data_ptr() + storage.nbytes()) // mmap.PAGESIZE * mmap.PAGESIZE
        if end > start:
            ctypes.CDLL(None).madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.MADV_DONTNEED)
    return cast


def read_weights(path: PathLike, dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
    """Tensors of a `.safetensors` or torch pickle (`.bin`/`.pt`/`.pth`) file, on CPU; floating-point
    ones cast to `dtype` (None: as stored) one at a time while reading."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    # a pickle is mapped, so that its tensors are read one at a time as they are cast (zip pickles only)
    mapped = path.suffix != ".safetensors" and zipfile.is_zipfile(path)
    try:
        if path.suffix == ".safetensors":
            # pread, not mmap: a mapped file's pages stay resident (and count) until it is closed
            with safe_open(str(path), "pt", backend="pread") as f:
                sd = {k: _cast(f.get_tensor(k), dtype) for k in f.keys()}
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=mapped)
    except Exception as e:  # safetensors, pickle and zip readers each raise their own types
        if "Weights only load failed" in str(e):  # torch's weights_only unpickler met code, not tensors
            raise CheckpointError(
                f"refused to load weights file {path}: the pickle holds objects other than tensors, which "
                "could run code (only safetensors and weights_only pickles are loaded); convert it to "
                ".safetensors from a trusted source") from e
        raise CheckpointError(f"cannot read weights file {path} (truncated or corrupt?): {e}") from e
    if isinstance(sd, Mapping):
        for wrapper in ("state_dict", "model"):
            if isinstance(sd.get(wrapper), Mapping):
                sd = sd[wrapper]
                break
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"weights file {path} does not hold a flat name -> tensor state dict")
    return {k: _cast(v, dtype, mapped) for k, v in sd.items()}


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _listing(title: str, items: list, limit: int = 10) -> str:
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"{len(items)} {title}: " + ", ".join(items[:limit]) + more


def fit_problems(expected: Mapping[str, tuple], found: Mapping[str, tuple], tolerated: Iterable[str] = ()) -> str:
    """Every missing, extra or misshaped key of `found` (key -> shape) against `expected`, in one
    line ("" when they fit). Keys matching one of the `tolerated` regexes may be extra."""
    patterns = [re.compile(t) for t in tolerated]
    found = {k: v for k, v in found.items() if k in expected or not any(p.fullmatch(k) for p in patterns)}
    missing = sorted(k for k in expected if k not in found)
    unexpected = sorted(k for k in found if k not in expected)
    mismatched = sorted(f"{k} (file {tuple(v)}, model {tuple(expected[k])})"
                        for k, v in found.items() if k in expected and tuple(v) != tuple(expected[k]))
    return "; ".join(_listing(t, ks) for t, ks in (("missing keys", missing), ("unexpected keys", unexpected),
                                                   ("shape mismatches", mismatched)) if ks)


def load_checked(module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: PathLike,
                 tolerated: Iterable[str] = ()) -> None:
    """Strictly load `state_dict` into `module`, explaining every missing, extra or misshaped key; keys
    matching one of the `tolerated` regexes (full match) may be in the file, and are dropped. A module
    built empty (`empty_model`) takes the tensors themselves, in their dtype."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    problems = fit_problems(expected, {k: tuple(v.shape) for k, v in state_dict.items()}, tolerated)
    if problems:
        raise CheckpointError(f"checkpoint {source} does not fit {type(module).__name__}: {problems}")
    empty = any(p.is_meta for p in module.parameters())
    module.load_state_dict({k: v for k, v in state_dict.items() if k in expected}, strict=True, assign=empty)


def empty_model(build):
    """`build()` with its parameters on `meta`: no memory, no initialisation (buffers are real)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        return build()


# diffusers' own `from_pretrained` handles everything but a plain local folder (hub names, variants,
# device maps, quantization, sharded or non-safetensors weights).
_DIFFUSERS_ONLY_KWARGS = ("subfolder", "variant", "device_map", "max_memory", "offload_folder", "quantization_config",
                          "dduf_entries", "use_flashpack", "revision", "output_loading_info")


def load_model_folder(cls: Type[nn.Module], path: PathLike, kwargs: Mapping) -> Optional[nn.Module]:
    """`cls.from_pretrained(path, **kwargs)` for a local diffusers-format folder (`config.json` +
    `diffusion_pytorch_model.safetensors`): built empty, each tensor read in `kwargs["torch_dtype"]`
    (diffusers' pipelines pass it as `dtype`; neither: torch's default dtype, as diffusers loads). None
    where diffusers' own loading is needed instead."""
    folder = Path(path) if isinstance(path, (str, Path)) else None
    if folder is None or not (folder / DIFFUSERS_WEIGHTS).is_file() or not (folder / "config.json").is_file() \
            or any(kwargs.get(k) for k in _DIFFUSERS_ONLY_KWARGS) or kwargs.get("use_safetensors") is False:
        return None
    model = empty_model(lambda: cls.from_config(read_config(folder)))
    dtype = kwargs.get("torch_dtype") or kwargs.get("dtype") or torch.get_default_dtype()
    load_checked(model, read_weights(folder / DIFFUSERS_WEIGHTS, dtype), folder / DIFFUSERS_WEIGHTS)
    model.register_to_config(_name_or_path=path)  # as diffusers records it
    return model.eval()


def read_config(folder: Path, name: str = "config.json") -> dict:
    path = folder / name
    if not path.is_file():
        raise CheckpointError(f"no {name} in {folder}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return config
