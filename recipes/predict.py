"""Put a trained model to work: zero-shot classification with Chinese labels, and image search.

    python recipes/predict.py classify --model runs/<name>/model photos/ cat.jpg --labels 猫,狗,汽车 [--out preds.json]
    python recipes/predict.py index --model runs/<name>/model --source photos/ --index photos.index
    python recipes/predict.py search --index photos.index 海边的日落 [--top-k 10] [--out hits.json] [--html hits.html]
    python recipes/predict.py search --index photos.index --image query.jpg       # image-to-image
    python recipes/predict.py serve --index photos.index [--port 8000] [--allow-host NAME]  # the search page

--model takes anything `load_pretrained` reads: a run's model/ or best/, an export, an HF
ChineseCLIPModel directory or a Chinese-CLIP .pt. `classify` takes image files and folders (searched
recursively) and prints each image's most probable labels; the probabilities of every label go to
--out as JSON. Prompts are Chinese-CLIP's 183 ImageNet templates unless --template (repeatable,
{} for the label) or --templates (a file, or cn_clip:<name>) says otherwise.

`index` encodes an image folder or our shards (data_tools/build_shards.py) once into a feature
index; run it again after adding images and only the new ones are encoded. `search` and `serve` use
the model the index was built with.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from urllib.parse import quote

from chinese_clip.config import ConfigError
from chinese_clip.data.readers import image_files
from chinese_clip.inference import Predictor, load_model
from chinese_clip.search.app import SearchService, make_server
from chinese_clip.search.index import ImageIndex, check_apart, remove_index
from chinese_clip.search.page import gallery


def images_named(paths: list[str]) -> list[Path]:
    """The files given, and the images in the folders given."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = image_files(path)
            if not found:
                raise FileNotFoundError(f"{path}: no images in this folder")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such image file or folder")
    return files


