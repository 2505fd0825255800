"""Exponential moving average of the trained parameters (kept in float32).

The decay ramps up as `min(decay, (1 + n) / (10 + n))` after n updates, so short runs already get
a useful average. Under FSDP the average is kept for each process's local shard of the parameters.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterable, Iterator, List, Tuple

import torch


def local_part(t: torch.Tensor) -> torch.Tensor:
    """The process-local part of a (possibly FSDP2-sharded) tensor."""
    return t.to_local() if hasattr(t, "to_local") else t


class EMA:
    def __init__(self, named_params: Iterable[Tuple[str, torch.nn.Parameter]], decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        named = list(named_params)
        self.names: List[str] = [n for n, _ in named]
        self.params: List[torch.nn.Parameter] = [p for _, p in named]
        self.shadow: List[torch.Tensor] = [local_part(p).detach().float().clone() for p in self.params]
        self.decay, self.num_updates = decay, 0

    @torch.no_grad()
    def update(self) -> None:
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        torch._foreach_lerp_(self.shadow, [local_part(p).float() for p in self.params], 1.0 - d)
        self.num_updates += 1

    def state_dict(self) -> Dict[str, torch.Tensor]:
        sd = {n: s.contiguous() for n, s in zip(self.names, self.shadow)}
        sd["__num_updates__"] = torch.tensor(self.num_updates)
        return sd

    def load_state_dict(self, sd: Dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if n not in sd]
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {missing[:3]}")
        for n, s in zip(self.names, self.shadow):
            if sd[n].shape != s.shape:
                raise ValueError(f"EMA state for {n} has shape {tuple(sd[n].shape)}, expected {tuple(s.shape)}")
            s.copy_(sd[n])
        self.num_updates = int(sd["__num_updates__"])

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """Run a block with the averaged weights in the parameters, then put the trained ones back."""
        with torch.no_grad():
            backup = [local_part(p).detach().clone() for p in self.params]
            for p, s in zip(self.params, self.shadow):
                local_part(p).copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup):
                    local_part(p).copy_(b)
