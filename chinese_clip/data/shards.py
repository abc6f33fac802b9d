"""Raw pairs -> validated parquet shards, and a quarantine report for everything else.

Inputs are cut, in reading order, into chunks of `rows_per_shard`; chunk i becomes
`shard-{i:05d}.parquet` (its usable pairs: id, caption, JPEG bytes, width, height, source key) and
`quarantine/{i:05d}.jsonl` (one line per dropped input: source key and reason). The shard is
renamed into place last, so a chunk whose shard exists is complete: an interrupted build resumes
at the first missing one without duplicating rows. Every input lands in exactly one of the two.

A build split over machines (`Part` I of N) writes into `part-IIIII-of-NNNNN/` of the same output
directory, each part a complete build of its share with its own summary; `check_parts` then
accounts for every input across the parts, and training reads the directory as one source.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import re
from collections import Counter
from dataclasses import dataclass
from itertools import count, islice
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from chinese_clip.data.captions import CaptionRules, caption_problem, normalise_caption
from chinese_clip.data.images import BadImage, ImageRules, decode_image, encode_jpeg
from chinese_clip.data.readers import Part, RawPair

PART_NAME = re.compile(r"part-(\d{5})-of-(\d{5})")
SCHEMA = pa.schema([("id", pa.string()), ("caption", pa.string()), ("image", pa.binary()),
                    ("width", pa.int32()), ("height", pa.int32()), ("source", pa.string())])


@dataclass(frozen=True)
class ShardRules:
    image: ImageRules = ImageRules()
    caption: CaptionRules = CaptionRules()
    jpeg_quality: int = 95


def clean_pair(pair: RawPair, rules: ShardRules) -> tuple[dict | None, str | None]:
    """(shard row, None) or (None, reason)."""
    if pair.problem:
        return None, pair.problem
    caption = normalise_caption(pair.caption or "")
    problem = caption_problem(caption, rules.caption)
    if problem:
        return None, problem
    try:
        image = decode_image(pair.image or b"", rules.image)
    except BadImage as e:
        return None, str(e)
    return {"caption": caption, "image": encode_jpeg(image, rules.jpeg_quality), "width": image.width,
            "height": image.height, "source": pair.key}, None


def _clean_batch(args: tuple[list[RawPair], ShardRules]) -> list[tuple[dict | None, str | None]]:
    pairs, rules = args
    return [clean_pair(pair, rules) for pair in pairs]


def part_directory(out_dir: str | Path, part: Part) -> Path:
    return Path(out_dir) / f"part-{part.index:05d}-of-{part.count:05d}" if part.count > 1 else Path(out_dir)


def build_shards(pairs: Iterable[RawPair], out_dir: str | Path, rules: ShardRules = ShardRules(),
                 rows_per_shard: int = 1000, workers: int = 1, part: Part | None = None) -> dict:
    """Write the shards and the quarantine report; returns the counts (see `summary_table`). `part`:
    the one the reader of `pairs` was given, whose share goes into its own part directory."""
    out_dir = part_directory(out_dir, part or Part())
    (out_dir / "quarantine").mkdir(parents=True, exist_ok=True)
    counts = {"inputs": 0, "written": 0, "quarantined": 0, "shards_resumed": 0, "reasons": Counter()}
    pool = mp.get_context("spawn").Pool(workers) if workers > 1 else None
    stream = iter(pairs)
    bar = tqdm(unit="pair", desc="build shards", mininterval=1.0)  # readers stream: the total is unknown
    try:
        for index in count():
            chunk = list(islice(stream, rows_per_shard))
            if not chunk:
                break
            counts["inputs"] += len(chunk)
            shard = out_dir / f"shard-{index:05d}.parquet"
            if shard.is_file():  # finished before an interruption
                counts["shards_resumed"] += 1
                _count_existing(shard, out_dir / "quarantine" / f"{index:05d}.jsonl", counts)
            else:
                _write_chunk(index, chunk, shard, out_dir, rules, pool, workers, counts)
            bar.update(len(chunk))
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
    if part is not None and part.count > 1:
        counts["part"] = vars(part)
    (out_dir / "summary.json").write_text(json.dumps({**counts, "reasons": dict(counts["reasons"])}, indent=2))
    return counts


def check_parts(out_dir: str | Path) -> dict:
    """The parts of a split build, added up: every part present and finished, every input of the source
    in exactly one part (the parts' units add up to the source's), and in each part every input in a
    shard or the quarantine, no shard missing. Returns the summed counts; ValueError says what is wrong."""
    out_dir = Path(out_dir)
    found = {tuple(map(int, m.groups())): d for d in out_dir.iterdir() if (m := PART_NAME.fullmatch(d.name))} \
        if out_dir.is_dir() else {}
    if not found:
        raise ValueError(f"{out_dir}: no part-IIIII-of-NNNNN directories (build_shards --part I/N writes them)")
    counts = {n for _, n in found}
    if len(counts) > 1:
        raise ValueError(f"{out_dir}: parts of different splits ({', '.join(f'of {n}' for n in sorted(counts))})")
    [count] = counts
    if missing := [i for i in range(count) if (i, count) not in found]:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"{out_dir}: part {missing[0]}/{count} is missing{more}")
    totals = {"inputs": 0, "written": 0, "quarantined": 0, "shards_resumed": 0, "reasons": Counter()}
    seen, kept = set(), 0
    for index in range(count):
        directory = found[(index, count)]
        if not (directory / "summary.json").is_file():
            raise ValueError(f"{directory}: part {index}/{count} did not finish (no summary.json); run it again")
        summary = json.loads((directory / "summary.json").read_text())
        shards = sorted(directory.glob("shard-*.parquet"))
        if missing := sorted(set(range(len(shards))) - {int(f.name[6:11]) for f in shards}):
            raise ValueError(f"{directory}: shard-{missing[0]:05d}.parquet is missing")
        if sum(pq.ParquetFile(f).metadata.num_rows for f in shards) != summary["written"]:
            raise ValueError(f"{directory}: the shards hold other rows than the {summary['written']:,} part "
                             f"{index}/{count} wrote: a shard was removed or replaced")
        if summary["inputs"] != summary["written"] + summary["quarantined"]:
            raise ValueError(f"{directory}: {summary['inputs']:,} inputs, but {summary['written']:,} written and "
                             f"{summary['quarantined']:,} quarantined")
        seen.add((summary["part"]["unit"], summary["part"]["seen"]))
        kept += summary["part"]["kept"]
        for key in ("inputs", "written", "quarantined"):
            totals[key] += summary[key]
        totals["reasons"].update(summary["reasons"])
    if len(seen) > 1:
        raise ValueError(f"{out_dir}: the parts read different sources ({sorted(seen)})")
    [(unit, total)] = seen
    if kept != total:
        raise ValueError(f"{out_dir}: the parts took {kept:,} of the source's {total:,} {unit}")
    return totals


def _write_chunk(index: int, chunk: list[RawPair], shard: Path, out_dir: Path, rules: ShardRules, pool, workers: int,
                 counts: dict) -> None:
    batches = [chunk[i:i + 32] for i in range(0, len(chunk), 32)]
    jobs = [(batch, rules) for batch in batches]
    results = [r for batch in (pool.map(_clean_batch, jobs) if pool else map(_clean_batch, jobs)) for r in batch]
    rows, dropped = [], []
    for offset, (pair, (row, reason)) in enumerate(zip(chunk, results)):
        if row is None:
            dropped.append({"source": pair.key, "reason": reason})
            counts["reasons"][_reason_kind(reason)] += 1
        else:
            rows.append({"id": f"{index:05d}-{offset:06d}", **row})
    quarantine = out_dir / "quarantine" / f"{index:05d}.jsonl"
    quarantine.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in dropped), encoding="utf-8")
    partial = shard.with_name(shard.name + ".partial")
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), partial)
    partial.replace(shard)
    counts["written"] += len(rows)
    counts["quarantined"] += len(dropped)


def _count_existing(shard: Path, quarantine: Path, counts: dict) -> None:
    counts["written"] += pq.ParquetFile(shard).metadata.num_rows
    for line in quarantine.read_text(encoding="utf-8").splitlines():
        counts["quarantined"] += 1
        counts["reasons"][_reason_kind(json.loads(line)["reason"])] += 1


def _reason_kind(reason: str) -> str:
    """The reason without its particulars: "too small: 1x1, ..." -> "too small"."""
    return reason.split(":")[0]


def summary_table(counts: dict) -> str:
    lines = [f"{'inputs':<32}{counts['inputs']:>10,}", f"{'written to shards':<32}{counts['written']:>10,}",
             f"{'quarantined':<32}{counts['quarantined']:>10,}"]
    lines += [f"  {reason:<30}{n:>10,}" for reason, n in Counter(counts["reasons"]).most_common()]
    if counts["shards_resumed"]:
        lines.append(f"{'shards kept from an earlier run':<32}{counts['shards_resumed']:>10,}")
    return "\n".join(lines)

