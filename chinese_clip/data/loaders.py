"""Training and evaluation data from a DataConfig."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from chinese_clip.config import DataConfig
from chinese_clip.data.collate import ImageTextCollator
from chinese_clip.data.sampler import GlobalBatchSampler
from chinese_clip.data.synthetic import SyntheticShapes
from chinese_clip.tokenizer import ChineseTokenizer


def build_collator(cfg: DataConfig, tokenizer: ChineseTokenizer) -> ImageTextCollator:
    return ImageTextCollator(tokenizer, cfg.mean, cfg.std)


def build_train_loader(cfg: DataConfig, tokenizer: ChineseTokenizer, image_size: int, *, rank: int,
                       world_size: int, seed: int, batch_size: int | None = None, start_sample: int = 0) -> DataLoader:
    """An endless loader of this rank's `batch_size` (default cfg.batch_size) rows of each global batch,
    starting `start_sample` samples into the stream (see GlobalBatchSampler)."""
    dataset = SyntheticShapes("train", cfg.synthetic.train_size, image_size, seed=cfg.synthetic.seed)
    sampler = GlobalBatchSampler(len(dataset), batch_size or cfg.batch_size, rank=rank, world_size=world_size,
                                 seed=seed, start_sample=start_sample)
    # Its own generator: starting to iterate must not draw from the global RNG, whose state a
    # resumed run restores from the checkpoint and must continue exactly as the uninterrupted run.
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=build_collator(cfg, tokenizer),
                      num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0,
                      generator=torch.Generator().manual_seed(seed))


def build_eval_sets(cfg: DataConfig, image_size: int) -> dict[str, SyntheticShapes]:
    """Held-out images of the trained colour x shape pairs, and of the four never-trained pairs."""
    return {
        "val": SyntheticShapes("val", cfg.synthetic.val_size, image_size, seed=cfg.synthetic.seed),
        "novel": SyntheticShapes("novel", cfg.synthetic.val_size // 4, image_size, seed=cfg.synthetic.seed),
    }
