"""One process, or DDP across the ranks: Accelerate prepares the model, and gradients are
all-reduced as backward runs."""
from __future__ import annotations

from pathlib import Path

import torch
from accelerate.utils.constants import SAFE_WEIGHTS_NAME

from chinese_clip.checkpoints import read_weights
from chinese_clip.engine.base import Engine
from chinese_clip.model import ChineseCLIP
from chinese_clip.stages import Stage


class DataParallel(Engine):
    name = "ddp"

    def prepare(self, model: ChineseCLIP, lr_scales: dict[str, float], stage: Stage) -> None:
        optimizer = self.new_optimizer(model, lr_scales, stage)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.model.train()

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def step(self) -> float | None:
        grad_norm = None
        if self.optim_cfg.grad_clip > 0:
            grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.optim_cfg.grad_clip).item()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def no_reduction(self):
        return self.accelerator.no_sync(self.model)  # DDP decides at forward time whether backward reduces

    def trained_weights(self, names: set[str]) -> dict[str, torch.Tensor]:
        return {name: p.detach().float().cpu().clone() for name, p in self.module.named_parameters() if name in names}

    @staticmethod
    def wrote(checkpoint: Path) -> bool:
        return (checkpoint / SAFE_WEIGHTS_NAME).is_file()

    @staticmethod
    def consolidate(checkpoint: Path) -> dict[str, torch.Tensor]:
        # Accelerate saved the whole model; under DDP its names may carry the wrapper's prefix
        return {name.removeprefix("module."): value for name, value in read_weights(checkpoint / SAFE_WEIGHTS_NAME).items()}
