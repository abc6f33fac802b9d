"""Export a trained model (a run, one of its checkpoints with any engine's shards, or any model `load_pretrained`
reads) as a model directory of ours, an HF ChineseCLIPModel directory, or a Chinese-CLIP `.pt`, and optionally
publish it on the Hugging Face Hub.

    python recipes/export.py runs/<name> --out <dir>                         # newest complete checkpoint, ours
    python recipes/export.py runs/<name>/checkpoints/step_N --out <dir> --format hf
    python recipes/export.py runs/<name> --out clip_cn_finetuned.pt --format cn_clip
    python recipes/export.py clip_cn_vit-b-16.pt --out <dir> --format hf     # convert a released checkpoint
    python recipes/export.py runs/<name>/best --out <dir> --push-to-hub <user>/<repo> [--private]

Weights are fp32. Parameters frozen in the checkpoint's stage come from the fp32 weights saved at
the stage's start, not from the engine's (possibly bf16) copy. A model directory of ours is an HF
directory (`transformers.ChineseCLIPModel` / `ChineseCLIPProcessor.from_pretrained` load it) with the
run config (config.yaml) beside it; `--format hf` leaves the run config out. Both carry a model card
(README.md): the source's own, or one written from the checkpoint's run. `--format cn_clip` loads with
`cn_clip.clip.utils.create_model` and Chinese-CLIP's training `--resume`.

`--push-to-hub` uploads the exported directory to a model repository (created if needed) with the token
of `--token`, HF_TOKEN or `huggingface-cli login`; without one it stops before exporting anything.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from chinese_clip.checkpoints import EXPORT_FORMATS, export, load_for_export, pretrained_vocab
from chinese_clip.config import ConfigError
from chinese_clip.hub import hub_token, push_to_hub
from chinese_clip.model_card import CARD_FILE, write_model_card
from chinese_clip.redact import redact_url
from chinese_clip.run_dir import STATE_FILE, checkpoint_model, complete_checkpoints, write_checkpoint_card
from chinese_clip.tokenizer import load_tokenizer


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="a run directory, one of its checkpoints, or a model to convert")
    parser.add_argument("--out", type=Path, required=True, help="the directory (or, for cn_clip, the .pt file) to write")
    parser.add_argument("--format", choices=EXPORT_FORMATS, default="ours")
    parser.add_argument("--model-name", help="a Chinese-CLIP architecture for a .pt source (ViT-B-16, ViT-H-14, ...)")
    parser.add_argument("--push-to-hub", metavar="REPO", help="upload the export to this Hub model repository (user/name)")
    parser.add_argument("--private", action="store_true", help="create the Hub repository private")
    parser.add_argument("--token", help="a Hugging Face token (default: HF_TOKEN, else the saved login; prefer "
                                        "those: a token given here shows in ps and the shell's history)")
    args = parser.parse_args(argv)

    # 1. what to export: a run's newest complete checkpoint, a checkpoint, or a model
    source = args.source
    is_run = source.is_dir() and not (source / STATE_FILE).is_file() and (source / "checkpoints").is_dir()
    if is_run:
        found = complete_checkpoints(source)
        if not found:
            sys.exit(f"error: {source} is a run directory without a complete checkpoint")
        source = found[-1]
    is_checkpoint = (source / STATE_FILE).is_file()
    try:
        # 2. an upload that cannot happen stops here, before any work
        if args.push_to_hub and args.format == "cn_clip":
            raise ValueError("--push-to-hub uploads a directory: use --format ours or hf")
        token = hub_token(args.token) if args.push_to_hub else None
        # 3. the model (any engine's shards, or a model file / directory), exported
        model, cfg = checkpoint_model(source) if is_checkpoint else load_for_export(source, args.model_name)
        tokenizer = load_tokenizer(cfg.data.vocab or pretrained_vocab(source), cfg.data.context_length)
        out = export(model, cfg, args.out, args.format, tokenizer)
        # 4. its model card: the source's own, or one from the checkpoint's run
        if args.format != "cn_clip":
            if is_checkpoint:
                write_checkpoint_card(source, cfg, out)
            elif (source / CARD_FILE).is_file():
                # redacted on the way: a card written by an older version may name a URL with its credentials
                card = redact_url((source / CARD_FILE).read_text(encoding="utf-8"))
                (out / CARD_FILE).write_text(card, encoding="utf-8")
            else:
                write_model_card(out, cfg, source=str(args.source))
        print(f"exported {source} to {out} ({args.format})")
        # 5. published
        if args.push_to_hub:
            url = push_to_hub(out, args.push_to_hub, token, private=args.private)
            print(f"uploaded {out} to {url}")
    except (ConfigError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    return out


if __name__ == "__main__":
    main()