def read_labels(args: argparse.Namespace) -> list[str]:
    if args.labels_file:
        labels = [line.strip() for line in Path(args.labels_file).read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        labels = [label.strip() for label in args.labels.replace("，", ",").split(",") if label.strip()]
    if len(labels) < 2:
        raise ValueError("give at least two labels (--labels 猫,狗 or --labels-file, one per line)")
    return labels


def classify(args: argparse.Namespace) -> list[dict]:
    predictor = load_model(args.model, batch_size=args.batch_size, num_workers=args.num_workers)
    files, labels = images_named(args.images), read_labels(args)
    probabilities = predictor.probabilities(predictor.encode_images(files),
                                            predictor.classifier(labels, args.template or args.templates))
    top = min(args.top_k, len(labels))
    predictions = []
    for file, row in zip(files, probabilities):
        best = row.topk(top)
        predictions.append({"image": str(file), "top": [{"label": labels[i], "probability": round(p, 6)}
                                                         for p, i in zip(best.values.tolist(), best.indices.tolist())],
                            "probabilities": {label: round(p, 6) for label, p in zip(labels, row.tolist())}})
    for prediction in predictions:
        print(f"{prediction['image']}\t" + "\t".join(f"{t['label']} {t['probability']:.1%}" for t in prediction["top"]))
    if args.out:
        write(args.out, json.dumps({"model": args.model, "labels": labels, "predictions": predictions},
                                   indent=2, ensure_ascii=False))
    return predictions


def build_index(args: argparse.Namespace) -> dict:
    index_dir = Path(args.index)
    check_apart(index_dir, args.source)
    if args.rebuild:
        remove_index(index_dir)
    predictor = load_model(args.model, batch_size=args.batch_size, num_workers=args.num_workers)
    counts = ImageIndex(index_dir).build(args.source, predictor, args.model)
    print(f"index {index_dir}: {counts['images']} images ({counts['added']} added, {counts['kept']} kept, "
          f"{counts['removed']} removed or changed, {len(counts['unreadable'])} unreadable)")
    return counts


def open_index(args: argparse.Namespace) -> tuple[ImageIndex, Predictor]:
    index = ImageIndex.open(args.index)
    model = args.model or index.meta["model"]["path"]
    if not Path(model).exists():
        raise FileNotFoundError(f"{model}: the model the index was built with is not there; give --model")
    index.check_model(model)
    return index, load_model(model, batch_size=args.batch_size, num_workers=0)


def search(args: argparse.Namespace) -> list[dict]:
    if bool(args.query) == bool(args.image):
        raise ValueError("give a text query or --image, one of them")
    index, predictor = open_index(args)
    features = predictor.encode_texts(args.query) if args.query else predictor.encode_images(Path(args.image))
    hits = index.search(features[0], args.top_k)
    for hit in hits:
        print(f"{hit.rank}\t{hit.score:.4f}\t{hit.key}" + (f"\t{hit.caption}" if hit.caption else ""))
    results = [hit.to_dict() for hit in hits]
    query = args.query or f"image {args.image}"
    if args.out:
        write(args.out, json.dumps({"query": query, "index": args.index, "results": results}, indent=2, ensure_ascii=False))
    if args.html:
        html_dir = Path(args.html).resolve().parent  # images linked relative to the page, which can then move with them
        write(args.html, gallery(query, hits, lambda hit: quote(Path(os.path.relpath(Path(hit.image).resolve(), html_dir))
                                                                .as_posix())))
    return results


def serve(args: argparse.Namespace) -> None:
    index, predictor = open_index(args)
    server = make_server(SearchService(index, predictor), args.host, args.port, args.allow_host)
    host, port = server.server_address[:2]
    print(f"search page: http://{host}:{port}/ ({len(index.items)} images; Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def write(path: str, text: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text, encoding="utf-8")
    print(f"wrote {path}")


def parser() -> argparse.ArgumentParser:
    main_parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = main_parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.add_argument("--batch-size", type=int, default=64)
        sub.add_argument("--num-workers", type=int, default=2, help="DataLoader workers decoding images")
        return sub

    sub = command("classify", "zero-shot classification of images with Chinese labels")
    sub.add_argument("--model", required=True)
    sub.add_argument("images", nargs="+", help="image files and folders")
    labels = sub.add_mutually_exclusive_group(required=True)
    labels.add_argument("--labels", help="comma-separated: 猫,狗,汽车")
    labels.add_argument("--labels-file", help="one label per line")
    templates = sub.add_mutually_exclusive_group()
    templates.add_argument("--template", action="append", help="a prompt with {} for the label (repeatable)")
    templates.add_argument("--templates", help="a template file (one per line) or cn_clip:<name>")
    sub.add_argument("--top-k", type=int, default=3)
    sub.add_argument("--out", help="JSON file of every image's label probabilities")

    sub = command("index", "build or update a feature index of an image folder or shards")
    sub.add_argument("--model", required=True)
    sub.add_argument("--source", required=True, help="an image folder, or our .parquet shards")
    sub.add_argument("--index", required=True, help="the index directory")
    sub.add_argument("--rebuild", action="store_true", help="start the index again (another model, say)")

    sub = command("search", "query an index with Chinese text or an image")
    sub.add_argument("--index", required=True)
    sub.add_argument("query", nargs="?", help="Chinese text")
    sub.add_argument("--image", help="an image to find similar ones to")
    sub.add_argument("--model", help="default: the model the index was built with")
    sub.add_argument("--top-k", type=int, default=10)
    sub.add_argument("--out", help="results as JSON")
    sub.add_argument("--html", help="results as an HTML gallery")

    sub = command("serve", "the search page over an index")
    sub.add_argument("--index", required=True)
    sub.add_argument("--model", help="default: the model the index was built with")
    sub.add_argument("--host", default="127.0.0.1")
    sub.add_argument("--port", type=int, default=8000, help="0 picks a free one")
    sub.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                     help="a host name users reach the server by (besides --host, localhost and IP addresses); "
                          "requests naming any other host are refused (DNS rebinding)")
    return main_parser


def main(argv: list[str] | None = None):
    args = parser().parse_args(argv)
    run = {"classify": classify, "index": build_index, "search": search, "serve": serve}[args.command]
    try:
        return run(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:  # SearchIndexError is a ValueError
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
