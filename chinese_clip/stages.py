"""Staged schedules: where each stage sits on the run's step axis, and which parameters it trains.

Freezing is data: a stage lists (regex over parameter names, lr multiplier) rules, first match
wins, multiplier 0 freezes. Resolving rules is a pure function of the parameter names, so the
trainer can tell whether a boundary changes what trains (and so needs a new DeepSpeed engine)
before touching the model.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from chinese_clip.config import ConfigError, ParamRule, StageConfig
from chinese_clip.model import ParamPlace

@dataclass(frozen=True)
class Stage:
    """A StageConfig placed on the run: its steps are [start_step, end_step) of the whole run."""
    index: int
    cfg: StageConfig
    start_step: int
    steps: int
    batch_size: int  # per process and micro-batch
    global_batch: int  # samples per optimizer step: batch_size x processes x accum_freq
    start_sample: int  # position in the data stream at the stage's first step

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def end_step(self) -> int:
        return self.start_step + self.steps

    def sample_at(self, step: int) -> int:
        """Position in the data stream before run step `step` of this stage."""
        return self.start_sample + (step - self.start_step) * self.global_batch

    def describe(self) -> dict:
        """What a checkpoint records of the stage, to refuse resuming under a different schedule."""
        return {"name": self.name, "start_step": self.start_step, "steps": self.steps,
                "global_batch": self.global_batch}


def plan_stages(stages: list[StageConfig], processes: int, accum_freq: int) -> list[Stage]:
    plan, step, sample = [], 0, 0
    for index, cfg in enumerate(stages):
        global_batch = cfg.batch_size * processes * accum_freq
        steps = cfg.steps if cfg.steps is not None else -(-cfg.samples // global_batch)
        plan.append(Stage(index, cfg, step, steps, cfg.batch_size, global_batch, sample))
        step, sample = step + steps, sample + steps * global_batch
    return plan


def stage_rules(stage: StageConfig, loss_name: str) -> list[ParamRule]:
    """The stage's rules, after the ones every stage has: InfoNCE has no bias term to train."""
    always = [ParamRule("logit_bias", 0.0)] if loss_name == "clip" else []
    return always + list(stage.params)


def resolve_lr_scales(names: list[str], rules: list[ParamRule], stage_name: str) -> dict[str, float]:
    """name -> lr multiplier (0: frozen) for every parameter name. A rule that matches no parameter
    is a typo that would silently train what was meant to be frozen: refused."""
    compiled = [(re.compile(rule.pattern), rule) for rule in rules]
    scales, used = {}, set()
    for name in names:
        for pattern, rule in compiled:
            if pattern.fullmatch(name):
                scales[name] = rule.lr_scale
                used.add(rule.pattern)
                break
        else:
            scales[name] = 1.0
    for rule in rules:
        if rule.pattern not in used:
            raise ConfigError(f"stage {stage_name!r}: pattern \"{rule.pattern}\" matches no parameter (names look like "
                              f"{', '.join(names[i] for i in (2, len(names) // 2, -3))}) or only ones an earlier "
                              "rule already matched")
    if not any(scales.values()):
        raise ConfigError(f"stage {stage_name!r} freezes every parameter")
    return scales


def layer_decay_factors(layout: dict[str, ParamPlace], decay: float, stage_name: str) -> dict[str, float]:
    """Layer-wise lr decay (as BEiT fine-tunes ViTs): in a tower of L blocks, block i trains at
    lr x decay^(L - i) and the embeddings at decay^(L + 1), so the layers nearest the input, which
    hold the most general features, move least. The final norms, projections and logit scale keep x 1."""
    for tower in ("vision", "text"):
        if not any(place.tower == tower and place.depth > 0 for place in layout.values()):
            raise ConfigError(f"stage {stage_name!r}: layer_decay needs the blocks of both towers, and the {tower} "
                              "tower has none")
    return {name: 1.0 if place.tower == "logit" else decay ** (place.depth + 1 - place.layer)
            for name, place in layout.items()}


def stage_lr_scales(layout: dict[str, ParamPlace], stage: StageConfig, loss_name: str,
                    stage_name: str) -> dict[str, float]:
    """name -> lr multiplier in a stage: its rules (0 freezes), times its layer-wise decay if it has one."""
    scales = resolve_lr_scales(list(layout), stage_rules(stage, loss_name), stage_name)
    if stage.layer_decay is None:
        return scales
    factors = layer_decay_factors(layout, stage.layer_decay, stage_name)
    return {name: scale * factors[name] for name, scale in scales.items()}


def freeze(model: nn.Module, scales: dict[str, float]) -> dict[str, float]:
    """Set requires_grad from the multipliers; returns the trainable parameters' multipliers."""
    for name, p in model.named_parameters():
        p.requires_grad_(scales[name] > 0)
    return {name: scale for name, scale in scales.items() if scale > 0}


def tower_counts(layout: dict[str, ParamPlace], sizes: dict[str, int],
                 scales: dict[str, float]) -> dict[str, dict[float, int]]:
    """tower -> {lr multiplier: parameter count}, multiplier 0 being the frozen ones."""
    counts: dict[str, dict[float, int]] = {"vision": {}, "text": {}, "logit": {}}
    for name, size in sizes.items():
        by_scale = counts[layout[name].tower]
        by_scale[scales[name]] = by_scale.get(scales[name], 0) + size
    return counts


def summary(stage: Stage, total_stages: int, layout: dict[str, ParamPlace], sizes: dict[str, int],
            scales: dict[str, float], processes: int, accum_freq: int) -> str:
    """Printed at a stage's start: its span, batch, mask ratio, lr, and what trains in each tower."""
    c = stage.cfg
    length = f"steps {stage.start_step}-{stage.end_step - 1} ({stage.steps} steps, {stage.steps * stage.global_batch:,} samples)"
    accum = f" x {accum_freq} micro-batches" if accum_freq > 1 else ""
    lines = [
        f"stage {stage.index + 1}/{total_stages} {stage.name!r}: {length}",
        f"  batch {stage.batch_size} x {processes} processes{accum} = {stage.global_batch} per step, "
        f"mask ratio {c.mask_ratio:.2f}",
        f"  lr {c.lr:.2e} (warmup {c.warmup_steps}, {c.schedule}, floor x {c.min_lr_ratio}), weight decay {c.weight_decay}",
    ]
    for tower, by_scale in tower_counts(layout, sizes, scales).items():
        trained = {scale: count for scale, count in by_scale.items() if scale > 0}
        detail = ", ".join(f"lr x {s:g}: {count:,}" for s, count in sorted(trained.items(), reverse=True))
        lines.append(f"  {tower:<7} {sum(trained.values()):>13,} of {sum(by_scale.values()):>13,} parameters train "
                     f"({detail or 'frozen'})")
    return "\n".join(lines)
