"""Export a trained model (a run, one of its checkpoints with any engine's shards, or any model `load_pretrained`
reads) as a model directory of ours, an HF ChineseCLIPModel directory, or a Chinese-CLIP `.pt`.

    python recipes/export.py runs/<name> --out <dir>                         # newest complete checkpoint, ours
    python recipes/export.py runs/<name>/checkpoints/step_N --out <dir> --format hf
    python recipes/export.py runs/<name> --out clip_cn_finetuned.pt --format cn_clip
    python recipes/export.py clip_cn_vit-b-16.pt --out <dir> --format hf     # convert a released checkpoint

Weights are fp32. Parameters frozen in the checkpoint's stage come from the fp32 weights saved at
the stage's start, not from the engine's (possibly bf16) copy. `--format hf` loads with
`transformers.ChineseCLIPModel` / `ChineseCLIPProcessor.from_pretrained`; `--format cn_clip` with
`cn_clip.clip.utils.create_model` and Chinese-CLIP's training `--resume`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from chinese_clip.checkpoints import EXPORT_FORMATS, export, load_for_export, pretrained_vocab
from chinese_clip.config import ConfigError
from chinese_clip.run_dir import STATE_FILE, checkpoint_model, complete_checkpoints
from chinese_clip.tokenizer import load_tokenizer


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="a run directory, one of its checkpoints, or a model to convert")
    parser.add_argument("--out", type=Path, required=True, help="the directory (or, for cn_clip, the .pt file) to write")
    parser.add_argument("--format", choices=EXPORT_FORMATS, default="ours")
    parser.add_argument("--model-name", help="a Chinese-CLIP architecture for a .pt source (ViT-B-16, ViT-H-14, ...)")
    args = parser.parse_args(argv)
    source = args.source
    is_run = source.is_dir() and not (source / STATE_FILE).is_file() and (source / "checkpoints").is_dir()
    if is_run:
        found = complete_checkpoints(source)
        if not found:
            sys.exit(f"error: {source} is a run directory without a complete checkpoint")
        source = found[-1]
    try:
        # a training checkpoint (any engine's shards) or a model file / directory
        model, cfg = checkpoint_model(source) if (source / STATE_FILE).is_file() else load_for_export(source, args.model_name)
        tokenizer = load_tokenizer(cfg.data.vocab or pretrained_vocab(source), cfg.data.context_length)
        out = export(model, cfg, args.out, args.format, tokenizer)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(f"exported {source} to {out} ({args.format})")
    return out


if __name__ == "__main__":
    main()
