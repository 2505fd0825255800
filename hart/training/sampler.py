"""Which samples each rank sees, epoch after epoch, resumable at any micro-batch.

Every epoch is a permutation of the dataset drawn from `(seed, epoch)`. It is cut into global
micro-batches of `batch_size * world_size` samples (an incomplete tail is left out of that epoch);
rank `r` takes slice `r` of each. The position in the stream is one integer, the number of
micro-batches a rank has consumed, so a checkpoint resumes the data exactly where it stopped.
Keys are `(epoch, index)` pairs: datasets derive their per-item randomness from them.
"""
from __future__ import annotations

from typing import Iterator, List, Tuple

import torch

from hart.training.data import DataError


def check_enough_samples(num_samples: int, batch_size: int, world_size: int = 1) -> None:
    """Refuse a data set smaller than one global micro-batch (no step could ever be made)."""
    if num_samples < batch_size * world_size:
        raise DataError(
            f"{num_samples} usable samples are fewer than one global micro-batch "
            f"({batch_size} per process x {world_size} processes = {batch_size * world_size}): lower --batch_size "
            "or add images"
        )


class ResumableBatchSampler(torch.utils.data.Sampler):
    """An endless stream of this rank's micro-batches of `(epoch, index)` keys."""

    def __init__(self, num_samples: int, batch_size: int, *, world_size: int = 1, rank: int = 0, seed: int = 0,
                 start: int = 0):
        check_enough_samples(num_samples, batch_size, world_size)
        self.num_samples, self.batch_size, self.world_size, self.rank = num_samples, batch_size, world_size, rank
        self.seed, self.start = seed, start
        self.batches_per_epoch = num_samples // (batch_size * world_size)

    def epoch_order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.num_samples, generator=g)

    def position(self, consumed: int) -> Tuple[int, int]:
        """(epoch, micro-batch within the epoch) after `consumed` micro-batches."""
        return divmod(consumed, self.batches_per_epoch)

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        epoch, batch = self.position(self.start)
        while True:
            order = self.epoch_order(epoch)
            for b in range(batch, self.batches_per_epoch):
                lo = (b * self.world_size + self.rank) * self.batch_size
                yield [(epoch, int(i)) for i in order[lo:lo + self.batch_size]]
            epoch, batch = epoch + 1, 0
