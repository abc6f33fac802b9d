"""The training loop, stage by stage, over any engine (chinese_clip/engine/): DDP, DeepSpeed ZeRO or FSDP2."""
from __future__ import annotations

import sys
import time
from functools import partial
from typing import Callable, Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import nn
from tqdm.auto import tqdm

from chinese_clip.config import Config, ConfigError, flatten, to_dict
from chinese_clip.distributed import sum_across_ranks
from chinese_clip.engine import Engine
from chinese_clip.evaluation.tasks import scalar_metrics
from chinese_clip.gradient_cache import gradient_cache_step
from chinese_clip.losses import ContrastiveObjective
from chinese_clip.model import ChineseCLIP
from chinese_clip.optim import lr_at, set_lr, set_weight_decay
from chinese_clip.run_dir import RunDir, read_trainer_state
from chinese_clip.runtime import eval_autocast
from chinese_clip.stages import Stage, freeze, plan_stages, stage_lr_scales, summary, tower_counts
from chinese_clip.tokenizer import ChineseTokenizer

Evaluate = Callable[[nn.Module], dict[str, dict]]
# (per-process batch size, data position or None for the start) -> an endless iterator of batches
# with `.position` (JSON, where its last batch left the data) and `.counts` ({read, skipped} on this rank)
MakeLoader = Callable[[int, dict | None], Iterator[dict]]


