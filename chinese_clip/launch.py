"""One training run from a config, in numbered steps: what `recipes/pretrain.py` and
`recipes/finetune.py` both do once they have their config and overrides."""
from __future__ import annotations

import os
import sys

from accelerate.utils import set_seed

from chinese_clip.checkpoints import prepare_init, pretrained_vocab
from chinese_clip.config import ConfigError, load_config
from chinese_clip.data.loaders import build_collator, build_train_loader
from chinese_clip.data.stream import DataError, open_sources
from chinese_clip.engine import build_engine
from chinese_clip.evaluation.synthetic import SYNTHETIC_SETS, synthetic_evaluator
from chinese_clip.evaluation.tasks import read_sets, sets_evaluator
from chinese_clip.model import ChineseCLIP
from chinese_clip.redact import redact_url
from chinese_clip.run_dir import RunDir, RunDirError
from chinese_clip.runtime import (build_accelerator, exit_with_launcher, run_dir_of, set_cpu_threads,
                                   speed_summary)
from chinese_clip.tokenizer import load_tokenizer
from chinese_clip.trainer import Trainer


def train(config: str, overrides: list[str]) -> dict:
    # 0. A rank whose launcher dies goes with it, instead of training on as an orphan.
    exit_with_launcher()

    # 1. Configuration and runtime: every user error surfaces here, before anything is built.
    try:
        cfg = load_config(config, overrides)
        threads = set_cpu_threads(cfg.train.cpu_threads)
        accelerator = build_accelerator(cfg.train, run_dir_of(cfg.run), cfg.run.trackers)
        # DDP, DeepSpeed ZeRO or FSDP, as launched; its settings are checked against the config now.
        engine = build_engine(accelerator, cfg)
        # A pretrained model's file is read here: its architecture becomes cfg.model.
        init_weights = prepare_init(cfg, accelerator.print, accelerator.is_main_process)
        # Every shard is looked at now: a missing one is an error before training, not hours in. Its lines
        # name the URLs, whose credentials must not reach the job's log.
        sources = open_sources(cfg.data, accelerator.num_processes, lambda line: accelerator.print(redact_url(line))) \
            if cfg.data.source == "shards" else None
        # So is every evaluation set, label list and template file, read once for every evaluation of the run.
        eval_sets = read_sets(cfg.eval.sets, cfg.eval.best_metric,
                              {name: "classification" for name in SYNTHETIC_SETS} if cfg.data.source == "synthetic"
                              else {})
        # One launch trains in a run directory at a time.
        run_dir = RunDir(run_dir_of(cfg.run), accelerator)
        run_dir.hold()
    except ConfigError as e:
        fail(e)
    # Each process draws its own dropout and FLIP masks (the initial weights are seeded apart, the
    # same on every rank): with one seed everywhere, sample i of every rank would get the same mask.
    set_seed(cfg.train.seed, device_specific=True)

    # 2. Tokenizer: the configured vocabulary, else the one that came with the pretrained model, else
    #    cn_clip's. The Trainer builds the model: once per engine, as stage boundaries rebuild it.
    vocab = cfg.data.vocab or (pretrained_vocab(cfg.init.pretrained) if cfg.init.pretrained else None)
    tokenizer = load_tokenizer(vocab, cfg.data.context_length)
    image_size = cfg.model.vision.image_size

    # 3. Data: this rank's share of every global batch, from any position in the stream, and the
    #    evaluation sets: the synthetic held-out splits on synthetic data, and eval.sets.
    rank = accelerator.process_index

    def make_loader(batch_size: int, position: dict | None):
        return build_train_loader(cfg.data, tokenizer, image_size, rank=rank, world_size=accelerator.num_processes,
                                  seed=cfg.train.seed, batch_size=batch_size, position=position, sources=sources,
                                  skip_log=run_dir.skipped_log(rank))

    collator = build_collator(cfg.data, tokenizer)
    configured = sets_evaluator(eval_sets, collator, accelerator.device, cfg.eval.batch_size, cfg.eval.num_workers)
    synthetic = (synthetic_evaluator(cfg.data, image_size, collator, accelerator.device, cfg.eval.batch_size)
                 if cfg.data.source == "synthetic" else None)

    def evaluate(model) -> dict:
        return {**(synthetic(model) if synthetic else {}), **configured(model)}

    # 4. Train stage by stage (resuming from the newest checkpoint if there is one), evaluate as
    #    configured, save (the tokenizer beside the weights: model/ and best/ are self-contained).
    accelerator.print(f"run directory: {run_dir.path}  processes: {accelerator.num_processes}  engine: {engine.name}  {threads}")
    accelerator.print(f"speed settings: {speed_summary(cfg)}")
    try:
        trainer = Trainer(cfg, accelerator, engine, run_dir, lambda: ChineseCLIP(cfg.model), make_loader, evaluate,
                          init_weights=init_weights, tokenizer=tokenizer)
        results = trainer.fit()
    except ConfigError as e:
        fail(e)
    except DataError as e:  # one rank's data: say so from that rank; the launcher stops the others
        print(f"error on rank {rank}: {redact_url(str(e))}", file=sys.stderr)
        sys.exit(3)
    except RunDirError as e:  # said by the rank whose write failed; the launcher stops the others
        print(f"error on rank {rank}: {e}", file=sys.stderr)
        sys.exit(4)
    return results


def fail(error: ConfigError) -> None:
    if os.environ.get("RANK", "0") == "0":  # every rank sees the same config: one saying so is enough
        print(f"error: {redact_url(str(error))}", file=sys.stderr)  # it may name a data URL
    sys.exit(2)
