"""Curating noisy image-text pairs by a model's score: each pair's image-text cosine under a trained
CLIP, and only the pairs above a threshold (or the best fraction) kept for training.

    OUT/work/clean/                 build_shards' output of the input (its quarantine: what is unusable)
    OUT/work/scores/NNNNN.parquet   id and score of every pair of clean shard NNNNN (written once)
    OUT/shard-NNNNN.parquet         the kept pairs of clean shard NNNNN, with a score column
    OUT/quarantine/NNNNN.jsonl      every input dropped, with its reason (unusable, or its score)
    OUT/summary.json                build_shards' counts (training checks its shards against them), the threshold
    OUT/report/                     what a person reads before choosing a threshold: report.json (counts by
                                    reason and by input, score quantiles), scores.png (kept and dropped),
                                    examples.html (the pairs at every tenth quantile of the scores, inline)

Cleaning and scoring are the slow steps and resume shard by shard after an interruption; choosing
another threshold reuses both and rewrites only OUT's shards. OUT is build_shards' layout, so
training reads it as any shards (and `data.shards[].min_score` raises the threshold further).
"""
from __future__ import annotations

import io
import json
import math
import os
import re
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from chinese_clip.checkpoints import model_stamp
from chinese_clip.data.readers import Part, RawPair
from chinese_clip.data.report import plot_scores, sample_page
from chinese_clip.data.shards import PART_NAME, SCHEMA, ShardRules, build_shards, check_parts, part_directory
from chinese_clip.inference import Predictor

CURATED_SCHEMA = SCHEMA.append(pa.field("score", pa.float32()))
QUANTILES = [q / 10 for q in range(11)]  # the report shows the pair at each: lowest, p10, ..., highest


class CurateError(ValueError):
    """An input or a threshold that leaves nothing to write; str() says which."""


def score_shards(clean_dir: Path, scores_dir: Path, predictor: Predictor, model: dict) -> None:
    """The score of every pair of each clean shard that has none yet by `model` (its model_stamp): the
    cosine of its image and caption features, images decoded in the predictor's DataLoader workers."""
    scores_dir.mkdir(parents=True, exist_ok=True)
    stamp = scores_dir / "model.json"
    if not stamp.is_file() or json.loads(stamp.read_text()) != model:  # another model's scores mean nothing here
        for file in scores_dir.glob("*.parquet"):
            file.unlink()
        stamp.write_text(json.dumps(model, indent=2))
    shards = sorted(clean_dir.glob("shard-*.parquet"))
    todo = [s for s in shards if not (scores_dir / f"{s.name[6:11]}.parquet").is_file()]
    rows = sum(pq.ParquetFile(s).metadata.num_rows for s in todo)
    with tqdm(total=rows, unit="pair", desc="score", mininterval=1.0, disable=not todo) as bar:
        for shard in todo:
            table = pq.read_table(shard, columns=["id", "caption", "image"])
            images, errors = predictor.encode_readable(table.column("image").to_pylist())
            if errors:  # build_shards decoded every image it wrote: a shard changed since
                raise CurateError(f"{shard}: {errors[0]}; remove {clean_dir} to clean the input again")
            texts = predictor.encode_texts(table.column("caption").to_pylist())
            scores = (images * texts).sum(dim=1)
            target = scores_dir / f"{shard.name[6:11]}.parquet"
            partial = target.with_name(target.name + ".partial")
            pq.write_table(pa.table({"id": table.column("id"), "score": pa.array(scores.tolist(), pa.float32())}), partial)
            partial.replace(target)
            bar.update(len(table))


def threshold_of(scores: list[float], min_score: float | None, keep_fraction: float | None) -> float:
    """The lowest score kept: `min_score`, or the score of the last pair in the best `keep_fraction` of them."""
    if not scores:
        raise CurateError("no usable pairs to score")
    if min_score is not None:
        threshold = min_score
    else:
        threshold = sorted(scores, reverse=True)[math.ceil(keep_fraction * len(scores)) - 1]
    if max(scores) < threshold:
        raise CurateError(f"the threshold {threshold:.4f} keeps none of the {len(scores):,} pairs (the best scores "
                          f"{max(scores):.4f}): lower it")
    return threshold


