"""A resumable, epoch-seeded sampler (single process and distributed)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """Yields dataset indices in an order fixed by (seed, epoch); can start part-way through an epoch.

    With `num_replicas > 1` each rank takes a strided share of the (padded) permutation, as
    torch's DistributedSampler does; padding repeats indices from the start of the permutation
    (cycling through it when there are fewer samples than replicas), so every rank gets the same
    number of indices: `ceil(num_samples / num_replicas)`. Evaluation drops the repeats by clip
    index (avs.metrics.MetricAccumulator); `pad=False` gives unequal shards without repeats.

    `with_epoch=True` yields `(epoch, index)` pairs instead of indices: the dataset then reads the
    epoch that seeds its augmentation from the index itself, which keeps the draws right in
    persistent DataLoader workers (their copy of the dataset never sees `set_epoch`).
    """

    def __init__(
        self,
        num_samples: int,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        pad: bool = True,
        with_epoch: bool = False,
    ) -> None:
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} must lie in [0, num_replicas={num_replicas})")
        self.n = num_samples
        self.shuffle = shuffle
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.pad = pad
        self.with_epoch = with_epoch
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's order and skip its first `start` samples of this rank."""
        self.epoch = epoch
        self.start = start

    def _order(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        if self.num_replicas > 1:
            if self.pad and self.n > 0:
                total = math.ceil(self.n / self.num_replicas) * self.num_replicas
                order = (order * math.ceil(total / self.n))[:total]
            order = order[self.rank :: self.num_replicas]
        return order

    def __iter__(self) -> Iterator[int] | Iterator[tuple[int, int]]:
        order = self._order()[self.start :]
        if self.with_epoch:
            return iter([(self.epoch, i) for i in order])
        return iter(order)

    def __len__(self) -> int:
        return max(0, len(self._order()) - self.start)
