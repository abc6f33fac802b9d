"""Which samples each rank reads at each step, independent of the number of ranks.

The data is one endless stream: epoch e is a permutation of the dataset seeded by (seed, e), and
the epochs follow each other. A global batch of B samples is the next B samples of the stream;
rank r takes rows [r*b, (r+1)*b) of it. One process with batch B and W processes with batch
b = B/W therefore see the same global batches in the same row order, which is what makes a
distributed run reproduce a single-process run step for step. The position in the stream is a
sample count, so a stage can change the batch size and a resumed run continues from the exact
sample it stopped at.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class GlobalBatchSampler(Sampler[list[int]]):
    def __init__(self, dataset_size: int, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, start_sample: int = 0):
        self.global_batch = batch_size * world_size
        if dataset_size < self.global_batch:
            raise ValueError(f"dataset has {dataset_size} samples, fewer than one global batch of {self.global_batch}")
        self.dataset_size, self.batch_size = dataset_size, batch_size
        self.rank, self.seed, self.start_sample = rank, seed, start_sample
        self._permutations: dict[int, torch.Tensor] = {}

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._permutations:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._permutations = {e: p for e, p in self._permutations.items() if e == epoch - 1}
            self._permutations[epoch] = torch.randperm(self.dataset_size, generator=generator)
        return self._permutations[epoch]

    def _stream(self, start: int, count: int) -> list[int]:
        """Samples [start, start + count) of the stream; a batch may run across an epoch boundary."""
        out: list[int] = []
        while count:
            epoch, offset = divmod(start, self.dataset_size)
            taken = self._permutation(epoch)[offset:offset + count].tolist()
            out += taken
            start, count = start + len(taken), count - len(taken)
        return out

    def __iter__(self) -> Iterator[list[int]]:
        position = self.start_sample
        while True:
            yield self._stream(position + self.rank * self.batch_size, self.batch_size)
            position += self.global_batch
