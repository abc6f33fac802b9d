"""PyTorch FSDP2 (`fully_shard`), applied by the project: every ViT block and BERT layer is a unit,
then the root (embeddings, final norms, projections, logit scale). Parameters, gradients and Adam's
state live sharded (fp32); a unit's full parameters exist only while its forward and backward run,
in bf16 on GPUs. The same code runs on CPU ranks over gloo.

Selected by the launch (`accelerate launch --use_fsdp --fsdp_version 2`, or a launcher YAML with
`distributed_type: FSDP`); of Accelerate's FSDP settings it takes `fsdp_reshard_after_forward`,
`fsdp_offload_params` and `fsdp_activation_checkpointing`. Checkpoints are sharded with
torch.distributed.checkpoint: every rank writes its own shards, and any number of ranks (or one
process, for export) reads them back.
"""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from accelerate import Accelerator
from accelerate.utils import FullyShardedDataParallelPlugin
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import (CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard,
                                    register_fsdp_forward_method)
from torch.distributed.tensor import DTensor

from chinese_clip.config import Config, ConfigError
from chinese_clip.engine.base import Engine
from chinese_clip.model import ChineseCLIP
from chinese_clip.runtime import resolve_mixed_precision
from chinese_clip.stages import Stage

SHARDS_DIR = "fsdp"  # inside a checkpoint directory, beside Accelerate's RNG states


class FullyShard(Engine):
    name = "fsdp"

    def __init__(self, accelerator: Accelerator, cfg: Config):
        super().__init__(accelerator, cfg)
        plugin = FullyShardedDataParallelPlugin()  # the launch's FSDP_* settings, as Accelerate reads them
        if plugin.fsdp_version != 2:
            raise ConfigError(f"fsdp_version is {plugin.fsdp_version}: this recipe shards with FSDP2 (fully_shard); "
                              "set fsdp_version: 2 in the launcher YAML (or --fsdp_version 2)")
        if accelerator.num_processes < 2:
            raise ConfigError("FSDP over one process shards nothing: launch with --num_processes 2 or more, or "
                              "without --use_fsdp")
        if plugin.activation_checkpointing and not cfg.model.grad_checkpointing:
            raise ConfigError("fsdp_activation_checkpointing is true but model.grad_checkpointing is false; "
                              "activation checkpointing is the run config's: set model.grad_checkpointing=true")
        precision = resolve_mixed_precision(cfg.train.mixed_precision)
        if precision == "fp16":
            raise ConfigError("train.mixed_precision=fp16 under FSDP: use bf16 (no loss scaling needed) or no")
        # bf16 for the gathered parameters and the forward/backward; gradients reduced and the update
        # made in fp32, on the fp32 shards
        self.mixed_precision = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                                if precision == "bf16" else MixedPrecisionPolicy())
        self.reshard_after_forward = plugin.reshard_after_forward
        # Pinned host memory needs a GPU; on CPU ranks the offload path runs unpinned.
        self.offload = (CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
                        if isinstance(plugin.cpu_offload, CPUOffloadPolicy) else OffloadPolicy())
        self.mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))

    def prepare(self, model: ChineseCLIP, lr_scales: dict[str, float], stage: Stage) -> None:
        settings = dict(mesh=self.mesh, reshard_after_forward=self.reshard_after_forward,
                        mp_policy=self.mixed_precision, offload_policy=self.offload)
        for block in model.blocks():
            fully_shard(block, **settings)
        fully_shard(model, **settings)
        # Evaluation encodes one tower at a time: the root's parameters must be gathered for those too.
        for method in ("encode_image", "encode_text"):
            register_fsdp_forward_method(model, method)
        model.train()
        self.model = model
        self.optimizer = self.new_optimizer(model, lr_scales, stage)  # over the sharded parameters

    @property
    def module(self) -> ChineseCLIP:
        return self.model  # fully_shard keeps the class (and its methods); there is no wrapper

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float | None:
        grad_norm = None
        if self.optim_cfg.grad_clip > 0:
            trained = [p for p in self.model.parameters() if p.grad is not None]
            grad_norm = torch.nn.utils.clip_grad_norm_(trained, self.optim_cfg.grad_clip).full_tensor().item()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    @contextlib.contextmanager
    def no_reduction(self):
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def trained_weights(self, names: set[str]) -> dict[str, torch.Tensor]:
        # One parameter gathered at a time (the whole model never sits on a device at once), in the
        # same order on every rank
        return {name: p.full_tensor().detach().float().cpu() for name, p in self.model.named_parameters()
                if name in names}

    def optimizer_state_values(self) -> int:
        return sum(local(t).numel() for state in self.optimizer.state.values() for t in state.values()
                   if torch.is_tensor(t) and t.dim() > 0)

    def save(self, directory: Path) -> None:
        super().save(directory)  # every rank's RNG (Accelerate prepared no model or optimizer)
        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=directory / SHARDS_DIR)

    def load(self, directory: Path) -> None:
        super().load(directory)
        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=directory / SHARDS_DIR)  # into this rank's shards, whatever saved them
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])

    @staticmethod
    def wrote(checkpoint: Path) -> bool:
        return (checkpoint / SHARDS_DIR / ".metadata").is_file()

    @staticmethod
    def consolidate(checkpoint: Path) -> dict[str, torch.Tensor]:
        shards = checkpoint / SHARDS_DIR
        saved = dcp.FileSystemReader(shards).read_metadata().state_dict_metadata
        weights = {key.removeprefix("model."): torch.empty(meta.size, dtype=meta.properties.dtype)
                   for key, meta in saved.items() if key.startswith("model.")}
        with warnings.catch_warnings():  # "no process group: loading in a single process", as meant
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load({"model": weights}, checkpoint_id=shards)  # this process reads every rank's shards
        return weights


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t