def units(work: Path) -> list[str]:
    """The parts of a curation split with --part ("part-IIIII-of-NNNNN"), every one cleaned and scored, or
    [""] for a curation in one piece."""
    clean = work / "clean"
    parts = sorted(d.name for d in clean.iterdir() if PART_NAME.fullmatch(d.name)) if clean.is_dir() else []
    if parts:
        try:
            check_parts(clean)  # every part there and finished, every input of the source in exactly one
        except ValueError as e:
            raise CurateError(f"{e} (curate --part I/N cleans and scores part I)") from None
    elif not (clean / "summary.json").is_file():
        raise CurateError(f"{clean}: the cleaning did not finish; run the same curate command again")
    for part in parts or [""]:
        shards = {s.name[6:11] for s in (clean / part).glob("shard-*.parquet")}
        if shards - {s.stem for s in (work / "scores" / part).glob("*.parquet")}:
            raise CurateError(f"{clean / part} is cleaned but not all scored: run the same curate command again")
    return parts or [""]


def select(work: Path, out: Path, min_score: float | None, keep_fraction: float | None) -> dict:
    """OUT's shards, quarantine and summary (in part directories as the clean shards are) from the clean
    shards and their scores, the threshold taken over all of them. Every new file is written aside
    first and all are moved in at the end, each summary last."""
    check_threshold(min_score, keep_fraction)
    if not (work / "input.json").is_file():
        raise CurateError(f"{work.parent}: nothing curated here (no work/input.json)")
    parts = units(work)
    scores = {}  # by part and id: build_shards' ids repeat across parts
    for part in parts:
        for file in sorted((work / "scores" / part).glob("*.parquet")):
            table = pq.read_table(file)
            scores.update(zip((f"{part}/{i}" for i in table.column("id").to_pylist()), table.column("score").to_pylist()))
    threshold = threshold_of(list(scores.values()), min_score, keep_fraction)
    counts = {"inputs": 0, "written": 0, "quarantined": 0, "reasons": Counter(), "threshold": threshold}
    ready, summaries = [], []
    by_input: dict[str, Counter] = {}
    ranked = sorted(scores, key=scores.get)
    shown = {ranked[round(q * (len(ranked) - 1))]: q for q in QUANTILES}
    examples = []
    for part in parts:
        clean, part_out = work / "clean" / part, out / part
        cleaned = json.loads((clean / "summary.json").read_text())
        part_counts = {**cleaned, "written": 0, "quarantined": 0, "reasons": Counter(cleaned["reasons"])}
        (part_out / "quarantine").mkdir(parents=True, exist_ok=True)
        for shard in sorted(clean.glob("shard-*.parquet")):
            number = shard.name[6:11]
            kept, dropped = [], []
            for row in pq.read_table(shard).to_pylist():
                score = scores[f"{part}/{row['id']}"]
                by_input.setdefault(input_name(row["source"]), Counter())["kept" if score >= threshold else "dropped"] += 1
                if f"{part}/{row['id']}" in shown:
                    examples.append((shown[f"{part}/{row['id']}"], score, row))
                if score >= threshold:
                    kept.append({**row, "score": score})
                else:
                    dropped.append({"source": row["source"], "id": row["id"],
                                    "reason": f"score {score:.4f} under {threshold:.4f}"})
            unusable = (clean / "quarantine" / f"{number}.jsonl").read_text(encoding="utf-8")
            for line in unusable.splitlines():
                by_input.setdefault(input_name(json.loads(line)["source"]), Counter())["unusable"] += 1
            part_counts["written"] += len(kept)
            part_counts["quarantined"] += len(dropped) + len(unusable.splitlines())
            part_counts["reasons"]["score under the threshold"] += len(dropped)
            partial = part_out / f"{shard.name}.partial"
            pq.write_table(pa.Table.from_pylist(kept, schema=CURATED_SCHEMA), partial)
            listing = part_out / "quarantine" / f".{number}.jsonl.partial"
            listing.write_text(unusable + "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in dropped),
                               encoding="utf-8")
            ready += [(partial, part_out / shard.name), (listing, part_out / "quarantine" / f"{number}.jsonl")]
        summaries.append((part_out / "summary.json", {**part_counts, "reasons": dict(part_counts["reasons"])}))
        for key in ("inputs", "written", "quarantined"):
            counts[key] += part_counts[key]
        counts["reasons"].update(part_counts["reasons"])
    ready += write_report(out, counts, scores, threshold, by_input, sorted(examples, key=lambda e: e[0]))
    for summary, _ in summaries:  # until every shard is in, a directory is no finished build
        summary.unlink(missing_ok=True)
    (out / "summary.json").unlink(missing_ok=True)
    for partial, final in ready:
        os.replace(partial, final)
    counts["reasons"] = dict(counts["reasons"])
    if parts != [""]:  # each part its own build_shards summary (training and --check read them), and the whole
        for summary, part_counts in summaries:
            summary.write_text(json.dumps(part_counts, indent=2))
    (out / "summary.json").write_text(json.dumps(counts, indent=2))
    return counts


