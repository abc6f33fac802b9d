"""Training samples from parquet shards or webdataset tars, local or remote: streamed through
`datasets`, split across ranks and dataloader workers, shuffled in a buffer, mixed from several
sources by weight, and resumable to the exact sample.

Each (rank, worker) reads its own shards of each source: datasets' split_dataset_by_node gives a
rank its shards, and iterating inside a DataLoader worker gives that worker its share of them.
The rows come from plain generators that datasets shards by file: pyarrow for parquet (datasets'
parquet builder pauses 5 s whenever an iteration ends, a workaround for apache/arrow#45214, once
per epoch) and tars.py for tars. Tars hold raw web data: their captions are normalised and filtered
by the rules build_shards applies (a filtered sample is counted, and is not "bad"), their images
decoded and held to its size rules.
A worker's stream of a source is a pure function of (seed, epoch, rank, worker), since the shard
order and the shuffle buffer's draws are seeded, so its position is two numbers per source: the
epoch and the rows read in it. A resumed worker replays its streams up to there without decoding
an image. (datasets' own state_dict would drop the samples waiting in the shuffle buffer.) The
source of each sample is drawn by weight from a generator whose state is part of the position.
Every batch carries its worker's position after it; the trainer checkpoints the position of the
last batch it consumed, so batches prefetched but never trained on are read again on resume. The
batches are taken from the workers in turn, and whose turn is next is part of the position too: a
resumed run trains on the same batches at the same steps as one never interrupted.
"""
from __future__ import annotations

import copy
import hashlib
import json
import re
from bisect import bisect
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial
from itertools import accumulate, islice
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import fsspec
import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from chinese_clip.config import ConfigError, DataConfig
from chinese_clip.data.captions import caption_problem, normalise_caption
from chinese_clip.data.images import size_problem
from chinese_clip.data.shards import PART_NAME
from chinese_clip.data.storage import file_name, full_path, list_files, open_binary
from chinese_clip.data.tars import tar_samples
from chinese_clip.data.transforms import UnusableSample, build_transform, decode, seeded
from chinese_clip.redact import redact

if TYPE_CHECKING:
    import datasets

COLUMNS = ["id", "caption", "image"]
_SHARD_NAME = re.compile(r"shard-(\d{5})\.parquet")


class DataError(RuntimeError):
    """The data is worse than the run allows (data.max_bad_fraction); str() says what and where."""


class FilteredSample(UnusableSample):
    """A tar sample that build_shards' rules would not keep: counted, but not towards max_bad_fraction."""


@dataclass(frozen=True)
class ShardSource:
    path: str
    files: tuple[str, ...]  # the shards that hold rows (tars: all), in name order
    rows: int | None  # unknown for tars, which have no footer to count them from
    weight: float
    kind: str = "parquet"  # or "tar"
    min_score: float | None = None

    @property
    def columns(self) -> list[str]:
        return shard_columns(self.min_score)


def shard_columns(min_score: float | None) -> list[str]:
    """The columns training reads: a score too where a threshold filters by it."""
    return COLUMNS + (["score"] if min_score is not None else [])


