"""The training loop over an Accelerator (plain, DDP or DeepSpeed ZeRO, the same code)."""
from __future__ import annotations

import json
import sys
import time
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn
from tqdm.auto import tqdm

from chinese_clip.config import Config, flatten, save_config, to_dict
from chinese_clip.gradient_cache import gradient_cache_step
from chinese_clip.losses import ContrastiveObjective
from chinese_clip.optim import build_optimizer, lr_at, set_lr
from chinese_clip.runtime import offloads_optimizer

Evaluate = Callable[[nn.Module], dict[str, dict]]


class Trainer:
    """Owns the prepared model and optimizer, the step loop, logging and the final checkpoint.

    One step is `train.accum_freq` micro-batches: one plain forward/backward, or the gradient
    cache (gradient_cache.py) over several, with gradients reduced across ranks once.
    `evaluate(model)` returns {set name: {metric: value}}; it is called on every rank together
    (under ZeRO-3 a forward pass is collective) with the unwrapped model.
    """

    def __init__(self, cfg: Config, accelerator: Accelerator, model: nn.Module, train_loader,
                 evaluate: Evaluate, run_dir: Path):
        self.cfg, self.accelerator, self.run_dir = cfg, accelerator, run_dir
        self.train_loader, self.evaluate_fn = train_loader, evaluate
        self.objective = ContrastiveObjective(cfg.loss)
        if cfg.loss.name == "clip":
            # InfoNCE has no bias term: a parameter that never gets a gradient must not be trainable.
            model.logit_bias.requires_grad_(False)
        optimizer = build_optimizer(model, cfg.optim, cpu_offload=offloads_optimizer(accelerator))
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        self.global_batch = cfg.data.batch_size * accelerator.num_processes * cfg.train.accum_freq
        self.step = 0
        if accelerator.is_main_process:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, run_dir / "config.yaml")
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)  # a fresh run starts a fresh record
        hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flatten(to_dict(cfg)).items()}
        accelerator.init_trackers("tensorboard", config=hparams)

    # -- one optimizer step -------------------------------------------------------------------
    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> tuple[dict, torch.Tensor, float | None]:
        """One optimizer step over `train.accum_freq` micro-batches; returns loss parts, logit scale, grad norm."""
        parts, logit_scale = self.compute_gradients(micro_batches)
        return parts, logit_scale, self.optimizer_step()

    def compute_gradients(self, micro_batches: list[dict[str, torch.Tensor]]) -> tuple[dict, torch.Tensor]:
        """Gradients of the loss over all micro-batches, reduced across ranks once; no optimizer step."""
        if len(micro_batches) == 1:
            image_features, text_features, logit_scale, logit_bias = self.encode(micro_batches[0])
            parts = self.loss(image_features, text_features, logit_scale, logit_bias, micro_batches)
            self.backward(parts["loss"])
            return {k: v.detach() for k, v in parts.items()}, logit_scale.detach()
        step = partial(gradient_cache_step, self.encode, micro_batches,
                       lambda *features: self.loss(*features, micro_batches), self.backward, self.accelerator.device)
        if self.deepspeed:
            # ZeRO-2/3 would reduce-scatter after every backward pass; coalesce_grad_reduction holds
            # the gradients locally and reduces them once, on exit.
            with self.model.coalesce_grad_reduction():
                return step()
        return step(defer_reduction=lambda: self.accelerator.no_sync(self.model))

    def encode(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return self.model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])  # [b, D] x2, [1] x2

    def loss(self, image_features, text_features, logit_scale, logit_bias, micro_batches) -> dict[str, torch.Tensor]:
        ids = {key: torch.cat([batch[key] for batch in micro_batches]) if key in micro_batches[0] else None
               for key in ("image_id", "caption_id")}
        # Features may be bf16; the softmax over a global batch is not.
        at_least_fp32 = (x.to(torch.promote_types(x.dtype, torch.float32))
                         for x in (image_features, text_features, logit_scale, logit_bias))
        return self.objective(*at_least_fp32, image_ids=ids["image_id"], caption_ids=ids["caption_id"])

    def backward(self, loss: torch.Tensor) -> None:
        if self.deepspeed:
            self.model.backward(loss)  # the engine applies its loss scale; it steps in optimizer_step
        else:
            self.accelerator.backward(loss)

    def optimizer_step(self) -> float | None:
        """Clip, step, zero; returns the global gradient norm before clipping when one was computed."""
        if self.deepspeed:  # the engine clips (gradient_clipping), steps and zeroes
            self.model.step()
            return self.model.get_global_grad_norm()
        grad_norm = None
        if self.cfg.optim.grad_clip > 0:
            grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip).item()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    # -- the loop -----------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg, acc = self.cfg, self.accelerator
        results = {}
        if cfg.eval.at_start:
            results["before"] = self.evaluate("before")
        batches = iter(self.train_loader)
        # In a log file (not a terminal) a redraw is a new line: redraw rarely there.
        bar = tqdm(total=cfg.train.steps, desc="pretrain", disable=not acc.is_main_process, dynamic_ncols=True,
                   mininterval=0.1 if sys.stderr.isatty() else 30)
        self.model.train()
        since, tic = 0, time.perf_counter()
        while self.step < cfg.train.steps:
            lr = lr_at(self.step, cfg.train.steps, cfg.optim)
            set_lr(self.optimizer, lr)
            micro_batches = [{k: v.to(acc.device) for k, v in next(batches).items()}
                             for _ in range(cfg.train.accum_freq)]
            parts, logit_scale, grad_norm = self.train_step(micro_batches)
            self.step += 1
            since += 1
            bar.update(1)
            if self.step % cfg.train.log_every == 0 or self.step == cfg.train.steps:
                # Ranks differ under local_loss and SigLIP: their mean is the global-batch loss.
                losses = {name: acc.reduce(value, "mean").item() for name, value in parts.items()}
                loss_value = losses.pop("loss")
                elapsed = time.perf_counter() - tic
                record = {
                    "train/loss": loss_value,
                    **{f"train/loss/{name}": value for name, value in losses.items()},
                    "train/lr": lr,
                    "train/logit_scale": logit_scale.item(),
                    "train/samples_per_s": since * self.global_batch / elapsed,
                    "train/step_time_s": elapsed / since,
                }
                if grad_norm is not None:
                    record["train/grad_norm"] = float(grad_norm)
                self.log(record)
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", scale=f"{logit_scale.item():.1f}",
                                sps=f"{record['train/samples_per_s']:.0f}")
                since, tic = 0, time.perf_counter()
        bar.close()
        if cfg.eval.at_end:
            results["after"] = self.evaluate("after")
        self.save()
        if acc.is_main_process:
            (self.run_dir / "eval.json").write_text(json.dumps(results, indent=2, ensure_ascii=False))
            print(format_results(results))
        acc.end_training()
        return results

    # -- evaluation, logging, checkpoints -----------------------------------------------------
    def evaluate(self, tag: str) -> dict:
        results = self.evaluate_fn(self.accelerator.unwrap_model(self.model))
        self.log({f"eval/{name}/{metric}": value for name, metrics in results.items()
                  for metric, value in metrics.items()}, tag=tag)
        return results

    def log(self, record: dict, tag: str | None = None) -> None:
        self.accelerator.log(record, step=self.step)
        if self.accelerator.is_main_process:
            line = {"step": self.step, **({"tag": tag} if tag else {}), **record}
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(line, ensure_ascii=False) + "\n")

    def save(self) -> None:
        """A resumable state (sharded under ZeRO) and consolidated weights beside the config."""
        acc = self.accelerator
        acc.save_state(str(self.run_dir / "checkpoints" / f"step_{self.step}"))
        acc.save_model(self.model, str(self.run_dir / "model"))
        if acc.is_main_process:
            save_config(self.cfg, self.run_dir / "model" / "config.yaml")
        acc.wait_for_everyone()


def format_results(results: dict) -> str:
    """{"before"/"after": {set: {top1, chance_top1, ...}}} -> a small plain-text table."""
    phases = [p for p in ("before", "after") if p in results]
    if not phases:
        return "no evaluation was run"
    sets = list(results[phases[-1]])
    header = f"{'zero-shot top-1':<24}" + "".join(f"{p:>10}" for p in phases) + f"{'chance':>10}"
    lines = [header, "-" * len(header)]
    for name in sets:
        row = f"{name:<24}" + "".join(f"{results[p][name]['top1']:>10.1%}" for p in phases)
        lines.append(row + f"{results[phases[-1]][name]['chance_top1']:>10.1%}")
    return "\n".join(lines)
