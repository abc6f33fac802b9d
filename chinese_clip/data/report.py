"""What a dataset looks like: counts, caption and image-size distributions, a histogram plot and a
page of sample pairs. Image sizes come from the file headers, so nothing is fully decoded except
the samples shown."""
from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image
from tqdm import tqdm

from chinese_clip.data.captions import words
from chinese_clip.data.readers import RawPair


@dataclass
class DataStats:
    pairs: int = 0
    unreadable: dict[str, int] = field(default_factory=dict)  # reason -> count: no caption, no image, bad header
    caption_chars: list[int] = field(default_factory=list)
    caption_words: list[int] = field(default_factory=list)  # jieba words
    widths: list[int] = field(default_factory=list)
    heights: list[int] = field(default_factory=list)

    def summary(self) -> dict:
        """Percentiles of each distribution, as printed and saved."""
        out = {"pairs": self.pairs, "measured": len(self.widths), "unreadable": dict(self.unreadable)}
        sides = np.array([self.widths, self.heights], dtype=float)
        series = {"caption characters": self.caption_chars, "caption jieba words": self.caption_words,
                  "image width": self.widths, "image height": self.heights,
                  "aspect (long / short side)": list(sides.max(0) / sides.min(0)) if self.widths else []}
        for name, values in series.items():
            if values:
                p = np.percentile(values, [5, 50, 95])
                out[name] = {"min": float(min(values)), "p5": float(p[0]), "median": float(p[1]), "p95": float(p[2]),
                             "max": float(max(values))}
        return out


def collect(pairs: Iterable[RawPair], limit: int | None = None, samples: int = 24,
            seed: int = 0) -> tuple[DataStats, list[tuple[bytes, str]]]:
    """Statistics of the first `limit` pairs (all when None) and a uniform sample of `samples` of them."""
    stats, chosen = DataStats(), []
    rng = np.random.default_rng(seed)
    for pair in tqdm(pairs, total=limit, unit="pair", desc="inspect", mininterval=1.0):
        if limit is not None and stats.pairs >= limit:
            break
        stats.pairs += 1
        problem = pair.problem or ("no caption" if not pair.caption else None) or ("no image" if not pair.image else None)
        size = None
        if problem is None:
            try:
                size = Image.open(io.BytesIO(pair.image)).size  # the header only
            except Exception:  # PIL raises many types for a file it cannot identify
                problem = "image header unreadable"
        if problem is not None:
            kind = problem.split(":")[0]
            stats.unreadable[kind] = stats.unreadable.get(kind, 0) + 1
            continue
        stats.caption_chars.append(len(pair.caption))
        stats.caption_words.append(len(words(pair.caption)))
        stats.widths.append(size[0])
        stats.heights.append(size[1])
        # reservoir sampling: every measured pair is equally likely to be shown
        if len(chosen) < samples:
            chosen.append((pair.image, pair.caption))
        elif (slot := int(rng.integers(len(stats.widths)))) < samples:
            chosen[slot] = (pair.image, pair.caption)
    return stats, chosen


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    return plt


def plot_scores(kept: np.ndarray, dropped: np.ndarray, threshold: float) -> bytes:
    """A PNG: the histogram of curation scores, kept and dropped pairs stacked, the threshold marked."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(8, 4.5))
    scores = np.concatenate([kept, dropped])
    bins = np.linspace(scores.min(), scores.max() + 1e-6, 50)
    axis.hist([dropped, kept], bins=bins, stacked=True, color=["#cc6677", "#4477aa"],
              label=[f"dropped ({len(dropped):,})", f"kept ({len(kept):,})"])
    axis.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.4f}")
    axis.set_xlabel("image-text cosine")
    axis.set_ylabel("pairs")
    axis.legend()
    figure.tight_layout()
    out = io.BytesIO()
    figure.savefig(out, format="png", dpi=100)
    plt.close(figure)
    return out.getvalue()


def plot(stats: DataStats, path: Path) -> None:
    plt = _pyplot()

    sides = np.array([stats.widths, stats.heights], dtype=float)
    panels = [("caption length (characters)", stats.caption_chars, False),
              ("caption length (jieba words)", stats.caption_words, False),
              ("image shorter side (px)", list(sides.min(0)) if stats.widths else [], True),
              ("aspect ratio (long / short side)", list(sides.max(0) / sides.min(0)) if stats.widths else [], True)]
    figure, axes = plt.subplots(2, 2, figsize=(10, 7))
    for axis, (title, values, log) in zip(axes.flat, panels):
        if values:
            log = log and max(values) > 4 * min(values)  # a log axis over a narrow range has unreadable ticks
            bins = np.geomspace(max(min(values), 1e-3), max(values) * 1.0001, 40) if log else 40
            axis.hist(values, bins=bins, color="#4477aa")
            if log:
                axis.set_xscale("log")
        axis.set_title(title)
        axis.set_ylabel("pairs")
    figure.suptitle(f"{len(stats.widths):,} pairs measured of {stats.pairs:,} read")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def sample_page(samples: Iterable[tuple[Image.Image, str, str]], title: str) -> str:
    """A self-contained HTML page: each image (as an inline PNG thumbnail) with its caption and a note."""
    cells = []
    for image, caption, note in samples:
        image = image.convert("RGB")
        image.thumbnail((160, 160))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data = base64.b64encode(buffer.getvalue()).decode()
        cells.append(f'<figure><img src="data:image/png;base64,{data}"><figcaption>{html.escape(caption)}'
                     f'<br><small>{html.escape(note)}</small></figcaption></figure>')
    return (f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{display:flex;flex-wrap:wrap;font-family:sans-serif}figure{width:170px;margin:6px}</style>"
            + "".join(cells))