def open_sources(cfg: DataConfig, world_size: int, say: Callable[[str], None] = print) -> list[ShardSource]:
    """data.shards, each checked now, so that a wrong path or a missing shard stops the run at start-up
    and not hours in: the files exist; shards are parquet with the shard columns and, in a directory
    that build_shards wrote, none is missing (tars are read only in training: their samples are
    not counted up front). Each reader (rank x dataloader worker) needs a file of every source."""
    if not cfg.shards:
        raise ConfigError("data.shards is empty: set it to the pairs to train on, e.g. "
                          "data.shards='[{path: \"s3://bucket/laion-zh/{00000..09999}.tar\"}]' (webdataset tars, "
                          "build_shards' shards, files, globs or URLs), or data.source=synthetic for synthetic shapes")
    readers = world_size * max(1, cfg.num_workers)
    sources = []
    for entry in cfg.shards:
        files = shard_files(entry.path)
        if files[0].lower().endswith(".tar"):
            if entry.min_score is not None:
                raise ConfigError(f"data.shards: {entry.path}: min_score filters curated shards (data_tools/curate.py "
                                  "writes their score column); tars have no scores")
            source = ShardSource(entry.path, tuple(files), None, entry.weight, "tar")
            say(f"data: {entry.path}: {len(files)} webdataset tars, weight {entry.weight:g}")
        else:
            with ThreadPoolExecutor(16) as pool:  # footers only; on network storage the latency adds up
                rows = list(pool.map(partial(_rows_in_shard, columns=shard_columns(entry.min_score)), files))
            _check_complete(entry.path, files, rows)
            source = ShardSource(entry.path, tuple(f for f, n in zip(files, rows) if n), sum(rows), entry.weight,
                                 min_score=entry.min_score)
            say(f"data: {entry.path}: {sum(rows):,} pairs in {len(source.files)} shards, weight {entry.weight:g}")
        kept = source.files
        if len(kept) < readers:
            raise ConfigError(f"{entry.path}: {len(kept)} {'tars' if source.kind == 'tar' else 'shards hold rows'}, "
                              f"but {readers} readers (ranks x dataloader workers) each need their own; use more, "
                              "smaller files or fewer workers")
        sources.append(source)
        if len(kept) % world_size:  # datasets then splits by rows instead of by shards
            say(f"data: {len(kept)} shards are not a multiple of {world_size} ranks: every rank reads all of them and "
                f"keeps 1 row in {world_size}; a multiple would read {world_size}x less")
    return sources


def shard_files(path: str, what: str = "data.shards") -> list[str]:
    """The files of one source: parquet shards (all of build_shards' numbered shards in a directory)
    or webdataset tars, named by a directory (one that build_shards --part wrote in parts too), a
    file, a glob or a brace list, local or an fsspec URL; errors begin with `what`."""
    fs, inner = fsspec.core.url_to_fs(path)
    if fs.isdir(inner) and (parts := sorted(p for p in fs.ls(inner, detail=False) if PART_NAME.fullmatch(file_name(p)))):
        return [file for part in _finished_parts(path, fs, parts, what) for file in shard_files(part, what)]
    files = list_files(path, (".parquet", ".tar"), what)
    if len({f.lower().endswith(".tar") for f in files}) > 1:
        raise ConfigError(f"{what}: {path} holds both .tar and .parquet files; give each kind as its own source")
    numbered = [f for f in files if _SHARD_NAME.fullmatch(file_name(f))]
    if numbered and fs.isdir(inner):
        _check_build(path, fs, inner, numbered, what)
        return numbered
    return files


