"""What the benches time: the product's own training step, `Trainer.train_step` through the engine
the launch chose (one process or DDP, DeepSpeed ZeRO, FSDP2), on synthetic tensors. A figure from a
bench is then a figure of what `accelerate launch recipes/pretrain.py` runs, minus data loading."""
from __future__ import annotations

from pathlib import Path

import torch

from chinese_clip.config import Config
from chinese_clip.engine import build_engine
from chinese_clip.model import ChineseCLIP
from chinese_clip.run_dir import RunDir
from chinese_clip.runtime import build_accelerator
from chinese_clip.trainer import Trainer


def first_stage_trainer(cfg: Config, run_dir: Path) -> Trainer:
    """A Trainer holding the first stage's engine, built from fresh weights; it logs into `run_dir`."""
    accelerator = build_accelerator(cfg.train, run_dir)
    trainer = Trainer(cfg, accelerator, build_engine(accelerator, cfg), RunDir(run_dir, accelerator),
                      lambda: ChineseCLIP(cfg.model), make_loader=lambda *_: None, evaluate=None)
    trainer.run_dir.open(cfg, resumed_step=None)
    trainer.enter_stage(trainer.plan[0], trainer.new_model().state_dict())
    return trainer


def synthetic_batch(cfg: Config, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
    """One micro-batch of random pixels and token ids of the config's shapes."""
    size, length = cfg.model.vision.image_size, cfg.data.context_length
    input_ids = torch.randint(103, cfg.model.text.vocab_size, (batch, length))
    return {"pixel_values": torch.randn(batch, 3, size, size).to(device), "input_ids": input_ids.to(device),
            "attention_mask": torch.ones_like(input_ids).to(device)}
