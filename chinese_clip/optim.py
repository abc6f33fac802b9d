"""Parameter groups, AdamW and the learning-rate schedule (linear warmup, cosine decay)."""
from __future__ import annotations

import math

import torch
from torch import nn

from chinese_clip.config import OptimConfig


def no_decay_names(model: nn.Module) -> set[str]:
    """Norm weights, biases and scalar logit parameters (all < 2-D), plus what the vision tower
    declares (timm: position embedding and class token) are not pulled towards zero."""
    names = {n for n, p in model.named_parameters() if p.ndim < 2}
    visual = getattr(model, "visual", None)
    if visual is not None and hasattr(visual, "no_weight_decay"):
        names |= {f"visual.{n}" for n in visual.no_weight_decay()}
    return names


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Trainable parameters split into decay / no-decay groups. Each group carries `lr_scale`,
    the multiplier `set_lr` applies to the scheduled lr."""
    skip = no_decay_names(model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name in skip else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "lr_scale": 1.0},
        {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: OptimConfig, *, cpu_offload: bool = False) -> torch.optim.Optimizer:
    """AdamW; with ZeRO-Offload, DeepSpeed's CPU AdamW (the same update, vectorised on the host),
    since DeepSpeed refuses to step a plain torch optimizer on offloaded states."""
    groups = param_groups(model, cfg)
    if cpu_offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """lr for 0-based `step`: linear warmup to cfg.lr, then cosine down to cfg.lr x min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
