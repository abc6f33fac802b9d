"""The training loop over an Accelerator (plain, DDP or DeepSpeed ZeRO, the same code), stage by stage."""
from __future__ import annotations

import gc
import json
import shutil
import sys
import time
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object
from torch import nn
from tqdm.auto import tqdm

from chinese_clip.checkpoints import save_pretrained
from chinese_clip.config import Config, ConfigError, flatten, save_config, to_dict
from chinese_clip.distributed import sum_across_ranks
from chinese_clip.evaluation.tasks import scalar_metrics
from chinese_clip.gradient_cache import gradient_cache_step
from chinese_clip.losses import ContrastiveObjective
from chinese_clip.model import ChineseCLIP
from chinese_clip.optim import build_optimizer, lr_at, set_lr, set_weight_decay
from chinese_clip.resume import (find_resume_checkpoint, read_trainer_state, read_weights, remove_partial_checkpoints,
                                 save_checkpoint, stage_weights_path, write_weights)
from chinese_clip.runtime import offloads_optimizer, set_deepspeed_batch
from chinese_clip.stages import Stage, freeze, plan_stages, stage_lr_scales, summary, tower_counts
from chinese_clip.tokenizer import ChineseTokenizer

Evaluate = Callable[[nn.Module], dict[str, dict]]
# (per-process batch size, data position or None for the start) -> an endless iterator of batches
# with `.position` (JSON, where its last batch left the data) and `.counts` ({read, skipped} on this rank)
MakeLoader = Callable[[int, dict | None], Iterator[dict]]


