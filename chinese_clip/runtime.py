"""The distributed runtime: the Accelerator, its DeepSpeed config, and the run directory.

Whatever the Python config owns (batch sizes, clipping, precision) is written into the DeepSpeed
config here; a JSON value that contradicts it stops the run with one line instead of a DeepSpeed
assertion after the model is built.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs

from chinese_clip.config import Config, ConfigError, RunConfig, TrainConfig

# DeepSpeed still calls the torch.distributed collectives that torch 2.14 renamed; one warning
# per call per step would bury the progress bar.
warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated", category=FutureWarning)


def resolve_mixed_precision(choice: str) -> str:
    if choice != "auto":
        return choice
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def build_accelerator(cfg: TrainConfig, run_dir: Path) -> Accelerator:
    # Without CUDA, Accelerate forms no process group for a multi-process launch unless told how:
    # a DeepSpeed launch needs the backend named, a plain one needs `cpu=True` (DDP over gloo).
    # Otherwise every process silently trains alone. A single process must do neither.
    multi_process_cpu = not torch.cuda.is_available() and launched_processes() > 1
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(cfg.mixed_precision),
        cpu=multi_process_cpu and not deepspeed,
        log_with="tensorboard",
        project_dir=str(run_dir),
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if multi_process_cpu else [],
    )
    check_world_size(accelerator)
    return accelerator


def launched_processes() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_world_size(accelerator: Accelerator) -> None:
    """Several processes that do not average gradients would each train alone on their slice."""
    launched = launched_processes()
    if launched > 1 and (accelerator.num_processes != launched or accelerator.distributed_type == DistributedType.NO):
        raise RuntimeError(
            f"{launched} processes were launched but Accelerate runs {accelerator.num_processes} "
            f"({accelerator.distributed_type.value}): each would train alone. Launch with `accelerate launch` "
            "and a matching --num_processes."
        )


def configure_deepspeed(accelerator: Accelerator, cfg: Config) -> None:
    """Fill the DeepSpeed config's "auto" values from the run config; refuse contradictions."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    source = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "the DeepSpeed config")
    micro_batches = sorted({stage.batch_size for stage in cfg.stages})
    micro = micro_batches[0]
    origin = "data.batch_size" if micro_batches == [cfg.data.batch_size] else f"the stages' batch sizes {micro_batches}"
    owned = {
        # Every engine is built for its stage's batch (set_deepspeed_batch); one fixed value cannot serve them all.
        "train_micro_batch_size_per_gpu": (micro, origin),
        # One engine step per optimizer step: train.accum_freq micro-batches go through the gradient
        # cache, which backpropagates each micro-batch itself and steps the engine once.
        "gradient_accumulation_steps": (1, "the gradient cache (train.accum_freq is not DeepSpeed accumulation)"),
        "train_batch_size": (micro * accelerator.num_processes, f"{origin} x {accelerator.num_processes} processes"),
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


def set_deepspeed_batch(accelerator: Accelerator, micro_batch: int) -> None:
    """The batch the next DeepSpeed engine is built for (a stage's per-process batch)."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = micro_batch
        plugin.deepspeed_config["train_batch_size"] = micro_batch * accelerator.num_processes


def offload_device(ds_config: dict) -> str:
    """Where ZeRO-Offload keeps optimizer states: "none", "cpu" or "nvme"."""
    return ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")


def offloads_optimizer(accelerator: Accelerator) -> bool:
    plugin = accelerator.state.deepspeed_plugin
    return plugin is not None and offload_device(plugin.deepspeed_config) != "none"


def run_dir_of(cfg: RunConfig) -> Path:
    """One directory per run name, the same on every rank and on every relaunch of that run."""
    return Path(cfg.output_dir or f"runs/{cfg.name}")
