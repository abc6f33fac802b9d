"""Training and evaluation data from a DataConfig."""
from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader

from chinese_clip.config import DataConfig
from chinese_clip.data.collate import ImageTextCollator
from chinese_clip.data.sampler import GlobalBatchSampler
from chinese_clip.data.stream import ShardBatches, ShardSource, ShardStream, start_states, stream_layout
from chinese_clip.data.synthetic import SyntheticShapes
from chinese_clip.runtime import pin_memory, prefetch_factor
from chinese_clip.tokenizer import ChineseTokenizer


def loader_options(cfg: DataConfig) -> dict:
    """The DataLoader settings of the input path: workers, pinned memory, prefetch (runtime's `auto`s)."""
    options = {"num_workers": cfg.num_workers, "pin_memory": pin_memory(cfg)}
    if cfg.num_workers > 0:
        options["prefetch_factor"] = prefetch_factor(cfg)
    return options


def build_collator(cfg: DataConfig, tokenizer: ChineseTokenizer) -> ImageTextCollator:
    return ImageTextCollator(tokenizer, cfg.mean, cfg.std)


class SyntheticBatches:
    """Batches of the synthetic stream; the position is the global sample count (see GlobalBatchSampler)."""

    def __init__(self, loader: DataLoader, start_sample: int, global_batch: int, world_size: int):
        self._batches, self.sample = iter(loader), start_sample
        self.global_batch, self.world_size = global_batch, world_size

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        batch = next(self._batches)
        self.sample += self.global_batch
        return batch

    @property
    def position(self) -> dict:
        return {"sample": self.sample}

    @property
    def counts(self) -> dict[str, int]:
        return {"read": self.sample // self.world_size, "skipped": 0, "filtered": 0}


def build_train_loader(cfg: DataConfig, tokenizer: ChineseTokenizer, image_size: int, *, rank: int,
                       world_size: int, seed: int, batch_size: int | None = None, position: dict | None = None,
                       sources: list[ShardSource] | None = None, skip_log: Path | None = None):
    """An endless iterator of this rank's `batch_size` (default cfg.batch_size) rows of each global
    batch, continuing from `position` (an earlier iterator's, as saved in a checkpoint; None: the
    start). `sources` (from open_sources) for data.source=shards; skipped samples go to `skip_log`."""
    batch_size = batch_size or cfg.batch_size
    collate = build_collator(cfg, tokenizer)
    if cfg.source == "shards":
        layout = stream_layout(sources, cfg, world_size, seed)
        states, next_worker = start_states(position, layout, cfg.reset_position)
        stream = ShardStream(sources, cfg, collate, image_size, batch_size, rank=rank, world_size=world_size,
                             seed=seed, start=states)
        return ShardBatches(stream, loader_options(cfg), layout, skip_log, next_worker)
    start_sample = (position or {}).get("sample", 0)
    dataset = SyntheticShapes("train", cfg.synthetic.train_size, image_size, seed=cfg.synthetic.seed)
    sampler = GlobalBatchSampler(len(dataset), batch_size, rank=rank, world_size=world_size,
                                 seed=seed, start_sample=start_sample)
    # Its own generator: starting to iterate must not draw from the global RNG, whose state a
    # resumed run restores from the checkpoint and must continue exactly as the uninterrupted run.
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, persistent_workers=cfg.num_workers > 0,
                        generator=torch.Generator().manual_seed(seed), **loader_options(cfg))
    return SyntheticBatches(loader, start_sample, batch_size * world_size, world_size)


def build_eval_sets(cfg: DataConfig, image_size: int) -> dict[str, SyntheticShapes]:
    """Held-out images of the trained colour x shape pairs, and of the four never-trained pairs."""
    return {
        "val": SyntheticShapes("val", cfg.synthetic.val_size, image_size, seed=cfg.synthetic.seed),
        "novel": SyntheticShapes("novel", cfg.synthetic.val_size // 4, image_size, seed=cfg.synthetic.seed),
    }
