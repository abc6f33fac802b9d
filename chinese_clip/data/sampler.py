"""Which samples each rank reads at each step, independent of the number of ranks.

Step s of an epoch reads the global batch perm[s*B : (s+1)*B] of a per-epoch permutation
seeded by (seed, epoch); rank r takes rows [r*b, (r+1)*b) of it. One process with batch B and W
processes with batch b = B/W therefore see the same global batches in the same row order, which
is what makes a distributed run reproduce a single-process run step for step, and a resumed run
continue from its step exactly.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class GlobalBatchSampler(Sampler[list[int]]):
    def __init__(self, dataset_size: int, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, start_step: int = 0):
        self.global_batch = batch_size * world_size
        if dataset_size < self.global_batch:
            raise ValueError(f"dataset has {dataset_size} samples, fewer than one global batch of {self.global_batch}")
        self.dataset_size, self.batch_size = dataset_size, batch_size
        self.rank, self.seed, self.start_step = rank, seed, start_step
        self.steps_per_epoch = dataset_size // self.global_batch  # the ragged tail is dropped each epoch

    def _epoch_permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.dataset_size, generator=generator)

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while True:
            epoch, in_epoch = divmod(step, self.steps_per_epoch)
            perm = self._epoch_permutation(epoch)
            for s in range(in_epoch, self.steps_per_epoch):
                start = s * self.global_batch + self.rank * self.batch_size
                yield perm[start:start + self.batch_size].tolist()
            step = (epoch + 1) * self.steps_per_epoch
