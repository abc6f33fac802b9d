"""DeepSpeed ZeRO 1/2/3 (+ offload): the engine holds the fp32 master weights and the optimizer
state, partitioned over the ranks, and owns backward, clipping and the step.

Whatever the run config owns (batch sizes, clipping, precision) is written into the DeepSpeed
config here; a JSON value that contradicts it stops the run with one line at start-up instead of a
DeepSpeed assertion after the model is built.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils.constants import MODEL_NAME

from chinese_clip.config import Config, ConfigError
from chinese_clip.engine.base import Engine
from chinese_clip.model import ChineseCLIP
from chinese_clip.stages import Stage


class DeepSpeedZero(Engine):
    name = "deepspeed"

    def __init__(self, accelerator: Accelerator, cfg: Config):
        super().__init__(accelerator, cfg)
        self.ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        configure(self.ds_config, cfg, accelerator.num_processes)
        self.offload = offload_device(self.ds_config) != "none"

    def prepare(self, model: ChineseCLIP, lr_scales: dict[str, float], stage: Stage) -> None:
        # DeepSpeed refuses to step a plain torch optimizer on offloaded states: its CPU AdamW is the
        # same update, vectorised on the host.
        optimizer = self.new_optimizer(model, lr_scales, stage, cpu_adamw if self.offload else None)
        # ZeRO fixes the micro-batch when the engine is created; each stage may have its own.
        self.ds_config["train_micro_batch_size_per_gpu"] = stage.batch_size
        self.ds_config["train_batch_size"] = stage.batch_size * self.accelerator.num_processes
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.model.train()

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss)  # the engine applies its loss scale; it steps in `step`

    def step(self) -> float | None:
        self.model.step()  # clips (gradient_clipping), steps and zeroes
        return self.model.get_global_grad_norm()

    def one_reduction(self):
        # ZeRO-2/3 would reduce-scatter after every backward pass; this holds the gradients locally
        # and reduces them once, on exit.
        return self.model.coalesce_grad_reduction()

    def trained_weights(self, names: set[str]) -> dict[str, torch.Tensor]:
        from deepspeed.utils import safe_get_full_fp32_param

        weights = {}
        for name, p in self.module.named_parameters():  # the same order on every rank: gathers are collective
            if name not in names:
                continue
            full = safe_get_full_fp32_param(p)
            if full is None:
                raise RuntimeError(f"{name} trains but has no fp32 copy in the DeepSpeed optimizer")
            weights[name] = (full.view(p.ds_shape) if hasattr(p, "ds_shape") else full).detach().float().cpu().clone()
        return weights

    def parameter_sizes(self) -> dict[str, int]:
        # ZeRO-3 leaves an empty placeholder where each parameter was
        return {name: getattr(p, "ds_numel", p.numel()) for name, p in self.module.named_parameters()}

    @staticmethod
    def wrote(checkpoint: Path) -> bool:
        return (checkpoint / MODEL_NAME).is_dir()  # one shard per rank

    @staticmethod
    def consolidate(checkpoint: Path) -> dict[str, torch.Tensor]:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=MODEL_NAME)


def cpu_adamw(groups: list[dict], **kwargs) -> torch.optim.Optimizer:
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)


def configure(ds: dict, cfg: Config, processes: int) -> None:
    """Fill the DeepSpeed config's "auto" values from the run config; refuse contradictions."""
    source = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "the DeepSpeed config")
    micro_batches = sorted({stage.batch_size for stage in cfg.stages})
    micro = micro_batches[0]
    origin = "data.batch_size" if micro_batches == [cfg.data.batch_size] else f"the stages' batch sizes {micro_batches}"
    owned = {
        # Every engine is built for its stage's batch (see `prepare`); one fixed value cannot serve them all.
        "train_micro_batch_size_per_gpu": (micro, origin),
        # One engine step per optimizer step: train.accum_freq micro-batches go through the gradient
        # cache, which backpropagates each micro-batch itself and steps the engine once.
        "gradient_accumulation_steps": (1, "the gradient cache (train.accum_freq is not DeepSpeed accumulation)"),
        "train_batch_size": (micro * processes, f"{origin} x {processes} processes"),
        "gradient_clipping": (cfg.optim.grad_clip, "optim.grad_clip"),
    }
    for key, (value, why) in owned.items():
        current = ds.get(key, "auto")
        if current != "auto" and key.startswith("train_") and len(micro_batches) > 1:
            raise ConfigError(f"{source}: {key} is {current} but {why} need one value per stage; set it to \"auto\"")
        if current != "auto" and current != value:
            raise ConfigError(f"{source}: {key} is {current} but {why} gives {value}; set it to \"auto\"")
        ds[key] = value
    zero = ds.get("zero_optimization", {})
    if cfg.train.accum_freq > 1 and zero.get("stage", 0) not in (1, 2, 3):
        raise ConfigError(f"{source}: train.accum_freq > 1 under DeepSpeed needs ZeRO stage 1, 2 or 3, which can "
                          "hold the micro-batches' gradients and reduce them once per step")
    if zero.get("stage") == 3:
        # The final consolidated weights are gathered from the shards; without this they cannot be.
        if zero.get("stage3_gather_16bit_weights_on_model_save") is False:
            raise ConfigError(f"{source}: stage3_gather_16bit_weights_on_model_save is false, so the final weights "
                              "could not be saved; set it to true")
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if offload_device(ds) != "none" and not torch.cuda.is_available():
        # Checked on DeepSpeed 0.19.8's CPU accelerator: the offloaded optimizer's first update agreed
        # in sign with the non-offloaded one for only ~53% of weights. Refuse rather than train wrong.
        raise ConfigError(f"{source}: ZeRO-Offload needs a GPU; on CPU use zero2.json or zero3.json")
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ConfigError(f"{source}: remove the \"{section}\" section; the optimizer and lr schedule are set by optim.*")


def offload_device(ds_config: dict) -> str:
    """Where ZeRO-Offload keeps optimizer states: "none", "cpu" or "nvme"."""
    return ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
