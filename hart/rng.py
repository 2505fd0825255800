"""Random draws driven by the caller's generator(s).

Every stochastic step of HART (token sampling, gumbel noise, orders, diffusion noise, condition
dropout) goes through these helpers, so one `torch.Generator`, or a list with one generator per
image, decides everything and nothing reads global RNG state.

A list draws image by image what a batch of one would draw with that image's generator, so an
image generated in a batch with its own generator equals the same image generated alone.
Draws happen on the generator's device and are then moved to `device`, so a CPU generator drives a
CUDA model.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch

Generator = Optional[Union[torch.Generator, Sequence[torch.Generator]]]


def check_generator(generator: Generator, batch_size: int) -> None:
    """Raise a clear error when a generator list does not have one generator per image."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch_size:
            raise ValueError(
                f"`generator` is a list of {len(generator)} generators but {batch_size} images are "
                "generated: pass one generator per image, or a single generator."
            )
        if not all(isinstance(g, torch.Generator) for g in generator):
            raise TypeError("`generator` list must contain only torch.Generator objects.")
    elif generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"`generator` must be a torch.Generator or a list of them, got {type(generator).__name__}.")


def _gen_device(generator: Optional[torch.Generator], fallback: torch.device) -> torch.device:
    return generator.device if generator is not None else fallback


def _per_image(
    draw: Callable[[Optional[torch.Generator], int], torch.Tensor],
    generator: Generator,
    batch_size: int,
    batch_dim: int,
) -> torch.Tensor:
    if isinstance(generator, (list, tuple)):
        check_generator(generator, batch_size)
        return torch.cat([draw(g, 1) for g in generator], dim=batch_dim)
    return draw(generator, batch_size)


def randn(shape: Sequence[int], generator: Generator, device, dtype=torch.float32, batch_dim: int = 0) -> torch.Tensor:
    """Standard normal noise of `shape`; `shape[batch_dim]` counts images."""
    device = torch.device(device)

    def draw(g, n):
        s = list(shape)
        s[batch_dim] = n
        return torch.randn(s, generator=g, device=_gen_device(g, device), dtype=torch.float32).to(device, dtype)

    return _per_image(draw, generator, shape[batch_dim], batch_dim)


def rand(shape: Sequence[int], generator: Generator, device, batch_dim: int = 0) -> torch.Tensor:
    """Uniform [0, 1) draws (float32) of `shape`; `shape[batch_dim]` counts images."""
    device = torch.device(device)

    def draw(g, n):
        s = list(shape)
        s[batch_dim] = n
        return torch.rand(s, generator=g, device=_gen_device(g, device)).to(device)

    return _per_image(draw, generator, shape[batch_dim], batch_dim)


def exponential(shape: Sequence[int], generator: Generator, device) -> torch.Tensor:
    """Exp(1) draws of `shape` (float32), images along dim 0; `-log` of them is gumbel noise."""
    device = torch.device(device)

    def draw(g, n):
        return torch.empty((n, *shape[1:]), device=_gen_device(g, device)).exponential_(generator=g).to(device)

    return _per_image(draw, generator, shape[0], 0)


def multinomial(probs_BlV: torch.Tensor, generator: Generator) -> torch.Tensor:
    """One draw per token from `probs_BlV` (B, l, V), returned as indices (B, l)."""
    B, l, V = probs_BlV.shape

    def draw(g, n, rows=None):
        p = probs_BlV if rows is None else probs_BlV[rows]
        p = p.reshape(-1, V).to(_gen_device(g, probs_BlV.device))
        idx = torch.multinomial(p, num_samples=1, replacement=True, generator=g)
        return idx.view(n, l).to(probs_BlV.device)

    if isinstance(generator, (list, tuple)):
        check_generator(generator, B)
        return torch.cat([draw(g, 1, slice(i, i + 1)) for i, g in enumerate(generator)], dim=0)
    return draw(generator, B)


def permutation(batch_size: int, n: int, generator: Generator, device) -> torch.Tensor:
    """An independent random permutation of `range(n)` per image, shape (B, n)."""
    return rand((batch_size, n), generator, device).argsort(dim=1)