def input_name(source: str) -> str:
    """The input a pair came from, by its source key: the tar, table or folder before the first / or :."""
    return re.split(r"[/:]", source, maxsplit=1)[0]


def write_report(out: Path, counts: dict, scores: dict[str, float], threshold: float, by_input: dict[str, Counter],
                 examples: list[tuple[float, float, dict]]) -> list[tuple[Path, Path]]:
    """The report's files, written aside: (written, final name) of each."""
    report = out / "report"
    report.mkdir(exist_ok=True)
    values = np.array(list(scores.values()))
    summary = {"threshold": threshold, "inputs": counts["inputs"], "kept": counts["written"],
               "dropped": dict(Counter(counts["reasons"]).most_common()),
               "by_input": {name: dict(c) for name, c in sorted(by_input.items())},
               "score_quantiles": {f"p{round(q * 100)}": float(np.quantile(values, q)) for q in QUANTILES}}
    files = {"report.json": json.dumps(summary, indent=2, ensure_ascii=False).encode()}
    files["scores.png"] = plot_scores(values[values >= threshold], values[values < threshold], threshold)
    files["examples.html"] = sample_page(
        [(Image.open(io.BytesIO(row["image"])), row["caption"],
          f"p{round(q * 100)}: score {score:.4f}, {'kept' if score >= threshold else 'dropped'}")
         for q, score, row in examples], f"pairs at the score quantiles; threshold {threshold:.4f}").encode()
    ready = []
    for name, data in files.items():
        (report / f".{name}.partial").write_bytes(data)
        ready.append((report / f".{name}.partial", report / name))
    return ready


def curate(pairs: Iterable[RawPair], source: str, out: str | Path, model_path: str | Path, predictor: Predictor,
           min_score: float | None = None, keep_fraction: float | None = None, rules: ShardRules = ShardRules(),
           rows_per_shard: int = 1000, workers: int = 1, part: Part | None = None) -> dict:
    """Clean `pairs` (the RawPairs of `source`, or of `part` of it, as build_shards does) and score them with
    `predictor` (loaded from `model_path`). In one piece, then write the pairs at or above the threshold to
    `out` and return the counts (build_shards' keys, and the threshold); a part returns its cleaning's
    counts, and `select` takes the threshold over all parts once every one is scored. `part` is the one
    the reader of `pairs` was given (it counts what the reader took)."""
    part = part or Part()
    if part.count == 1:
        check_threshold(min_score, keep_fraction)
    out = Path(out)
    work = out / "work"
    made_from = {"source": source, "rules": asdict(rules), "rows_per_shard": rows_per_shard, "parts": part.count}
    if (work / "input.json").is_file():
        if (earlier := json.loads((work / "input.json").read_text())) != made_from:
            raise CurateError(f"{out} holds the curation of {earlier['source']} (with other rules, shard size or parts "
                              "if the same): curate into another --out")
    elif out.is_dir() and any(p.name != "work" for p in out.iterdir()):  # work/: another part started first
        raise CurateError(f"{out} holds other files: curate into a new directory (or one curate wrote)")
    work.mkdir(parents=True, exist_ok=True)
    (work / "input.json").write_text(json.dumps(made_from, indent=2, ensure_ascii=False))
    cleaned = build_shards(pairs, work / "clean", rules, rows_per_shard=rows_per_shard, workers=workers, part=part)
    if not cleaned["written"] and part.count == 1:
        reasons = ", ".join(f"{reason} {n:,}" for reason, n in Counter(cleaned["reasons"]).most_common(3))
        raise CurateError(f"no usable pairs among the {cleaned['inputs']:,} inputs ({reasons or 'the input is empty'})")
    clean_dir = part_directory(work / "clean", part)
    score_shards(clean_dir, work / "scores" / clean_dir.relative_to(work / "clean"), predictor, model_stamp(model_path))
    return select(work, out, min_score, keep_fraction) if part.count == 1 else cleaned


def check_threshold(min_score: float | None, keep_fraction: float | None) -> None:
    if (min_score is None) == (keep_fraction is None):
        raise CurateError("give --min-score or --keep-fraction, one of them")
    if keep_fraction is not None and not 0 < keep_fraction <= 1:
        raise CurateError(f"--keep-fraction must be in (0, 1], got {keep_fraction:g}")