def _check_build(path: str, fs, inner: str, files: list[str], what: str) -> None:
    """A directory that build_shards wrote: no numbered shard missing, and the build finished."""
    numbers = {int(_SHARD_NAME.fullmatch(file_name(f)).group(1)) for f in files}
    missing = sorted(set(range(max(numbers) + 1)) - numbers)
    if missing:
        raise ConfigError(f"{what}: {path} is missing shard-{missing[0]:05d}.parquet"
                          + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    if unfinished := sorted(fs.glob(f"{inner}/shard-*.parquet.partial")):
        raise ConfigError(f"{what}: {path}: build_shards did not finish ({file_name(unfinished[0])}); run it again to "
                          "complete the build")


def _finished_parts(path: str, fs, parts: list[str], what: str) -> list[str]:
    """The part directories of a split build, each present and finished (its summary written)."""
    count = int(PART_NAME.fullmatch(file_name(parts[0])).group(2))
    present = {int(PART_NAME.fullmatch(file_name(p)).group(1)) for p in parts}
    if missing := sorted(set(range(count)) - present):
        raise ConfigError(f"{what}: {path}: part {missing[0]}/{count} of the build is missing; run build_shards "
                          f"--part {missing[0]}/{count}, then build_shards --check {path}")
    if unfinished := [p for p in parts if not fs.isfile(f"{p}/summary.json")]:
        raise ConfigError(f"{what}: {path}: build_shards did not finish {file_name(unfinished[0])}; run that part again")
    return [full_path(fs, p, path) for p in parts]


def _rows_in_shard(file: str, columns: list[str] = COLUMNS) -> int:
    try:
        with open_binary(file) as stream:
            meta = pq.ParquetFile(stream)
    except Exception as e:  # pyarrow raises several types for a file that is not parquet
        raise ConfigError(f"data.shards: {file} is not a readable parquet file ({e})") from None
    if missing := [c for c in columns if c not in meta.schema_arrow.names]:
        made_by = "data_tools/curate.py" if missing == ["score"] else "data_tools/build_shards.py"
        raise ConfigError(f"data.shards: {file} has no {', '.join(missing)} column; training reads the shards that "
                          f"{made_by} writes")
    return meta.metadata.num_rows


def _check_complete(path: str, files: list[str], rows: list[int]) -> None:
    """build_shards' summary counts what it wrote (in each part of a split build): fewer rows on disk
    means a shard went missing."""
    fs, inner = fsspec.core.url_to_fs(path)
    if not fs.isdir(inner):
        return
    in_directory: dict[str, int] = {}
    for file, count in zip(files, rows):
        directory = file.rstrip("/").rsplit("/", 1)[0] if "/" in file else "."
        in_directory[directory] = in_directory.get(directory, 0) + count
    for directory, count in in_directory.items():
        summary = f"{directory}/summary.json"
        if fs.isfile(summary):
            written = json.loads(fs.cat_file(summary))["written"]
            if written != count:
                raise ConfigError(f"data.shards: {directory}: build_shards wrote {written:,} pairs, the shards hold "
                                  f"{count:,}: a shard was removed or replaced")


def _shard_rows(files: list[str], columns: tuple[str, ...]) -> Iterator[dict]:
    """The rows of `files`, in order; datasets hands each reader a subset of the files."""
    for file in files:
        with open_binary(file) as stream:
            for batch in pq.ParquetFile(stream).iter_batches(batch_size=256, columns=list(columns)):
                yield from batch.to_pylist()


def _tar_rows(files: list[str]) -> Iterator[dict]:
    for file in files:
        for key, caption, image, problem in tar_samples(file):
            yield {"id": f"{file_name(file)}/{key}", "caption": caption, "image": image, "problem": problem}


def image_id(data: bytes) -> int:
    """Equal for byte-identical images, so duplicates in a batch are not each other's negatives."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


class ShardStream(IterableDataset):
    """This rank's endless stream of collated batches: (batch, {worker, state, ids, skips}) with ids
    "<source index>:<shard row id>", or (None, {worker, error}) once the bad-sample limit is passed."""

    def __init__(self, sources: list[ShardSource], cfg: DataConfig, collate, image_size: int, batch_size: int, *,
                 rank: int, world_size: int, seed: int, start: dict[str, dict]):
        import datasets  # here, not at the top: with pandas under it, a second of every command's start-up

        datasets.disable_progress_bars()
        self.sources, self.collate, self.batch_size = sources, collate, batch_size
        self.rank, self.seed, self.start = rank, seed, start
        self.max_bad_fraction, self.bad_check_after = cfg.max_bad_fraction, cfg.bad_check_after
        self.transform = build_transform(cfg, image_size)
        total = sum(s.weight for s in sources)
        self.cumulative = list(accumulate(s.weight / total for s in sources))[:-1]
        self.world_size, self.shuffle_buffer = world_size, cfg.shuffle_buffer

    def _dataset(self, source: ShardSource) -> datasets.IterableDataset:
        """This rank's rows of one source, shuffled. Built inside each dataloader worker: datasets keeps
        an IterableDataset's epoch in shared memory, so workers iterating one object built before the
        fork would change each other's epoch (and so their shuffles) as each crossed into the next."""
        import datasets
        from datasets.distributed import split_dataset_by_node

        if source.kind == "tar":
            features = datasets.Features({"id": datasets.Value("string"), "caption": datasets.Value("string"),
                                          "image": datasets.Value("binary"), "problem": datasets.Value("string")})
            rows = datasets.IterableDataset.from_generator(_tar_rows, features=features,
                                                           gen_kwargs={"files": list(source.files)})
        else:
            # datasets splits every list in gen_kwargs between readers: the columns go as a tuple
            rows = datasets.IterableDataset.from_generator(_shard_rows, gen_kwargs={"files": list(source.files),
                                                                                    "columns": tuple(source.columns)})
        return split_dataset_by_node(rows.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer),
                                     rank=self.rank, world_size=self.world_size)

    def __iter__(self) -> Iterator[tuple[dict | None, dict]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        state = copy.deepcopy(self.start.get(str(worker))) or {
            "sources": [[0, 0] for _ in self.sources], "read": 0, "skipped": 0, "filtered": 0,
            "rng": np.random.default_rng([self.seed, self.rank, worker]).bit_generator.state}
        state.setdefault("filtered", 0)  # positions saved before tars were a source
        rng = np.random.default_rng()
        rng.bit_generator.state = state["rng"]
        streams = [self._rows(i, self._dataset(source), state) for i, source in enumerate(self.sources)]
        while True:
            samples, ids, skips = [], [], []
            while len(samples) < self.batch_size:
                source = bisect(self.cumulative, rng.random())
                epoch, row = next(streams[source])
                state["read"] += 1
                try:
                    sample = self._sample(source, epoch, row)
                except UnusableSample as e:
                    state["filtered" if isinstance(e, FilteredSample) else "skipped"] += 1
                    skips.append(redact({"source": self.sources[source].path, "id": row["id"], "reason": str(e)}))
                    if isinstance(e, FilteredSample):
                        continue
                    if state["read"] >= self.bad_check_after and state["skipped"] > self.max_bad_fraction * state["read"]:
                        yield None, {"worker": worker, "error": self._too_many_bad(worker, state, skips[-1],
                                                                                     self.sources[source].kind)}
                        return
                    continue
                samples.append(sample)
                ids.append(f"{source}:{row['id']}")  # shard ids repeat across sources
            state["rng"] = rng.bit_generator.state
            yield self.collate(samples), {"worker": worker, "state": copy.deepcopy(state), "ids": ids, "skips": skips}

    def _rows(self, source: int, dataset: datasets.IterableDataset, state: dict) -> Iterator[tuple[int, dict]]:
        """This worker's rows of one source, epoch after epoch from the saved position, which it advances."""
        epoch, offset = state["sources"][source]
        while True:
            dataset.set_epoch(epoch)
            for row in islice(iter(dataset), offset, None):  # the replay decodes nothing
                offset += 1
                state["sources"][source] = [epoch, offset]
                yield epoch, row
            if offset == 0:
                raise RuntimeError(f"{self.sources[source].path}: a dataloader worker got no rows in epoch {epoch}")
            epoch, offset = epoch + 1, 0
            state["sources"][source] = [epoch, offset]

    def _sample(self, source: int, epoch: int, row: dict) -> dict:
        caption = row["caption"]
        if self.sources[source].kind == "tar":
            if row["problem"]:
                raise UnusableSample(row["problem"])
            caption = normalise_caption(caption or "")
            if problem := caption_problem(caption):
                raise FilteredSample(problem)
        elif not caption:
            raise UnusableSample("empty caption")
        elif self.sources[source].min_score is not None and row["score"] < self.sources[source].min_score:
            raise FilteredSample(f"score {row['score']:.4f} under min_score {self.sources[source].min_score:g}")
        pixels = decode(row["image"])
        if self.sources[source].kind == "tar" and (problem := size_problem(pixels.shape[2], pixels.shape[1])):
            raise FilteredSample(problem)
        # The crop depends on the sample and the epoch only: not on the rank or worker reading it,
        # nor on whether the run was resumed in between.
        key = hashlib.blake2b(f"{self.seed}/{source}/{epoch}/{row['id']}".encode(), digest_size=8).digest()
        with seeded(int.from_bytes(key, "little") >> 1):
            pixels = self.transform(pixels)
        return {"image": pixels, "text": caption, "image_id": image_id(row["image"])}

    def _too_many_bad(self, worker: int, state: dict, last: dict, kind: str) -> str:
        advice = ("Shards from build_shards hold only images it decoded: check the storage, or rebuild them"
                  if kind == "parquet" else "Tars hold what the crawl fetched: if this share is expected, raise "
                  "data.max_bad_fraction; data_tools/build_shards.py turns them into clean shards")
        return (f"{state['skipped']:,} of the {state['read']:,} samples that dataloader worker {worker} of rank "
                f"{self.rank} read could not be used, more than data.max_bad_fraction={self.max_bad_fraction:g} "
                f"(last: {last['id']} in {last['source']}: {last['reason']}). {advice}")


class ShardBatches:
    """The trainer's side of the loader: batches, and where they leave the data (`position`)."""

    def __init__(self, stream: ShardStream, loader_options: dict, layout: dict, skip_log: Path | None,
                 next_worker: int = 0):
        self.layout, self.skip_log = layout, skip_log
        self.workers: dict[str, dict] = copy.deepcopy(stream.start)
        self.last_ids: list[str] = []
        # A new DataLoader starts with worker 0; batches that come before their turn wait here.
        self.turns, self.next_worker = max(1, loader_options["num_workers"]), next_worker
        self.waiting: dict[int, tuple[dict, dict]] = {}
        # Its own generator: the DataLoader draws its workers' base seed, which must not come from the
        # global RNG that a resumed run restores and continues.
        self._batches = iter(DataLoader(stream, batch_size=None, generator=torch.Generator(), **loader_options))

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        while self.next_worker not in self.waiting:
            batch, meta = next(self._batches)
            if "error" in meta:
                raise DataError(meta["error"])
            self.waiting[meta["worker"]] = batch, meta
        batch, meta = self.waiting.pop(self.next_worker)
        self.next_worker = (self.next_worker + 1) % self.turns
        self.workers[str(meta["worker"])] = meta["state"]
        self.last_ids = meta["ids"]
        if meta["skips"] and self.skip_log is not None:
            self.skip_log.parent.mkdir(parents=True, exist_ok=True)
            with open(self.skip_log, "a", encoding="utf-8") as f:
                f.writelines(json.dumps(skip, ensure_ascii=False) + "\n" for skip in meta["skips"])
        return batch

    @property
    def position(self) -> dict:
        return {"layout": self.layout, "workers": copy.deepcopy(self.workers), "next_worker": self.next_worker}

    @property
    def counts(self) -> dict[str, int]:
        """Samples this rank's workers have read, skipped (unusable) and filtered (tar samples that
        build_shards' rules would not keep) since the run began."""
        return {key: sum(w.get(key, 0) for w in self.workers.values()) for key in ("read", "skipped", "filtered")}


def stream_layout(sources: list[ShardSource], cfg: DataConfig, world_size: int, seed: int) -> dict:
    """What the per-worker streams depend on: a position is only valid under the same layout. Its URLs are
    redacted: it is saved in checkpoints, and a URL signed anew for the resumed run still names the same data."""
    return {"world_size": world_size, "num_workers": cfg.num_workers, "seed": seed,
            "shuffle_buffer": cfg.shuffle_buffer,
            # min_score left out: it filters rows after they are read, so a position holds under another one
            "sources": [redact({k: v for k, v in asdict(s).items() if k != "min_score"} | {"files": len(s.files)})
                        for s in sources]}


def start_states(position: dict | None, layout: dict, reset: bool) -> tuple[dict[str, dict], int]:
    """The saved worker states to continue from and the worker whose turn is next; none for a fresh stream."""
    if not position:
        return {}, 0
    if position.get("layout") == layout:
        return position["workers"], position["next_worker"]
    if reset:
        return {}, 0
    raise ConfigError(f"the checkpoint's data position belongs to another data layout ({position.get('layout')}; "
                      f"this run: {layout}): the per-worker streams differ, so continuing would repeat or skip "
                      "samples. Resume with the same ranks, workers and shards, or set data.reset_position=true "
                      "to restart the data stream")
