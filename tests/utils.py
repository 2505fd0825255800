"""Test helpers: the reference fixture folder, recorded calls and a tolerance check."""
import contextlib
import json
import os
import socket
from pathlib import Path
from typing import NamedTuple, Optional, Tuple

import torch
from safetensors.torch import load_file

REPO_ROOT = Path(__file__).resolve().parents[1]


DEFAULT_FIXTURES = REPO_ROOT / "tests" / "fixtures" / "official-tiny"


def fixture_root() -> Path:
    """The recorded fixture set: `$HART_FIXTURES`, else the one in the repository."""
    root = Path(os.environ.get("HART_FIXTURES", DEFAULT_FIXTURES))
    if not (root / "manifest.json").is_file():
        raise FileNotFoundError(
            f"No recorded fixture set at {root} (no manifest.json): point HART_FIXTURES at a folder "
            f"laid out like {DEFAULT_FIXTURES.relative_to(REPO_ROOT)}."
        )
    return root


class FixtureSizes(NamedTuple):
    """The sizes of a fixture set, read from its checkpoint's own config files."""

    image_size: int  # pixels per side of a generated image
    patch_nums: Tuple[int, ...]  # scale sides, coarse to fine
    vocab_size: int  # image codebook
    latent_channels: int
    downsample: int  # pixels per latent position
    context_tokens: int  # text tokens the transformer reads
    context_dim: int  # text feature width
    padding_side: str  # where the text tokenizer pads ("left" or "right")

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)


def fixture_sizes(root: Optional[Path] = None) -> FixtureSizes:
    """Sizes of the fixture set at `root` (default: `fixture_root()`), for tests that build inputs."""
    ckpt = (root or fixture_root()) / "ckpt"
    llm = json.loads((ckpt / "llm" / "config.json").read_text())
    vae = json.loads((ckpt / "tokenizer" / "config.json").read_text())
    text = json.loads((ckpt / "text_encoder" / "tokenizer_config.json").read_text())
    downsample = 2 ** (len(vae["ch_mult"]) - 1)
    return FixtureSizes(
        image_size=llm["patch_nums"][-1] * downsample, patch_nums=tuple(llm["patch_nums"]),
        vocab_size=vae["vocab_size"], latent_channels=vae["z_channels"], downsample=downsample,
        context_tokens=llm["context_token"], context_dim=llm["context_dim"],
        padding_side=text.get("padding_side", "right"),  # transformers' default when unnamed
    )


class Recorded:
    """One recorded call: `X.safetensors` tensors plus the `X.json` description beside it."""

    def __init__(self, root: Path, name: str):
        self.tensors = load_file(str(root / f"{name}.safetensors"))
        self.meta = json.loads((root / f"{name}.json").read_text())

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def __contains__(self, key: str) -> bool:
        return key in self.tensors


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, name: str = "") -> None:
    """Max-abs comparison with a message that names the tensor and the difference."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    assert tuple(actual.shape) == tuple(expected.shape), f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual.double().cpu() - expected.double().cpu()).abs().max().item() if actual.numel() else 0.0
    assert diff <= atol, f"{name}: max abs difference {diff:.3g} > {atol:g}"


def free_port() -> int:
    """A TCP port nothing listens on now (for servers and `accelerate launch --main_process_port`)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def strict_recompiles(limit: int):
    """A fresh Dynamo under which a compiled module that recompiles more than `limit` times raises instead of
    silently falling back to eager. Dynamo's own patching: pytest's monkeypatch deletes these settings when it
    undoes them; torch < 2.7 names them cache_size_limit and fail_on_cache_limit_hit. Reset on both sides,
    since Dynamo counts the recompiles of a code object (a block's forward) across models."""
    import torch._dynamo

    if hasattr(torch._dynamo.config, "recompile_limit"):
        strict = torch._dynamo.config.patch(recompile_limit=limit, fail_on_recompile_limit_hit=True)
    else:
        strict = torch._dynamo.config.patch(cache_size_limit=limit, fail_on_cache_limit_hit=True)
    torch._dynamo.reset()
    try:
        with strict:
            yield
    finally:
        torch._dynamo.reset()
