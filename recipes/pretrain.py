"""Pretrain a Chinese CLIP model.

    accelerate launch recipes/pretrain.py [--config recipes/configs/<name>.yaml] [key=value ...]

With no arguments it trains the tiny model on the embedded synthetic dataset (a few minutes on a
laptop CPU) and prints its zero-shot scores before and after training.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from chinese_clip.launch import train

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "tiny_synthetic.yaml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML run config (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. optim.lr=1e-3 data.batch_size=64")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    return train(args.config, args.overrides)


if __name__ == "__main__":
    main()