class Trainer:
    """Owns the stage plan, the step loop, logging, evaluation and checkpoints; the engine owns how the
    model is distributed, the run directory everything written to disk.

    One step is `train.accum_freq` micro-batches: one plain forward/backward, or the gradient
    cache (gradient_cache.py) over several, with gradients reduced across ranks once.
    At a stage boundary that changes what trains, the engine is prepared anew from the full fp32
    weights (ZeRO fixes the trainable set when its engine is created; FSDP shards what it is given).
    `build_model()` returns a fresh model, which a fresh run passes to `init_weights` (pretrained
    weights) before it trains; `make_loader(batch, position)` an endless loader that continues from a
    data position; `evaluate(model)` returns {set name: result}. It runs on every rank together (a
    sharded forward is collective) before training, every eval.every_steps, at stage ends and after
    training, as configured; the weights that score best on eval.best_metric are kept in <run>/best/.
    Constructing a Trainer checks the schedule and the checkpoint it would resume from, and writes nothing.
    """

    def __init__(self, cfg: Config, accelerator: Accelerator, engine: Engine, run_dir: RunDir,
                 build_model: Callable[[], ChineseCLIP], make_loader: MakeLoader, evaluate: Evaluate,
                 init_weights: Callable[[ChineseCLIP], None] | None = None, tokenizer: ChineseTokenizer | None = None):
        self.cfg, self.accelerator, self.engine, self.run_dir = cfg, accelerator, engine, run_dir
        self.build_model, self.make_loader, self.evaluate_fn = build_model, make_loader, evaluate
        self.init_weights, self.tokenizer = init_weights, tokenizer
        self.objective = ContrastiveObjective(cfg.loss)
        self.plan = plan_stages(cfg.stages, accelerator.num_processes, cfg.train.accum_freq)
        self.total_steps = self.plan[-1].end_step
        with torch.device("meta"):  # the layout only: a typo in the last stage's rules must not wait for that stage
            self.layout = self.new_model().parameter_layout()
        for stage in self.plan:
            stage_lr_scales(self.layout, stage.cfg, cfg.loss.name, stage.name)
        self.resume_from = run_dir.find_checkpoint(cfg.checkpoint.resume)
        self.resumed_state = read_trainer_state(self.resume_from) if self.resume_from is not None else None
        if self.resumed_state is not None:
            self.check_resumable(self.resumed_state)
        self.stage: Stage | None = None
        self.batches = None
        self.data_position: dict | None = None  # where the next loader starts
        self.lr_scales: dict[str, float] = {}  # what the current engine trains, name -> lr multiplier
        self.step = 0
        self.results: dict = {}  # every evaluation so far ("before", "during": {step: ...}), carried by checkpoints
        self.best: dict | None = None  # {metric, value, step} of the weights in <run>/best

    # -- the loop -----------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg, acc = self.cfg, self.accelerator
        self.run_dir.open(cfg, self.resumed_state["step"] if self.resumed_state else None)
        if self.resumed_state is not None:
            self.resume(self.resumed_state)
        else:
            self.start()
        # In a log file (not a terminal) a redraw is a new line: redraw rarely there. Closed on an error
        # too, so that the error is not printed into the bar's line.
        with tqdm(total=self.total_steps, initial=self.step, desc=self.stage.name, disable=not acc.is_main_process,
                  dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 30) as bar:
            self.train(bar)
        return self.finish()

    def train(self, bar: tqdm) -> None:
        """Steps to the end of the schedule: stage boundaries, logs, evaluations and checkpoints as configured."""
        cfg, acc = self.cfg, self.accelerator
        since, tic = 0, time.perf_counter()
        while self.step < self.total_steps:
            if self.step == self.stage.end_step:
                self.next_stage()
                bar.set_description(self.stage.name)
                since, tic = 0, time.perf_counter()  # throughput without the engine rebuild
            stage = self.stage
            lr = lr_at(self.step - stage.start_step, stage.steps, stage.cfg)
            set_lr(self.engine.optimizer, lr)
            # from pinned memory (data.pin_memory) the copy overlaps the previous step's GPU work
            micro_batches = [{k: v.to(acc.device, non_blocking=True) for k, v in next(self.batches).items()}
                             for _ in range(cfg.train.accum_freq)]
            parts, logit_scale, grad_norm = self.train_step(micro_batches)
            self.step += 1
            since += 1
            bar.update(1)
            if self.step == stage.start_step + 1:
                # Adam's moments of what trains, summed over ranks: frozen parameters must hold none.
                self.log({"stage/optimizer_state_values": self.sum_over_ranks(self.engine.optimizer_state_values())})
            if self.step % cfg.train.log_every == 0 or self.step == stage.end_step:
                record = self.train_record(parts, logit_scale, grad_norm, lr, since, time.perf_counter() - tic)
                self.log(record)
                bar.set_postfix(loss=f"{record['train/loss']:.4f}", lr=f"{lr:.2e}", scale=f"{logit_scale.item():.1f}",
                                sps=f"{record['train/samples_per_s']:.0f}", skipped=record["data/samples_skipped"])
                since, tic = 0, time.perf_counter()
            if self.evaluation_due(stage):  # before the checkpoint, which carries the results
                self.results.setdefault("during", {})[str(self.step)] = self.evaluate("during")
            every = cfg.checkpoint.every_steps
            if self.step == stage.end_step or (every and self.step % every == 0):
                self.save_checkpoint()

    def start(self) -> None:
        """A fresh run: the model built (and its pretrained weights loaded) on the main process, written
        as the first stage's weights, and every rank starting from that file: ranks never start apart,
        whatever an engine broadcasts or does not."""
        initial = None
        if self.accelerator.is_main_process:
            model = self.new_model()
            if self.init_weights is not None:
                self.init_weights(model)
            initial = model.state_dict()
        self.run_dir.write_stage_weights(self.plan[0], initial)
        self.enter_stage(self.plan[0], self.run_dir.read_stage_weights(self.plan[0]))
        if self.cfg.eval.at_start:
            self.results["before"] = self.evaluate("before")

    def resume(self, state: dict) -> None:
        """Continue from a checkpoint: its stage's engine, weights, optimizer, every rank's RNG and data
        position, and the evaluations and best score so far."""
        acc = self.accelerator
        self.step, self.best, self.results = state["step"], state["best"], state["results"]
        # One per rank. On more ranks than saved them: the synthetic stream's position is global,
        # so any rank's serves; a shard stream refuses a position saved under another layout.
        positions = state["data"]
        self.data_position = positions[acc.process_index if acc.process_index < len(positions) else 0]
        stage = self.plan[state["stage"]]
        self.enter_stage(stage, self.run_dir.read_stage_weights(stage))
        self.engine.load(self.resume_from)
        acc.print(f"resumed from {self.resume_from} at step {self.step} (stage {stage.name!r})")

    def finish(self) -> dict:
        weights = self.full_weights()
        self.run_dir.save_model(weights, self.cfg, self.tokenizer)
        results = dict(self.results)
        if self.cfg.eval.at_end:
            results["after"] = self.evaluate("after")
        if self.best is not None:
            results["best"] = self.best
        self.run_dir.write_results(results)
        self.accelerator.print(format_results(results))
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        return results

    # -- one optimizer step -------------------------------------------------------------------
    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> tuple[dict, torch.Tensor, float | None]:
        """One optimizer step over `train.accum_freq` micro-batches; returns loss parts, logit scale, grad norm."""
        parts, logit_scale = self.compute_gradients(micro_batches)
        return parts, logit_scale, self.engine.step()

    def compute_gradients(self, micro_batches: list[dict[str, torch.Tensor]]) -> tuple[dict, torch.Tensor]:
        """Gradients of the loss over all micro-batches, reduced across ranks once; no optimizer step."""
        if len(micro_batches) == 1:
            image_features, text_features, logit_scale, logit_bias = self.encode(micro_batches[0])
            parts = self.loss(image_features, text_features, logit_scale, logit_bias, micro_batches)
            self.engine.backward(parts["loss"])
            return {k: v.detach() for k, v in parts.items()}, logit_scale.detach()
        loss = partial(self.loss, micro_batches=micro_batches)
        with self.engine.one_reduction():
            return gradient_cache_step(self.encode, micro_batches, loss, self.engine.backward, self.accelerator.device,
                                       defer_reduction=self.engine.no_reduction)

    def encode(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return self.engine.model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])  # [b, D] x2, [1] x2

    def loss(self, image_features, text_features, logit_scale, logit_bias, micro_batches) -> dict[str, torch.Tensor]:
        ids = {key: torch.cat([batch[key] for batch in micro_batches]) if key in micro_batches[0] else None
               for key in ("image_id", "caption_id")}
        # Features may be bf16; the softmax over a global batch is not.
        at_least_fp32 = (x.to(torch.promote_types(x.dtype, torch.float32))
                         for x in (image_features, text_features, logit_scale, logit_bias))
        return self.objective(*at_least_fp32, image_ids=ids["image_id"], caption_ids=ids["caption_id"])

    # -- stages ---------------------------------------------------------------------------------
    def enter_stage(self, stage: Stage, weights: dict[str, torch.Tensor]) -> None:
        """Make `stage` current: a new engine when what trains changes, then its mask ratio, weight
        decay and data. `weights` (full, fp32, the same on every rank) go only into a new engine."""
        scales = stage_lr_scales(self.layout, stage.cfg, self.cfg.loss.name, stage.name)
        if {name: scale for name, scale in scales.items() if scale > 0} != self.lr_scales:
            self.engine.release()
            model = self.new_model()
            model.load_state_dict(weights)
            if self.cfg.train.compile:
                model.compile_blocks()
            self.lr_scales = freeze(model, scales)
            self.engine.prepare(model, self.lr_scales, stage)
        self.engine.module.set_mask_ratio(stage.cfg.mask_ratio)
        set_weight_decay(self.engine.optimizer, stage.cfg.weight_decay)
        self.stage = stage
        self.batches = None  # the old loader's workers go before the new one's start
        self.batches = self.make_loader(stage.batch_size, self.data_position)
        self.log_stage(stage, scales)

    def next_stage(self) -> None:
        """The boundary: the full fp32 weights leave the finished stage's engine and seed the next."""
        weights = self.full_weights()
        stage = self.plan[self.stage.index + 1]
        self.data_position = self.batches.position
        self.run_dir.write_stage_weights(stage, weights)
        self.enter_stage(stage, weights)

    def new_model(self) -> ChineseCLIP:
        """A fresh model initialised from train.seed, the same on every rank, leaving the global RNG
        (dropout, FLIP masks) alone: a boundary or a resume builds one, and the RNG must continue
        exactly as in a run that did neither."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.train.seed)
            return self.build_model()

    def full_weights(self) -> dict[str, torch.Tensor]:
        """Collective. Every parameter in fp32 on the CPU, the same on every rank: trained ones from the
        engine's fp32 copies, frozen ones from the stage's starting weights (the engine may hold bf16)."""
        frozen = [name for name in self.layout if name not in self.lr_scales]
        return {**self.run_dir.read_stage_weights(self.stage, frozen), **self.engine.trained_weights(set(self.lr_scales))}

    def log_stage(self, stage: Stage, scales: dict[str, float]) -> None:
        sizes = self.engine.parameter_sizes()
        text = summary(stage, len(self.plan), self.layout, sizes, scales, self.accelerator.num_processes,
                       self.cfg.train.accum_freq)
        self.accelerator.print(text)
        towers = {f"stage/{tower}_{kind}": sum(count for scale, count in by_scale.items() if (scale > 0) == (kind == "trained"))
                  for tower, by_scale in tower_counts(self.layout, sizes, scales).items() for kind in ("trained", "frozen")}
        self.log({"stage/index": stage.index, "stage/name": stage.name, "stage/mask_ratio": stage.cfg.mask_ratio,
                  "stage/global_batch": stage.global_batch, "stage/lr": stage.cfg.lr, **towers, "stage/summary": text})

    # -- checkpoints ------------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        stage = self.stage
        self.run_dir.save_checkpoint(self.engine, {
            "step": self.step,
            "stage": stage.index,
            "stage_name": stage.name,
            "samples_seen": stage.sample_at(self.step),
            "data": gather_object([self.batches.position]),  # every rank's, in rank order
            "stage_weights": str(self.run_dir.stage_weights_path(stage).relative_to(self.run_dir.path)),
            "frozen": sorted(name for name in self.layout if name not in self.lr_scales),
            "plan": [s.describe() for s in self.plan[:stage.index + 1]],
            "model": to_dict(self.cfg.model),
            "engine": self.engine.name,
            "results": self.results,
            "best": self.best,
        }, self.cfg.checkpoint.keep_last)

    def check_resumable(self, state: dict) -> None:
        """The checkpoint must come from this model, this engine and, up to its stage, this schedule."""
        where = self.resume_from
        if "engine" not in state:
            raise ConfigError(f"{where} was written by an earlier version of this recipe, which this one cannot resume; "
                              "recipes/export.py turns it into a model that init.pretrained starts a new run from")
        if state["model"] != to_dict(self.cfg.model):
            changed = sorted(k for k, v in flatten(to_dict(self.cfg.model)).items() if flatten(state["model"]).get(k) != v)
            raise ConfigError(f"{where} was written for a different model (model.{', model.'.join(changed)}); "
                              "resume with the run's config or set checkpoint.resume=never")
        if state["engine"] != self.engine.name:
            raise ConfigError(f"{where} was written by the {state['engine']} engine and this launch uses {self.engine.name}; "
                              "relaunch as the run was launched (recipes/export.py turns any checkpoint into a model "
                              "that init.pretrained starts a new run from)")
        ours = [s.describe() for s in self.plan[:state["stage"] + 1]]
        if ours != state["plan"]:
            raise ConfigError(f"{where} was written by a schedule whose stages up to {state['stage_name']!r} differ "
                              f"from this config's ({state['plan']} vs {ours}); later stages may change, earlier "
                              "ones may not. Resume with the run's config or set checkpoint.resume=never")

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
        """Every rank together, in eval.mixed_precision as recipes/evaluate.py. The RNG is left as
        it was: evaluating does not change what trains."""
        devices = [self.accelerator.device] if self.accelerator.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), eval_autocast(self.cfg.eval, self.accelerator.device):
            results = self.evaluate_fn(self.engine.module)
        scalars = {name: scalar_metrics(result) for name, result in results.items()}
        self.log({f"eval/{name}/{metric}": value for name, metrics in scalars.items()
                  for metric, value in metrics.items()}, tag=tag)
        self.keep_if_best(scalars)
        return results

    def keep_if_best(self, scalars: dict[str, dict[str, float]]) -> None:
        """Save the weights to <run>/best/ when they beat the best so far on eval.best_metric."""
        metric = self.cfg.eval.best_metric
        if metric is None:
            return
        name, _, key = metric.rpartition("/")
        value = scalars[name][key]
        if self.best is not None and value <= self.best["value"]:
            return
        self.best = {"metric": metric, "value": value, "step": self.step}
        self.run_dir.save_best(self.full_weights(), self.cfg, self.tokenizer, self.best)
        self.accelerator.print(f"best so far: {metric} = {value:.2f} at step {self.step}, saved to {self.run_dir.path / 'best'}")

    def train_record(self, parts: dict, logit_scale: torch.Tensor, grad_norm: float | None, lr: float,
                     steps: int, elapsed: float) -> dict:
        """What a logged step records: the loss and its parts (mean over ranks: under local_loss and
        SigLIP ranks differ, and their mean is the global-batch loss), lr, throughput, data read."""
        losses = {name: self.accelerator.reduce(value, "mean").item() for name, value in parts.items()}
        counts = self.batches.counts
        record = {
            "train/loss": losses.pop("loss"),
            **{f"train/loss/{name}": value for name, value in losses.items()},
            "train/lr": lr,
            "train/logit_scale": logit_scale.item(),
            "train/samples_per_s": steps * self.stage.global_batch / elapsed,
            "train/step_time_s": elapsed / steps,
            **{f"data/samples_{kind}": self.sum_over_ranks(counts[kind]) for kind in ("read", "skipped", "filtered")},
        }
        if grad_norm is not None:
            record["train/grad_norm"] = float(grad_norm)
        return record

    def sum_over_ranks(self, count: int) -> int:
        return int(sum_across_ranks(torch.tensor([count], dtype=torch.float64, device=self.accelerator.device)).item())

    def log(self, record: dict, tag: str | None = None) -> None:
        self.run_dir.log(self.step, record, tag)


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
        label = f"{name} {metric}" + (f" (chance {100 / result['classes']:.1f})" if metric == "top1" else "")
        lines.append(f"{label:<32}" + "".join(f"{scalar_metrics(results[p][name])[metric]:>10.1f}" for p in phases))
    return "\n".join(lines)
