"""Write an HTML page of synthetic samples with their captions, to see what the default run learns.

    python data_tools/preview_synthetic.py --split train --count 48 --out synthetic_preview.html
"""
from __future__ import annotations

import argparse
from pathlib import Path

from chinese_clip.data.report import sample_page
from chinese_clip.data.synthetic import SPLITS, SyntheticShapes, class_name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", choices=list(SPLITS), default="train")
    parser.add_argument("--count", type=int, default=48)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("synthetic_preview.html"))
    args = parser.parse_args()

    dataset = SyntheticShapes(args.split, args.count, args.image_size, seed=args.seed)
    page = sample_page(((s["image"].resize((128, 128)), s["text"], class_name(s["label"])) for s in dataset),
                       "synthetic samples")
    args.out.write_text(page, encoding="utf-8")
    print(f"wrote {len(dataset)} {args.split} samples to {args.out}")


if __name__ == "__main__":
    main()
