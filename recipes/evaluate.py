"""Chinese zero-shot evaluation of any model `load_pretrained` reads.

    python recipes/evaluate.py --model <.pt | HF dir | our model dir> [--config SUITE.yaml [key=value ...]] \
        [--retrieval <set>[:split] ...] [--classification <folder>[:labels] ...] [--templates FILE] \
        [--out results/] [--batch-size N] [--save-features]
    accelerate launch --multi_gpu --num_processes 8 recipes/evaluate.py ...   # features computed across ranks

--config runs the sets a config's eval.sets lists (recipes/configs/eval_suite_zh.yaml: MUGE,
Flickr30K-CN, COCO-CN and ImageNet-CN, with Chinese-CLIP's published ViT-B/16 zero-shot numbers
beside ours); key=value overrides its entries (eval.sets.0.path=...). The flags add sets:

--retrieval takes a dataset in Chinese-CLIP's layout ({split}_imgs.tsv + {split}_texts.jsonl; split
"valid" unless given after a colon) or our shards (a directory of .parquet files, a file or a glob),
and may be repeated. The scores (text->image and image->text R@1/5/10, each direction's mean and
the mean of all six, in %) go to results.json and results.md in --out and are printed as a table.
--save-features also writes the features in Chinese-CLIP's jsonl format under
--out/features/<set>/, for its own make_topk_predictions*.py and evaluation*.py: a set in its layout
gets its integer ids; our shards' ids are their row ids ("00000-000012"), strings its scripts refuse.

--classification takes an image folder with one sub-folder per class (sorted by name) and, after a
colon, a label file (line i: the i-th folder's Chinese class name) or "cn_clip" for the ImageNet
class names in the cn_clip package; without one, the label_cn.txt in or beside the folder, as
Chinese-CLIP's zero-shot datasets come. Prompts are the 183 that Chinese-CLIP's zero-shot script
uses for ImageNet unless --templates names a file (one template per line, {} for the class name)
or another cn_clip list (cn_clip:food, cn_clip:aircraft, ... cn_clip:imagenet); each class
embedding is the mean over the templates. It reports top-1, top-5 and per-class top-1 and the
sha256 of the labels and templates.

Batch size and DataLoader workers are --config's eval.batch_size and eval.num_workers (256 and 2
without --config) unless --batch-size or --num-workers is given.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from chinese_clip.checkpoints import load_pretrained, pretrained_vocab
from chinese_clip.config import Config, ConfigError, EvalSetConfig, TrainConfig, load_config
from chinese_clip.data.loaders import build_collator
from chinese_clip.evaluation.retrieval_set import is_shard_path
from chinese_clip.evaluation.tasks import evaluate_set, markdown_table, read_sets
from chinese_clip.redact import redact_url
from chinese_clip.runtime import build_accelerator, eval_autocast, set_cpu_threads
from chinese_clip.tokenizer import load_tokenizer


def flag_sets(args: argparse.Namespace) -> list[EvalSetConfig]:
    sets = []
    for entry in args.retrieval:
        head, _, tail = entry.rpartition(":")
        path, split = (head, tail) if head and "/" not in tail else (entry, "")  # s3://... is a path, not a split
        name = Path(path).name if is_shard_path(path) else f"{Path(path).name}/{split or 'valid'}"
        sets.append(EvalSetConfig(name=name, task="retrieval", path=path, split=split or "valid"))
    for entry in args.classification:
        path, _, labels = entry.partition(":")
        sets.append(EvalSetConfig(name=Path(path).name, task="classification", path=path, labels=labels or None,
                                  templates=args.templates))
    return sets


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--model-name", help="a Chinese-CLIP architecture for a .pt (ViT-B-16, ViT-H-14, ...)")
    parser.add_argument("--config", help="a config whose eval.sets to run (e.g. recipes/configs/eval_suite_zh.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of --config")
    parser.add_argument("--retrieval", action="append", default=[], metavar="DIR[:SPLIT]")
    parser.add_argument("--classification", action="append", default=[], metavar="FOLDER[:LABELS]")
    parser.add_argument("--templates", metavar="FILE|cn_clip:NAME",
                        help="prompt templates: a file (one per line, {} for the class name) or a list in cn_clip")
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--batch-size", type=int, help="images or texts per forward (default: eval.batch_size, 256)")
    parser.add_argument("--context-length", type=int,
                        help="text tokens (default: --config's data.context_length, else Chinese-CLIP's 52)")
    parser.add_argument("--save-features", action="store_true")
    parser.add_argument("--num-workers", type=int, help="DataLoader workers decoding images (default: eval.num_workers, 2)")
    args = parser.parse_args(argv)
    if args.overrides and not args.config:
        parser.error("key=value overrides apply to --config")
    try:
        cfg = load_config(args.config, args.overrides) if args.config else Config()
        configured = cfg.eval.sets + flag_sets(args)
        if not configured:
            parser.error("name at least one evaluation set (--config, --retrieval or --classification)")
        sets = read_sets(configured)  # each read once, here
        model = load_pretrained(args.model, args.model_name)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {redact_url(str(e))}")  # it may name a set's URL
    threads = set_cpu_threads(cfg.train.cpu_threads)  # `accelerate launch` alone would give it one
    accelerator = build_accelerator(TrainConfig(), args.out)
    model = model.to(accelerator.device)
    batch_size = args.batch_size or cfg.eval.batch_size
    num_workers = cfg.eval.num_workers if args.num_workers is None else args.num_workers
    accelerator.print(f"model: {args.model}  processes: {accelerator.num_processes}  device: {accelerator.device}  "
                      f"{threads}  batch size: {batch_size}  workers: {num_workers}")
    context_length = args.context_length or cfg.data.context_length
    collator = build_collator(cfg.data, load_tokenizer(pretrained_vocab(args.model), context_length))
    results = {}
    for evaluated in sets:
        name = evaluated.entry.name
        features = args.out / "features" / name if args.save_features else None
        try:
            with eval_autocast(cfg.eval, accelerator.device):
                results[name] = evaluate_set(model, evaluated, collator, accelerator.device, batch_size, features,
                                             num_workers)
        except (FileNotFoundError, ValueError) as e:  # an image that does not decode shows only now
            sys.exit(f"error: {name}: {redact_url(str(e))}")
        if results[name].get("empty_classes"):
            accelerator.print(f"{name}: classes without images (candidates only): "
                              f"{', '.join(results[name]['empty_classes'])}")
    if accelerator.is_main_process:
        args.out.mkdir(parents=True, exist_ok=True)
        references = {s.entry.name: s.entry.reference for s in sets if s.entry.reference}
        (args.out / "results.json").write_text(json.dumps(
            {"model": args.model, "results": results,
             **({"reference": {"name": cfg.eval.reference_name, "scores": references}} if references else {})},
            indent=2, ensure_ascii=False))
        table = markdown_table(results, references, cfg.eval.reference_name or "published")
        (args.out / "results.md").write_text(f"model: {args.model}\n\n{table}\n", encoding="utf-8")
        print(table)
    return results


if __name__ == "__main__":
    main()
