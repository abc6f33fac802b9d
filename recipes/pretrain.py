"""Pretrain a Chinese CLIP model.

    accelerate launch recipes/pretrain.py [--config recipes/configs/<name>.yaml] [key=value ...]

With no arguments it trains the tiny model on the embedded synthetic dataset (a few minutes on a
laptop CPU) and prints its zero-shot scores before and after training.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from accelerate.utils import set_seed

from chinese_clip.config import ConfigError, load_config
from chinese_clip.data.loaders import build_train_loader
from chinese_clip.evaluation.synthetic import synthetic_evaluator
from chinese_clip.model import ChineseCLIP
from chinese_clip.runtime import build_accelerator, configure_deepspeed, run_dir_of
from chinese_clip.tokenizer import load_tokenizer
from chinese_clip.trainer import Trainer

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "tiny_synthetic.yaml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML run config (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. optim.lr=1e-3 data.batch_size=64")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)

    # 1. Configuration and runtime: every user error surfaces here, before anything is built.
    try:
        cfg = load_config(args.config, args.overrides)
        run_dir = run_dir_of(cfg.run)
        accelerator = build_accelerator(cfg.train, run_dir)
        configure_deepspeed(accelerator, cfg)
    except ConfigError as e:
        fail(e)
    # Each process draws its own dropout and FLIP masks (the initial weights are seeded apart, the
    # same on every rank): with one seed everywhere, sample i of every rank would get the same mask.
    set_seed(cfg.train.seed, device_specific=True)

    # 2. Tokenizer. The Trainer builds the model: once per engine, as stage boundaries rebuild it.
    tokenizer = load_tokenizer(cfg.data.vocab, cfg.data.context_length)
    image_size = cfg.model.vision.image_size

    # 3. Data: this rank's share of every global batch, from any position in the stream, and the
    #    held-out evaluation sets.
    def make_loader(batch_size: int, start_sample: int):
        return build_train_loader(cfg.data, tokenizer, image_size, rank=accelerator.process_index,
                                  world_size=accelerator.num_processes, seed=cfg.train.seed,
                                  batch_size=batch_size, start_sample=start_sample)

    evaluate = synthetic_evaluator(cfg.data, image_size, tokenizer, accelerator.device, cfg.eval.batch_size)

    # 4. Train stage by stage (resuming from the newest checkpoint if there is one), evaluate before
    #    and after, save (the tokenizer beside the weights: model/ is self-contained).
    accelerator.print(f"run directory: {run_dir}  processes: {accelerator.num_processes}")
    try:
        trainer = Trainer(cfg, accelerator, lambda: ChineseCLIP(cfg.model), make_loader, evaluate, run_dir)
        results = trainer.fit()
    except ConfigError as e:
        fail(e)
    if accelerator.is_main_process:
        tokenizer.save(run_dir / "model")
    return results


def fail(error: ConfigError) -> None:
    if os.environ.get("RANK", "0") == "0":  # every rank sees the same config: one saying so is enough
        print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
