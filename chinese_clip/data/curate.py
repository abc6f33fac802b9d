"""Curating noisy image-text pairs by a model's score: each pair's image-text cosine under a trained
CLIP, and only the pairs above a threshold (or the best fraction) kept for training.

    OUT/work/clean/                 build_shards' output of the input (its quarantine: what is unusable)
    OUT/work/scores/NNNNN.parquet   id and score of every pair of clean shard NNNNN (written once)
    OUT/shard-NNNNN.parquet         the kept pairs of clean shard NNNNN, with a score column
    OUT/quarantine/NNNNN.jsonl      every input dropped, with its reason (unusable, or its score)
    OUT/summary.json                build_shards' counts (training checks its shards against them), the threshold

Cleaning and scoring are the slow steps and resume shard by shard after an interruption; choosing
another threshold reuses both and rewrites only OUT's shards. OUT is build_shards' layout, so
training reads it as any shards (and `data.shards[].min_score` raises the threshold further).
"""
from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from chinese_clip.data.readers import RawPair
from chinese_clip.data.shards import SCHEMA, ShardRules, build_shards
from chinese_clip.inference import Predictor

CURATED_SCHEMA = SCHEMA.append(pa.field("score", pa.float32()))


class CurateError(ValueError):
    """An input or a threshold that leaves nothing to write; str() says which."""


def score_shards(clean_dir: Path, scores_dir: Path, predictor: Predictor) -> None:
    """The score of every pair of each clean shard that has none yet: the cosine of its image and caption
    features, images decoded in the predictor's DataLoader workers."""
    scores_dir.mkdir(parents=True, exist_ok=True)
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
            scores = (images * texts).sum(dim=1) if len(table) else torch.empty(0)
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


def select(work: Path, out: Path, min_score: float | None, keep_fraction: float | None) -> dict:
    """OUT's shards, quarantine and summary from the clean shards and their scores. Every new file is
    written aside first and all are moved in at the end, the summary last."""
    clean, scores_dir = work / "clean", work / "scores"
    scores = {}
    for file in sorted(scores_dir.glob("*.parquet")):
        table = pq.read_table(file)
        scores.update(zip(table.column("id").to_pylist(), table.column("score").to_pylist()))
    threshold = threshold_of(list(scores.values()), min_score, keep_fraction)
    summary = json.loads((clean / "summary.json").read_text())
    counts = {"inputs": summary["inputs"], "written": 0, "quarantined": 0, "reasons": Counter(summary["reasons"]),
              "threshold": threshold}
    (out / "quarantine").mkdir(parents=True, exist_ok=True)
    ready = []
    for shard in sorted(clean.glob("shard-*.parquet")):
        number = shard.name[6:11]
        rows = pq.read_table(shard).to_pylist()
        kept, dropped = [], []
        for row in rows:
            score = scores[row["id"]]
            if score >= threshold:
                kept.append({**row, "score": score})
            else:
                dropped.append({"source": row["source"], "id": row["id"],
                                "reason": f"score {score:.4f} under {threshold:.4f}"})
        counts["written"] += len(kept)
        counts["reasons"]["score under the threshold"] += len(dropped)
        unusable = (clean / "quarantine" / f"{number}.jsonl").read_text(encoding="utf-8")
        counts["quarantined"] += len(dropped) + len(unusable.splitlines())
        partial = out / f"{shard.name}.partial"
        pq.write_table(pa.Table.from_pylist(kept, schema=CURATED_SCHEMA), partial)
        listing = out / "quarantine" / f".{number}.jsonl.partial"
        listing.write_text(unusable + "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in dropped), encoding="utf-8")
        ready += [(partial, out / shard.name), (listing, out / "quarantine" / f"{number}.jsonl")]
    (out / "summary.json").unlink(missing_ok=True)  # until every shard is in, the directory is no finished build
    for partial, final in ready:
        os.replace(partial, final)
    counts["reasons"] = dict(counts["reasons"])
    (out / "summary.json").write_text(json.dumps(counts, indent=2))
    return counts


def curate(pairs: Iterable[RawPair], out: str | Path, predictor: Predictor, min_score: float | None = None,
           keep_fraction: float | None = None, rules: ShardRules = ShardRules(), rows_per_shard: int = 1000,
           workers: int = 1) -> dict:
    """Clean `pairs` (RawPairs, as build_shards does), score them with `predictor` and write the pairs at
    or above the threshold to `out`; returns the counts (build_shards' keys, and the threshold)."""
    if (min_score is None) == (keep_fraction is None):
        raise CurateError("give --min-score or --keep-fraction, one of them")
    if keep_fraction is not None and not 0 < keep_fraction <= 1:
        raise CurateError(f"--keep-fraction must be in (0, 1], got {keep_fraction:g}")
    out = Path(out)
    work = out / "work"
    cleaned = build_shards(pairs, work / "clean", rules, rows_per_shard=rows_per_shard, workers=workers)
    if not cleaned["written"]:
        reasons = ", ".join(f"{reason} {n:,}" for reason, n in Counter(cleaned["reasons"]).most_common(3))
        raise CurateError(f"no usable pairs among the {cleaned['inputs']:,} inputs ({reasons or 'the input is empty'})")
    score_shards(work / "clean", work / "scores", predictor)
    return select(work, out, min_score, keep_fraction)

