"""How the model is distributed over the ranks: DDP (or one process), DeepSpeed ZeRO 1/2/3, or
FSDP2, behind one interface (base.Engine) that the Trainer steps through. The launch picks one:
`accelerate launch --use_deepspeed ...`, `--use_fsdp --fsdp_version 2`, or `--multi_gpu` / nothing."""
from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator

from chinese_clip.config import Config
from chinese_clip.engine.base import Engine
from chinese_clip.engine.ddp import DataParallel
from chinese_clip.engine.fsdp import FullyShard
from chinese_clip.engine.zero import DeepSpeedZero
from chinese_clip.runtime import launched_engine

ENGINES = {engine.name: engine for engine in (DataParallel, DeepSpeedZero, FullyShard)}


def build_engine(accelerator: Accelerator, cfg: Config) -> Engine:
    """The launch's engine, its settings checked against the run config (ConfigError at start-up)."""
    return ENGINES[launched_engine()](accelerator, cfg)


def consolidate_checkpoint(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The fp32 values a run checkpoint holds for the parameters its stage trained, whichever engine
    wrote it; in one process."""
    for engine in ENGINES.values():
        if engine.wrote(checkpoint):
            return engine.consolidate(checkpoint)
    raise ValueError(f"{checkpoint}: no model state of any engine (DeepSpeed's {DeepSpeedZero.name} shards, "
                     "FSDP shards, or Accelerate's model.safetensors)")
