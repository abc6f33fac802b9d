"""Chinese zero-shot evaluation of any model `load_pretrained` reads.

    python recipes/evaluate.py --model <.pt | HF dir | our model dir> [--retrieval <dir>[:split] ...] \
        [--classification <folder> ...] [--templates FILE] [--out results/] [--batch-size 256] [--save-features]
    accelerate launch --multi_gpu --num_processes 8 recipes/evaluate.py ...   # features computed across ranks

--retrieval takes a dataset in Chinese-CLIP's layout ({split}_imgs.tsv + {split}_texts.jsonl; split
"valid" unless given after a colon) and may be repeated. The scores (text->image and image->text
R@1/5/10 and their mean, in %) go to results.json and results.md in --out and are printed as a
table. --save-features also writes the features in Chinese-CLIP's jsonl format under
--out/features/<set>/, for its own make_topk_predictions*.py and evaluation*.py.

--classification takes an image folder with one sub-folder per class (sorted by name) and a
label_cn.txt in it or beside it (line i: the i-th folder's Chinese class name), as Chinese-CLIP's
zero-shot datasets come. Prompts are cn_clip's Chinese ImageNet templates unless --templates names
a file (one template per line, {} for the class name); each class embedding is the mean over the
templates. It reports top-1, top-5 and per-class top-1 and the sha256 of the labels and templates.
"""
from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import torch

from chinese_clip.checkpoints import load_pretrained, pretrained_vocab
from chinese_clip.config import ConfigError, DataConfig, TrainConfig
from chinese_clip.data.loaders import build_collator
from chinese_clip.evaluation.classification import chinese_clip_templates, evaluate_classification
from chinese_clip.evaluation.tasks import evaluate_retrieval, markdown_table
from chinese_clip.runtime import build_accelerator
from chinese_clip.tokenizer import load_tokenizer


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--model-name", help="a Chinese-CLIP architecture for a .pt (ViT-B-16, ViT-H-14, ...)")
    parser.add_argument("--retrieval", action="append", default=[], metavar="DIR[:SPLIT]")
    parser.add_argument("--classification", action="append", default=[], metavar="FOLDER")
    parser.add_argument("--templates", type=Path, help="prompt templates, one per line with {} for the class name")
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--context-length", type=int, default=52)
    parser.add_argument("--save-features", action="store_true")
    args = parser.parse_args(argv)
    if not args.retrieval and not args.classification:
        parser.error("name at least one evaluation set (--retrieval or --classification)")
    templates = chinese_clip_templates()
    if args.templates is not None:
        templates = [line.strip() for line in args.templates.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not templates or any("{}" not in t for t in templates):
            parser.error(f"{args.templates}: expected one template per line, each with {{}} for the class name")
    accelerator = build_accelerator(TrainConfig(), args.out)
    try:
        model = load_pretrained(args.model, args.model_name).to(accelerator.device)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    accelerator.print(f"model: {args.model}  processes: {accelerator.num_processes}  device: {accelerator.device}")
    collator = build_collator(DataConfig(), load_tokenizer(pretrained_vocab(args.model), args.context_length))
    tasks = {}  # set name -> its evaluation, run in order below
    for entry in args.retrieval:
        directory, _, split = entry.partition(":")
        name = f"{Path(directory).name}/{split or 'valid'}"
        features = args.out / "features" / name if args.save_features else None
        tasks[name] = partial(evaluate_retrieval, model, directory, split or "valid", collator, accelerator.device,
                              args.batch_size, features)
    for folder in args.classification:
        tasks[Path(folder).name] = partial(evaluate_classification, model, folder, collator, accelerator.device,
                                           templates, args.batch_size)
    results = {}
    for name, evaluate in tasks.items():
        try:
            with torch.no_grad(), accelerator.autocast():
                results[name] = evaluate()
        except (FileNotFoundError, ValueError) as e:
            sys.exit(f"error: {name}: {e}")
        if results[name].get("empty_classes"):
            accelerator.print(f"{name}: classes without images (candidates only): {', '.join(results[name]['empty_classes'])}")
    if accelerator.is_main_process:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps({"model": args.model, "results": results}, indent=2,
                                                          ensure_ascii=False))
        table = markdown_table(results)
        (args.out / "results.md").write_text(f"model: {args.model}\n\n{table}\n", encoding="utf-8")
        print(table)
    return results


if __name__ == "__main__":
    main()
