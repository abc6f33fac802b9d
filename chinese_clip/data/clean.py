"""Shards -> shards with clean, distinct captions, and a report of every row removed and why.

Each caption is normalised again (with the current rules, and optionally traditional characters
to simplified), filtered by `caption_problem` (which now also names emoji-only captions), and
compared with the captions kept before it: an identical one, or one whose jieba word-bigram
shingles overlap it by at least `near_threshold` (Jaccard), is a duplicate. MinHash LSH at a
lower threshold finds the candidates, so the pass stays linear; the exact Jaccard of the
shingles decides. Near-duplicate search holds each kept caption's shingles (~1 KB): about 10 GB
for 10 M captions; `near_threshold=None` keeps only a 16-byte digest per caption. Web alt texts repeat boilerplate ("高清大图",
shop templates) that would otherwise be a large share of every batch.

`dedup="captions"` compares captions alone, for web-scraped pairs. Datasets that pair one query
with several images on purpose (MUGE) use "pairs" (only an identical caption on a byte-identical
image is removed) or "none". Image bytes are copied unchanged; shard i of the input becomes shard
i of the output and `removed/{i:05d}.jsonl`, so every input row is in exactly one of the two.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq
from datasketch import MinHash, MinHashLSH
from tqdm import tqdm

from chinese_clip.data.captions import CaptionRules, caption_problem, normalise_caption, words

NUM_PERM = 64  # MinHash permutations: ~10k captions/s; estimates within ~0.06 (1 sd at 0.8)
CANDIDATE_MARGIN = 0.2  # LSH looks this far below the threshold, so that estimation error misses almost nothing


@dataclass(frozen=True)
class CleanRules:
    caption: CaptionRules = CaptionRules()
    dedup: Literal["captions", "pairs", "none"] = "captions"
    near_threshold: float | None = 0.8  # Jaccard of word-bigram shingles; None: exact duplicates only
    to_simplified: bool = False  # needs opencc (pip install opencc-python-reimplemented)


def shingles(caption: str) -> set[bytes]:
    """Word bigrams (the words themselves for a one-word caption): order-aware, spacing-blind."""
    tokens = words(caption)
    grams = [" ".join(pair) for pair in zip(tokens, tokens[1:])] or tokens
    return {gram.encode() for gram in grams}


class Deduplicator:
    """Remembers the kept captions; `duplicate_of(key, caption)` names an earlier one it repeats."""

    def __init__(self, rules: CleanRules):
        self.rules = rules
        self.exact: dict[bytes, str] = {}
        if self.near:
            self.lsh = MinHashLSH(threshold=max(0.3, rules.near_threshold - CANDIDATE_MARGIN), num_perm=NUM_PERM)
        self.shingles: dict[str, frozenset[bytes]] = {}

    @property
    def near(self) -> bool:
        return self.rules.dedup == "captions" and self.rules.near_threshold is not None

    def duplicate_of(self, row_id: str, caption: str, image: bytes) -> str | None:
        """None for a caption to keep (now remembered), else the reason naming the row it repeats."""
        if self.rules.dedup == "none":
            return None
        key = caption.encode() if self.rules.dedup == "captions" else caption.encode() + hashlib.sha1(image).digest()
        digest = hashlib.blake2b(key, digest_size=16).digest()
        if digest in self.exact:
            return f"exact duplicate of {self.exact[digest]}"
        if self.near:
            grams = frozenset(shingles(caption))
            signature = MinHash(num_perm=NUM_PERM)
            signature.update_batch(list(grams))
            for other in sorted(self.lsh.query(signature)):  # sorted: the earliest kept row is named
                similarity = len(grams & self.shingles[other]) / len(grams | self.shingles[other])
                if similarity >= self.rules.near_threshold:
                    return f"near duplicate of {other} (Jaccard {similarity:.2f})"
            self.lsh.insert(row_id, signature)
            self.shingles[row_id] = grams
        self.exact[digest] = row_id
        return None


def clean_shards(source: str | Path, out_dir: str | Path, rules: CleanRules = CleanRules()) -> dict:
    """Write cleaned shards, `removed/*.jsonl` and `summary.json`; returns the counts."""
    source, out_dir = Path(source), Path(out_dir)
    shards = sorted(source.glob("shard-*.parquet"))
    if not shards:
        raise FileNotFoundError(f"{source}: no shard-*.parquet files (build them with data_tools/build_shards.py)")
    convert = _simplifier() if rules.to_simplified else None
    (out_dir / "removed").mkdir(parents=True, exist_ok=True)
    dedup = Deduplicator(rules)
    counts = {"inputs": 0, "written": 0, "removed": 0, "captions_changed": 0, "reasons": Counter()}
    total = sum(pq.ParquetFile(shard).metadata.num_rows for shard in shards)
    with tqdm(total=total, unit="caption", desc="clean captions", mininterval=1.0) as bar:
        for shard in shards:
            table = pq.read_table(shard)
            keep, captions, removed = [], [], []
            for row_id, original, image in zip(*(table[c].to_pylist() for c in ("id", "caption", "image"))):
                caption = normalise_caption(convert(original) if convert else original)
                reason = caption_problem(caption, rules.caption) or dedup.duplicate_of(row_id, caption, image)
                keep.append(reason is None)
                if reason is None:
                    captions.append(caption)
                    counts["captions_changed"] += caption != original
                else:
                    removed.append({"id": row_id, "caption": original, "reason": reason})
                    counts["reasons"][reason.split(" of ")[0].split(":")[0]] += 1
            kept = table.filter(pa.array(keep, pa.bool_()))
            kept = kept.set_column(kept.schema.get_field_index("caption"), "caption", pa.array(captions, pa.string()))
            name = shard.name.removeprefix("shard-").removesuffix(".parquet")
            (out_dir / "removed" / f"{name}.jsonl").write_text(
                "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in removed), encoding="utf-8")
            partial = out_dir / f"{shard.name}.partial"
            pq.write_table(kept, partial)
            partial.replace(out_dir / shard.name)
            counts["inputs"] += table.num_rows
            counts["written"] += kept.num_rows
            counts["removed"] += len(removed)
            bar.update(table.num_rows)
    # "written" is what training's start-up check compares the shards against.
    (out_dir / "summary.json").write_text(json.dumps({**counts, "reasons": dict(counts["reasons"])}, indent=2))
    return counts


def _simplifier():
    try:
        from opencc import OpenCC
    except ImportError:
        raise RuntimeError("traditional-to-simplified conversion needs opencc: "
                           "pip install opencc-python-reimplemented") from None
    return OpenCC("t2s").convert


def clean_summary(counts: dict) -> str:
    lines = [f"{'captions read':<32}{counts['inputs']:>10,}", f"{'kept':<32}{counts['written']:>10,}",
             f"{'  of which rewritten':<32}{counts['captions_changed']:>10,}", f"{'removed':<32}{counts['removed']:>10,}"]
    lines += [f"  {reason:<30}{n:>10,}" for reason, n in Counter(counts["reasons"]).most_common()]
    return "\n".join(lines)
