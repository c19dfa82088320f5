"""Class-balanced sampling of training patches, reproducible per epoch."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Sampler


def balanced_weights(labels: Sequence[int]) -> np.ndarray:
    """Per-sample weights 1 / (size of the sample's class): every class is drawn equally often."""
    labels = np.asarray(labels)
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    return 1.0 / counts[inverse]


class EpochSampler(Sampler[int]):
    """Training indices for one epoch, a function of (seed, epoch) only, sharded over DDP ranks.

    ``balanced``: drawn with replacement with probability proportional to ``balanced_weights`` (what
    ``WeightedRandomSampler`` does); otherwise a random permutation (what ``DistributedSampler`` does).
    Rank ``r`` of ``world_size`` takes every ``world_size``-th index of the same global draw, so with a
    per-rank batch of B / ``world_size`` the ranks' k-th batches together hold the single-process epoch's
    batch k. ``num_samples`` (default: the dataset size) is the global number of draws per epoch; under
    DDP its last ``num_samples % world_size`` draws are left out, so that every global batch, the last
    one too, splits evenly over the ranks.
    """

    def __init__(self, labels: Sequence[int], balanced: bool = True, num_samples: int | None = None,
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        self.labels = np.asarray(labels)
        self.balanced = balanced
        self.draws = num_samples or len(self.labels)
        self.total = self.draws - self.draws % world_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_indices(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if self.balanced:
            w = torch.as_tensor(balanced_weights(self.labels), dtype=torch.double)
            return torch.multinomial(w, self.draws, replacement=True, generator=g)[: self.total]
        reps = math.ceil(self.draws / len(self.labels))
        return torch.cat([torch.randperm(len(self.labels), generator=g) for _ in range(reps)])[: self.total]

    def __iter__(self):
        return iter(self.global_indices()[self.rank:: self.world_size].tolist())

    def __len__(self) -> int:
        return self.total // self.world_size


def begin_epoch(sampler: EpochSampler, seed: int, epoch: int, rank: int = 0) -> None:
    """Make epoch ``epoch``'s draws and augmentations a function of (seed, epoch, rank) only, so that a
    resumed run sees the same batches as an uninterrupted one (workers take their seeds from torch's RNG)."""
    sampler.set_epoch(epoch)
    torch.manual_seed(seed * 1_000_003 + 7919 * epoch + rank)
