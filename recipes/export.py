"""Export a training checkpoint (ZeRO shards included) as a model directory that `load_pretrained` reads.

    python recipes/export.py runs/<name> --out <dir>                       # the newest complete checkpoint
    python recipes/export.py runs/<name>/checkpoints/step_N --out <dir>    # that one

The output holds fp32 `model.safetensors`, the run's `config.yaml` and the tokenizer's `vocab.txt`.
Parameters frozen in the checkpoint's stage come from the fp32 weights saved at the stage's start,
not from the engine's (possibly bf16) copy.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from chinese_clip.checkpoints import export_checkpoint
from chinese_clip.config import ConfigError
from chinese_clip.resume import STATE_FILE, complete_checkpoints


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="a run directory, or one of its checkpoints")
    parser.add_argument("--out", type=Path, required=True, help="the model directory to write")
    args = parser.parse_args(argv)
    checkpoint = args.source
    if not (checkpoint / STATE_FILE).is_file():
        found = complete_checkpoints(args.source)
        if not found:
            sys.exit(f"error: {args.source} is neither a complete checkpoint nor a run directory with one")
        checkpoint = found[-1]
    try:
        out = export_checkpoint(checkpoint, args.out)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(f"exported {checkpoint} to {out}")
    return out


if __name__ == "__main__":
    main()
