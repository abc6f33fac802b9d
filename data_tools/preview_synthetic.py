"""Write an HTML page of synthetic samples with their captions, to see what the default run learns.

    python data_tools/preview_synthetic.py --split train --count 48 --out synthetic_preview.html
"""
from __future__ import annotations

import argparse
import base64
import html
import io
from pathlib import Path

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
    cells = []
    for sample in dataset:
        buffer = io.BytesIO()
        sample["image"].resize((128, 128)).save(buffer, format="PNG")
        data = base64.b64encode(buffer.getvalue()).decode()
        cells.append(f'<figure><img src="data:image/png;base64,{data}"><figcaption>{html.escape(sample["text"])}'
                     f'<br><small>{class_name(sample["label"])}</small></figcaption></figure>')
    page = ("<!doctype html><meta charset='utf-8'><title>synthetic samples</title>"
            "<style>body{display:flex;flex-wrap:wrap;font-family:sans-serif}figure{width:140px;margin:6px}</style>"
            + "".join(cells))
    args.out.write_text(page, encoding="utf-8")
    print(f"wrote {len(cells)} {args.split} samples to {args.out}")


if __name__ == "__main__":
    main()