class Trainer:
    """Owns the stage plan, the prepared model and optimizer, the step loop, logging and checkpoints.

    One step is `train.accum_freq` micro-batches: one plain forward/backward, or the gradient
    cache (gradient_cache.py) over several, with gradients reduced across ranks once.
    At a stage boundary that changes what trains, the DeepSpeed engine (or DDP wrapper) and the
    optimizer are built anew from the full fp32 weights: ZeRO fixes the trainable set when the
    engine is created. `build_model()` returns a fresh model, which a fresh run passes to
    `init_weights` (pretrained weights) before it trains; `make_loader(batch, position)` an endless
    loader that continues from a data position; `evaluate(model)` returns {set name: result}. It
    runs on every rank together (under ZeRO-3 a forward pass is collective) with the unwrapped model,
    before training, every eval.every_steps, at stage ends and after training, as configured; the
    weights that score best on eval.best_metric are kept in <run>/best/.
    """

    def __init__(self, cfg: Config, accelerator: Accelerator, build_model: Callable[[], ChineseCLIP],
                 make_loader: MakeLoader, evaluate: Evaluate, run_dir: Path,
                 init_weights: Callable[[ChineseCLIP], None] | None = None, tokenizer: ChineseTokenizer | None = None):
        self.cfg, self.accelerator, self.run_dir, self.tokenizer = cfg, accelerator, run_dir, tokenizer
        self.build_model, self.make_loader, self.evaluate_fn = build_model, make_loader, evaluate
        self.init_weights = init_weights
        self.objective = ContrastiveObjective(cfg.loss)
        self.deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        self.plan = plan_stages(cfg.stages, accelerator.num_processes, cfg.train.accum_freq)
        self.total_steps = self.plan[-1].end_step
        self.model = self.optimizer = self.stage = self.batches = None
        self.data_position: dict | None = None  # where the next loader starts
        self.lr_scales: dict[str, float] = {}  # what the current engine trains, name -> lr multiplier
        self.step = 0
        self.best: dict | None = None  # {metric, value, step} of the weights in <run>/best
        with torch.device("meta"):  # names only: a typo in the last stage's rules must not wait for that stage
            names = [name for name, _ in self.new_model().named_parameters()]
        for stage in self.plan:
            stage_lr_scales(names, stage.cfg, cfg.loss.name, stage.name)
        self.resume_from = find_resume_checkpoint(run_dir, cfg.checkpoint.resume)
        if self.resume_from is not None:
            self.check_resumable(read_trainer_state(self.resume_from))
        if accelerator.is_main_process:
            run_dir.mkdir(parents=True, exist_ok=True)
            remove_partial_checkpoints(run_dir)
            save_config(cfg, run_dir / "config.yaml")
            self.keep_metrics(read_trainer_state(self.resume_from)["step"] if self.resume_from else None)
        accelerator.wait_for_everyone()
        hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flatten(to_dict(cfg)).items()}
        accelerator.init_trackers("tensorboard", config=hparams)

    @property
    def unwrapped(self) -> ChineseCLIP:
        return self.accelerator.unwrap_model(self.model)

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
        if self.resume_from is not None:
            state = read_trainer_state(self.resume_from)
            self.step = state["step"]
            self.best = state.get("best")
            # One per rank. On more ranks than saved them: the synthetic stream's position is global,
            # so any rank's serves; a shard stream refuses a position saved under another layout.
            positions = state["data"]
            self.data_position = positions[acc.process_index if acc.process_index < len(positions) else 0]
            stage = self.plan[state["stage"]]
            self.enter_stage(stage, read_weights(self.run_dir / state["stage_weights"]))
            acc.load_state(str(self.resume_from))  # weights, optimizer, every rank's RNG
            acc.print(f"resumed from {self.resume_from} at step {self.step} (stage {stage.name!r})")
            results = self.earlier_evaluations()
        else:
            model = self.new_model()
            if self.init_weights is not None:
                self.init_weights(model)
            initial = model.state_dict()
            self.write_stage_weights(self.plan[0], initial)
            self.enter_stage(self.plan[0], initial)
            if cfg.eval.at_start:
                results["before"] = self.evaluate("before")
        # In a log file (not a terminal) a redraw is a new line: redraw rarely there.
        bar = tqdm(total=self.total_steps, initial=self.step, desc=self.stage.name, disable=not acc.is_main_process,
                   dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 30)
        since, tic = 0, time.perf_counter()
        while self.step < self.total_steps:
            if self.step == self.stage.end_step:
                self.next_stage()
                bar.set_description(self.stage.name)
                since, tic = 0, time.perf_counter()  # throughput without the engine rebuild
            stage = self.stage
            lr = lr_at(self.step - stage.start_step, stage.steps, stage.cfg)
            set_lr(self.optimizer, lr)
            micro_batches = [{k: v.to(acc.device) for k, v in next(self.batches).items()}
                             for _ in range(cfg.train.accum_freq)]
            parts, logit_scale, grad_norm = self.train_step(micro_batches)
            self.step += 1
            since += 1
            bar.update(1)
            if self.step == stage.start_step + 1:
                # Adam's moments of what trains, summed over ranks: frozen parameters must hold none.
                self.log({"stage/optimizer_state_values": self.optimizer_state_values()})
            if self.step % cfg.train.log_every == 0 or self.step == stage.end_step:
                # Ranks differ under local_loss and SigLIP: their mean is the global-batch loss.
                losses = {name: acc.reduce(value, "mean").item() for name, value in parts.items()}
                loss_value = losses.pop("loss")
                elapsed = time.perf_counter() - tic
                data = self.data_counts()
                record = {
                    "train/loss": loss_value,
                    **{f"train/loss/{name}": value for name, value in losses.items()},
                    "train/lr": lr,
                    "train/logit_scale": logit_scale.item(),
                    "train/samples_per_s": since * stage.global_batch / elapsed,
                    "train/step_time_s": elapsed / since,
                    "data/samples_read": data["read"],
                    "data/samples_skipped": data["skipped"],
                }
                if grad_norm is not None:
                    record["train/grad_norm"] = float(grad_norm)
                self.log(record)
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", scale=f"{logit_scale.item():.1f}",
                                sps=f"{record['train/samples_per_s']:.0f}", skipped=data["skipped"])
                since, tic = 0, time.perf_counter()
            if self.evaluation_due(stage):  # before the checkpoint, which records the best score
                results.setdefault("during", {})[str(self.step)] = self.evaluate("during")
            every = cfg.checkpoint.every_steps
            if self.step == stage.end_step or (every and self.step % every == 0):
                self.save_checkpoint()
        bar.close()
        weights = self.full_weights()
        if acc.is_main_process:
            save_pretrained(weights, cfg, self.run_dir / "model", self.tokenizer)
        if cfg.eval.at_end:
            results["after"] = self.evaluate("after")
        if self.best is not None:
            results["best"] = self.best
        if acc.is_main_process:
            (self.run_dir / "eval.json").write_text(json.dumps(results, indent=2, ensure_ascii=False))
            print(format_results(results))
        acc.wait_for_everyone()
        acc.end_training()
        return results

    # -- stages ---------------------------------------------------------------------------------
    def enter_stage(self, stage: Stage, weights: dict[str, torch.Tensor]) -> None:
        """Make `stage` current: a new engine when what trains changes, then its mask ratio, weight
        decay and data. `weights` (full, fp32) are loaded only into a new engine."""
        cfg, acc = self.cfg, self.accelerator
        scales = stage_lr_scales(list(weights), stage.cfg, cfg.loss.name, stage.name)
        if {name: scale for name, scale in scales.items() if scale > 0} != self.lr_scales:
            self.build_engine(stage, weights, scales)
        self.unwrapped.set_mask_ratio(stage.cfg.mask_ratio)
        set_weight_decay(self.optimizer, stage.cfg.weight_decay)
        self.stage = stage
        self.batches = None  # the old loader's workers go before the new one's start
        self.batches = self.make_loader(stage.batch_size, self.data_position)
        sizes = {name: p.ds_numel if hasattr(p, "ds_numel") else p.numel() for name, p in self.unwrapped.named_parameters()}
        text = summary(stage, len(self.plan), sizes, scales, acc.num_processes, cfg.train.accum_freq)
        acc.print(text)
        towers = {f"stage/{tower}_{kind}": sum(count for scale, count in by_scale.items() if (scale > 0) == (kind == "trained"))
                  for tower, by_scale in tower_counts(sizes, scales).items() for kind in ("trained", "frozen")}
        self.log({"stage/index": stage.index, "stage/name": stage.name, "stage/mask_ratio": stage.cfg.mask_ratio,
                  "stage/global_batch": stage.global_batch, "stage/lr": stage.cfg.lr, **towers, "stage/summary": text})

    def build_engine(self, stage: Stage, weights: dict[str, torch.Tensor], scales: dict[str, float]) -> None:
        """A fresh model holding `weights`, frozen by `scales`, prepared with a new optimizer. The old
        engine goes first: ZeRO fixes the trainable set at initialisation."""
        acc = self.accelerator
        if self.model is not None:
            self.model = self.optimizer = None
            acc.free_memory()
            gc.collect()
        model = self.new_model()
        model.load_state_dict(weights)
        trainable = freeze(model, scales)
        optimizer = build_optimizer(model, self.cfg.optim, trainable, weight_decay=stage.cfg.weight_decay,
                                    cpu_offload=offloads_optimizer(acc))
        set_deepspeed_batch(acc, stage.batch_size)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.model.train()
        self.lr_scales = trainable

    def new_model(self) -> ChineseCLIP:
        """A fresh model initialised from train.seed, the same on every rank, leaving the global RNG
        (dropout, FLIP masks) alone: a boundary or a resume builds one, and the RNG must continue
        exactly as in a run that did neither."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.train.seed)
            return self.build_model()

    def next_stage(self) -> None:
        """The boundary: the full fp32 weights leave the finished stage's engine and seed the next."""
        weights = self.full_weights()
        stage = self.plan[self.stage.index + 1]
        self.data_position = self.batches.position
        self.write_stage_weights(stage, weights)
        self.enter_stage(stage, weights)

    def write_stage_weights(self, stage: Stage, weights: dict[str, torch.Tensor]) -> None:
        """The stage's starting weights: where its frozen parameters are read back from."""
        if self.accelerator.is_main_process:
            write_weights(weights, stage_weights_path(self.run_dir, stage.index, stage.name))
        self.accelerator.wait_for_everyone()

    def full_weights(self) -> dict[str, torch.Tensor]:
        """Every parameter in fp32 on the CPU, the same on every rank. Trained ones come from the
        optimizer's fp32 copy (gathered from the ZeRO shards: collective, in the same order on every
        rank); frozen ones from the stage's starting weights, since the engine may only hold bf16."""
        frozen = [name for name, _ in self.unwrapped.named_parameters() if name not in self.lr_scales]
        weights = read_weights(stage_weights_path(self.run_dir, self.stage.index, self.stage.name), frozen)
        for name, p in self.unwrapped.named_parameters():
            if name in self.lr_scales:
                weights[name] = self.fp32_value(p).detach().float().cpu().clone()
        return weights

    def fp32_value(self, p: nn.Parameter) -> torch.Tensor:
        if self.deepspeed:
            from deepspeed.utils import safe_get_full_fp32_param

            full = safe_get_full_fp32_param(p)
            if full is not None:
                return full.view(p.ds_shape) if hasattr(p, "ds_shape") else full
            if hasattr(p, "ds_id"):
                raise RuntimeError("a ZeRO-3 parameter that trains has no fp32 copy in the optimizer")
        return p

    def data_counts(self) -> dict[str, int]:
        """Samples read and skipped as undecodable since the run began, summed over ranks."""
        local = self.batches.counts
        totals = sum_across_ranks(torch.tensor([local["read"], local["skipped"]], dtype=torch.float64,
                                               device=self.accelerator.device))
        return {"read": int(totals[0].item()), "skipped": int(totals[1].item())}

    def optimizer_state_values(self) -> int:
        """Elements of the optimizer's per-parameter state (Adam's two moments), summed over ranks."""
        local = sum(t.numel() for state in self.optimizer.state.values() for t in state.values()
                    if torch.is_tensor(t) and t.dim() > 0)
        return int(sum_across_ranks(torch.tensor([local], dtype=torch.float64, device=self.accelerator.device)).item())

    # -- checkpoints and resuming ----------------------------------------------------------------
    def save_checkpoint(self) -> None:
        stage = self.stage
        save_checkpoint(self.accelerator, self.run_dir, {
            "step": self.step,
            "stage": stage.index,
            "stage_name": stage.name,
            "samples_seen": stage.sample_at(self.step),
            "data": gather_object([self.batches.position]),  # every rank's, in rank order
            "stage_weights": str(stage_weights_path(self.run_dir, stage.index, stage.name).relative_to(self.run_dir)),
            "frozen": sorted(name for name, _ in self.unwrapped.named_parameters() if name not in self.lr_scales),
            "plan": [s.describe() for s in self.plan[:stage.index + 1]],
            "model": to_dict(self.cfg.model),
            "best": self.best,
        }, self.cfg.checkpoint.keep_last)

    def check_resumable(self, state: dict) -> None:
        """The checkpoint must come from this model and, up to its stage, this schedule."""
        where = self.resume_from
        if state["model"] != to_dict(self.cfg.model):
            changed = sorted(k for k, v in flatten(to_dict(self.cfg.model)).items() if flatten(state["model"]).get(k) != v)
            raise ConfigError(f"{where} was written for a different model (model.{', model.'.join(changed)}); "
                              "resume with the run's config or set checkpoint.resume=never")
        ours = [s.describe() for s in self.plan[:state["stage"] + 1]]
        if ours != state["plan"]:
            raise ConfigError(f"{where} was written by a schedule whose stages up to {state['stage_name']!r} differ "
                              f"from this config's ({state['plan']} vs {ours}); later stages may change, earlier "
                              "ones may not. Resume with the run's config or set checkpoint.resume=never")

    def keep_metrics(self, resumed_step: int | None) -> None:
        """A fresh run starts a fresh record; a resumed one drops what was logged after its checkpoint."""
        path = self.run_dir / "metrics.jsonl"
        if resumed_step is None or not path.is_file():
            path.unlink(missing_ok=True)
            return
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= resumed_step]
        path.write_text("".join(line + "\n" for line in kept))

    def earlier_evaluations(self) -> dict:
        """The scores a resumed run logged before its checkpoint ("before" and "during"; the logs hold
        each set's scalar metrics)."""
        path = self.run_dir / "metrics.jsonl"
        lines = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
        results: dict = {}
        for line in lines:
            if line.get("tag") not in ("before", "during"):
                continue
            scores: dict = {}
            for key, value in line.items():
                if key.startswith("eval/"):
                    name, metric = key.removeprefix("eval/").rsplit("/", 1)
                    scores.setdefault(name, {})[metric] = value
            if line["tag"] == "before":
                results["before"] = scores
            else:
                results.setdefault("during", {})[str(line["step"])] = scores
        return results

    # -- evaluation, logging ------------------------------------------------------------------
    def evaluation_due(self, stage: Stage) -> bool:
        """After this step: every eval.every_steps and at stage ends, as configured; the run's last step
        is left to the evaluation after training (eval.at_end)."""
        cfg = self.cfg.eval
        if self.step == self.total_steps and cfg.at_end:
            return False
        return bool((cfg.every_steps and self.step % cfg.every_steps == 0)
                    or (cfg.at_stage_end and self.step == stage.end_step))

    def evaluate(self, tag: str) -> dict:
        """Every rank together, in the run's mixed precision as recipes/evaluate.py. The RNG is left as
        it was: evaluating does not change what trains."""
        devices = [self.accelerator.device] if self.accelerator.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), self.accelerator.autocast():
            results = self.evaluate_fn(self.unwrapped)
        scalars = {name: scalar_metrics(result) for name, result in results.items()}
        self.log({f"eval/{name}/{metric}": value for name, metrics in scalars.items()
                  for metric, value in metrics.items()}, tag=tag)
        self.keep_if_best(scalars)
        return results

    def keep_if_best(self, scalars: dict[str, dict[str, float]]) -> None:
        """Save the weights to <run>/best/ (model directory + best.json) when they beat the best so far
        on eval.best_metric. The new copy is complete before it replaces the old one."""
        metric = self.cfg.eval.best_metric
        if metric is None:
            return
        name, _, key = metric.rpartition("/")
        value = scalars[name][key]
        if self.best is not None and value <= self.best["value"]:
            return
        self.best = {"metric": metric, "value": value, "step": self.step}
        weights = self.full_weights()  # collective
        if self.accelerator.is_main_process:
            best, partial, old = (self.run_dir / n for n in ("best", "best.partial", "best.old"))
            shutil.rmtree(partial, ignore_errors=True)
            save_pretrained(weights, self.cfg, partial, self.tokenizer)
            (partial / "best.json").write_text(json.dumps(self.best, indent=2))
            if best.exists():
                best.rename(old)
            partial.rename(best)
            shutil.rmtree(old, ignore_errors=True)
        self.accelerator.print(f"best so far: {metric} = {value:.2f} at step {self.step}, saved to {self.run_dir / 'best'}")

    def log(self, record: dict, tag: str | None = None) -> None:
        self.accelerator.log(record, step=self.step)
        if self.accelerator.is_main_process:
            line = {"step": self.step, **({"tag": tag} if tag else {}), **record}
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(line, ensure_ascii=False) + "\n")


def format_results(results: dict) -> str:
    """{"before"/"after": {set: result}} -> a small plain-text table of each set's headline score
    (mean recall for retrieval, else top-1), in %."""
    phases = [p for p in ("before", "after") if results.get(p)]
    if not phases:
        return "no evaluation was run"
    header = f"{'zero-shot':<32}" + "".join(f"{p:>10}" for p in phases)
    lines = [header, "-" * len(header)]
    for name, result in results[phases[-1]].items():
        metric = "mean_recall" if "mean_recall" in scalar_metrics(result) else "top1"
        label = f"{name} {metric}" + (f" (chance {result['chance_top1']:.1f})" if "chance_top1" in result else "")
        lines.append(f"{label:<32}" + "".join(f"{scalar_metrics(results[p][name])[metric]:>10.1f}" for p in phases))
    return "\n".join(lines)
