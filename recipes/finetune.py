"""Fine-tune a released or trained Chinese CLIP model, in stages.

    accelerate launch recipes/finetune.py --pretrained clip_cn_vit-b-16.pt \
        [--config recipes/configs/<name>.yaml] [key=value ...]

`--pretrained` takes a Chinese-CLIP `.pt` (add `--model-name ViT-H-14` when its heads are not 64
wide and it is not one of cn_clip's shapes), an HF ChineseCLIPModel directory, or a model directory
of ours. The model's architecture comes from it; the config gives the data, the stages (for
example the image tower frozen first, then everything at a lower lr with layer-wise lr decay) and
the optimiser, as for pretraining.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from chinese_clip.launch import train

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "tiny_finetune.yaml"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained", required=True, help="the model to start from (.pt, HF directory, or ours)")
    parser.add_argument("--model-name", help="the Chinese-CLIP architecture of a .pt, e.g. ViT-B-16")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML run config (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. stages.1.lr=1e-5 data.batch_size=64")
    args = parser.parse_args(argv)
    init = [f"init.pretrained={args.pretrained}"] + ([f"init.model_name={args.model_name}"] if args.model_name else [])
    return train(args.config, init + args.overrides)


if __name__ == "__main__":
    main()
