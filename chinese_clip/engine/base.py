"""What every engine does: the interface the Trainer steps through, and what plain torch needs no
engine-specific code for."""
from __future__ import annotations

import contextlib
import gc
from functools import partial
from pathlib import Path
from typing import ClassVar, ContextManager

import torch
from accelerate import Accelerator

from chinese_clip.config import Config
from chinese_clip.model import ChineseCLIP
from chinese_clip.optim import build_optimizer
from chinese_clip.runtime import fused_adamw
from chinese_clip.stages import Stage


class Engine:
    """One way of distributing the model over the ranks. Built once per launch; `prepare` makes a
    stage's model and optimizer, and is called again (after `release`) when a boundary changes what
    trains. Collective methods (marked) run on every rank together, in the same order."""

    name: ClassVar[str]

    def __init__(self, accelerator: Accelerator, cfg: Config):
        self.accelerator = accelerator
        self.optim_cfg = cfg.optim
        self.model = None  # what a training forward calls: the wrapper, engine or sharded module
        self.optimizer = None  # its param_groups carry the lr and weight decay set each step

    # -- a stage's model -------------------------------------------------------------------------
    def prepare(self, model: ChineseCLIP, lr_scales: dict[str, float], stage: Stage) -> None:
        """Distribute `model` (full fp32 weights, frozen where requires_grad is off) and build the
        optimizer over what trains, `lr_scales` (name -> lr multiplier), for `stage`'s batch."""
        raise NotImplementedError

    def release(self) -> None:
        """Drop the model and optimizer before the next `prepare`: two engines never hold memory at once."""
        self.model = self.optimizer = None
        self.accelerator.free_memory()
        gc.collect()

    def new_optimizer(self, model: ChineseCLIP, lr_scales: dict[str, float], stage: Stage,
                      adamw=None) -> torch.optim.Optimizer:
        """AdamW over what trains: torch's (fused where optim.fused resolves on), or the engine's own `adamw`."""
        adamw = adamw or partial(torch.optim.AdamW, fused=fused_adamw(self.optim_cfg) or None)
        return build_optimizer(model, self.optim_cfg, lr_scales, weight_decay=stage.cfg.weight_decay, adamw=adamw)

    @property
    def module(self) -> ChineseCLIP:
        """The model as ChineseCLIP, with full parameters in its forward passes: what evaluation
        encodes with and what a stage's mask ratio is set on."""
        return self.accelerator.unwrap_model(self.model)

    # -- one optimizer step ----------------------------------------------------------------------
    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self) -> float | None:
        """Clip, step, zero the gradients; the global gradient norm before clipping, when one was computed."""
        raise NotImplementedError

    def one_reduction(self) -> ContextManager:
        """Around all the backward passes of one step (the gradient cache): gradients cross the
        network once, when it ends, for engines that reduce at the step."""
        return contextlib.nullcontext()

    def no_reduction(self) -> ContextManager:
        """Around the forward and backward of every micro-batch but the last: gradients stay local,
        for engines that reduce as backward runs."""
        return contextlib.nullcontext()

    # -- weights and checkpoints -----------------------------------------------------------------
    def trained_weights(self, names: set[str]) -> dict[str, torch.Tensor]:
        """Collective. The full fp32 value of every parameter in `names` (all of which train), on the
        CPU, the same on every rank."""
        raise NotImplementedError

    def parameter_sizes(self) -> dict[str, int]:
        """name -> number of values of the whole (unsharded) parameter."""
        return {name: p.numel() for name, p in self.module.named_parameters()}

    def optimizer_state_values(self) -> int:
        """Values of the optimizer's per-parameter state (Adam's moments) this rank holds."""
        return sum(t.numel() for state in self.optimizer.state.values() for t in state.values()
                   if torch.is_tensor(t) and t.dim() > 0)

    def save(self, directory: Path) -> None:
        """Collective. The model, optimizer and every rank's RNG, into `directory` (each rank its share)."""
        self.accelerator.save_state(str(directory))

    def load(self, directory: Path) -> None:
        """Collective. What `save` wrote, into the engine `prepare` built for the checkpoint's stage."""
        self.accelerator.load_state(str(directory))

    @staticmethod
    def wrote(checkpoint: Path) -> bool:
        """Whether `checkpoint` holds this engine's model state."""
        raise NotImplementedError

    @staticmethod
    def consolidate(checkpoint: Path) -> dict[str, torch.Tensor]:
        """In one process, without a process group: the fp32 values of the parameters the checkpoint's
        optimizer trained (every parameter, for engines that save them all)."""
        raise NotImplementedError
