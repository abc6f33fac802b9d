"""Parameter groups, AdamW and the learning-rate schedule (linear warmup, then cosine, linear or constant)."""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Callable, Union

import torch

from chinese_clip.config import OptimConfig, StageConfig
from chinese_clip.model import ChineseCLIP

Schedule = Union[OptimConfig, StageConfig]  # anything with lr, warmup_steps, schedule, min_lr_ratio
AdamW = Callable[..., torch.optim.Optimizer]  # (param groups, lr=, betas=, eps=) -> an AdamW


def param_groups(model: ChineseCLIP, weight_decay: float, lr_scales: dict[str, float] | None = None) -> list[dict]:
    """Trainable parameters grouped by (decayed or not, lr multiplier). Each group carries `lr_scale`,
    which `set_lr` applies to the scheduled lr, and `decays`, which `set_weight_decay` reads.
    `lr_scales` (name -> multiplier) defaults to 1 for every trainable parameter."""
    skip = model.no_weight_decay()
    grouped = defaultdict(list)
    for name, p in model.named_parameters():
        if p.requires_grad:
            scale = 1.0 if lr_scales is None else lr_scales[name]
            grouped[(name not in skip, scale)].append(p)
    return [{"params": params, "weight_decay": weight_decay if decays else 0.0, "lr_scale": scale, "decays": decays}
            for (decays, scale), params in sorted(grouped.items(), key=lambda kv: (not kv[0][0], -kv[0][1]))]


def build_optimizer(model: ChineseCLIP, cfg: OptimConfig, lr_scales: dict[str, float] | None = None, *,
                    weight_decay: float | None = None, adamw: AdamW = torch.optim.AdamW) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters: torch's, or the engine's own (DeepSpeed's CPU AdamW for
    ZeRO-Offload) built with the same arguments."""
    groups = param_groups(model, cfg.weight_decay if weight_decay is None else weight_decay, lr_scales)
    if not groups:
        raise ValueError("no parameter is trainable")
    optimizer = adamw(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    if cfg.decay_to_start:
        decay_towards_start(optimizer)
    return optimizer


def decay_towards_start(optimizer: torch.optim.Optimizer) -> None:
    """Decoupled weight decay towards each parameter's value at the optimizer's first step instead
    of towards zero (fine-tuning's L2-SP, the tip in the SigLIP paper): AdamW shrinks p by
    lr x wd x p, and adding lr x wd x start afterwards makes that lr x wd x (p - start).

    Step hooks, not a subclass: DeepSpeed ZeRO accepts only optimizer types it knows and steps them
    on the fp32 partitions it owns, which is where the start is taken from. It lives in the
    optimizer state, so checkpoints and resumes carry it."""
    first_values: dict[torch.Tensor, torch.Tensor] = {}

    def decayed(opt):
        for group in opt.param_groups:
            if group["weight_decay"]:
                yield from ((group, p) for p in group["params"] if p.grad is not None)

    def remember_start(opt, args, kwargs):
        for _, p in decayed(opt):
            if "start" not in opt.state[p]:
                first_values[p] = p.detach().clone()

    def pull_towards_start(opt, args, kwargs):
        with torch.no_grad():
            for group, p in decayed(opt):
                state = opt.state[p]
                if p in first_values:
                    state["start"] = first_values.pop(p)
                p.add_(state["start"], alpha=group["lr"] * group["weight_decay"])

    optimizer.register_step_pre_hook(remember_start)
    optimizer.register_step_post_hook(pull_towards_start)


def lr_at(step: int, total_steps: int, cfg: Schedule) -> float:
    """lr for 0-based `step` of `total_steps`: linear warmup to cfg.lr, then down to cfg.lr x min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def set_weight_decay(optimizer: torch.optim.Optimizer, weight_decay: float) -> None:
    for group in optimizer.param_groups:
        if group.get("decays", False):
            group["weight_decay"] = weight_decay
