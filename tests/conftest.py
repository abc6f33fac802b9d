"""What the tests share: paths, the commands that launch the recipes (one process, or two CPU ranks
under each engine), helpers that run, kill and read runs, tiny models, and the datasets tests write."""
from __future__ import annotations

import base64
import contextlib
import functools
import io
import json
import math
import os
import re
import runpy
import shutil
import signal
import socket
import struct
import subprocess
import tarfile
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Iterator

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from chinese_clip.checkpoints import load_pretrained
from chinese_clip.config import ModelConfig, TextConfig, VisionConfig
from chinese_clip.data.images import encode_jpeg
from chinese_clip.data.readers import RawPair
from chinese_clip.data.shards import build_shards
from chinese_clip.data.synthetic import SyntheticShapes, class_name
from chinese_clip.runtime import available_cores
from tests.tolerances import REPEATED, SCORES

ROOT = Path(__file__).resolve().parents[1]
# pytest-xdist runs test files side by side: each test process, and every command it launches (they
# inherit OMP_NUM_THREADS as the user's choice), takes its share of the cores, as train.cpu_threads
# shares them among a launch's ranks. More threads than cores stall OpenMP's barriers: the default
# run took 12 minutes instead of 3 beside another test file.
TEST_THREADS = max(1, available_cores() // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
if "PYTEST_XDIST_WORKER_COUNT" in os.environ or "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(TEST_THREADS)
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
CONFIGS = ROOT / "recipes" / "configs"
PRETRAIN, FINETUNE, EVALUATE, EXPORT = (str(ROOT / "recipes" / f"{name}.py")
                                        for name in ("pretrain", "finetune", "evaluate", "export"))
ENGINES = {  # `accelerate launch` flags for two CPU ranks under each engine
    "ddp": ["--multi_gpu"],
    "zero2": ["--config_file", str(ROOT / "ds_configs" / "accelerate" / "cpu_2proc_zero2.yaml")],
    "zero3": ["--use_deepspeed", "--deepspeed_config_file", str(ROOT / "ds_configs" / "zero3.json")],
    "fsdp": ["--config_file", str(ROOT / "ds_configs" / "accelerate" / "cpu_2proc_fsdp.yaml")],
}
TINY = ModelConfig(embed_dim=16, vision=VisionConfig(image_size=32, patch_size=8, width=32, layers=2, heads=2),
                   text=TextConfig(hidden_size=32, layers=2, heads=2, intermediate_size=64, max_position_embeddings=64,
                                   dropout=0.0))


# -- the order xdist hands out test files in -----------------------------------------------------------
# The files that take minutes first, longest first: xdist gives each worker a whole file at a time in
# this order (pyproject.toml: --dist loadfile --no-loadscope-reorder), so the short files then fill in
# whichever worker is free and both end together. Seconds per file measured on 2 cores, 2 workers
# (2026-12-08); every file not named takes under 25 s.
LONGEST_FILES = [
    "test_default_run.py",  # 453
    "test_train.py",  # 452
    "test_staged.py",  # 365
    "test_eval_in_training.py",  # 129
    "test_gradient_cache.py",  # 120
    "test_finetune.py",  # 117
    "test_model.py",  # 91
    "test_losses.py",  # 64
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: index for index, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FILES)))  # stable: a file keeps its order


# -- every test leaves its process as it found it ------------------------------------------------------
# Tests share xdist's worker processes, so whatever one leaves behind reaches the tests after it in an
# order that depends on the machine: a leftover ACCELERATE_USE_DEEPSPEED turns the next in-process launch
# into DeepSpeed; Accelerate's state, once made, refuses another mixed precision.
IMPORT_SIDE_EFFECTS = {  # set once, by importing a library, whichever test imports it first
    "PYTORCH_NVML_BASED_CUDA_CHECK",  # deepspeed
    "TOKENIZERS_PARALLELISM",  # open_clip
    "_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR",  # torch.compile, at its first compile in the process
    "PYTEST_CURRENT_TEST",  # pytest's own
}


def process_state() -> dict:
    from accelerate.state import PartialState

    return {"environment": {k: v for k, v in os.environ.items() if k not in IMPORT_SIDE_EFFECTS},
            "working directory": os.getcwd(), "torch threads": torch.get_num_threads(),
            "default dtype": torch.get_default_dtype(), "autograd enabled": torch.is_grad_enabled(),
            "Accelerate state": bool(PartialState._shared_state), "process group": dist.is_initialized()}


@pytest.fixture(autouse=True)
def restores_the_process_state():
    before = process_state()
    yield
    after = process_state()
    changed = {key: (before[key], after[key]) for key in before if after[key] != before[key]}
    if "environment" in changed:
        old, new = changed["environment"]
        changed["environment"] = {k: (old.get(k), new.get(k)) for k in old.keys() | new.keys() if old.get(k) != new.get(k)}
    assert not changed, f"the test left its process changed: {changed}"


@pytest.fixture
def cpu_accelerator():
    """Accelerate on this process's CPU, its global state cleared afterwards."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def tiny_model_cfg() -> ModelConfig:
    """A model small enough to run forwards and backwards in milliseconds."""
    return ModelConfig(
        embed_dim=16,
        vision=VisionConfig(image_size=32, patch_size=8, width=32, layers=2, heads=2),
        text=TextConfig(vocab_size=21128, hidden_size=32, layers=2, heads=2, intermediate_size=64,
                        max_position_embeddings=64, dropout=0.0),
    )


# -- launching the recipes ----------------------------------------------------------------------------
def command(script: str, *args: str, engine: str | list[str] | None = None) -> list[str]:
    """`python script args` in one process, or `accelerate launch` of two CPU ranks under `engine`
    (a name in ENGINES, or the launch flags themselves)."""
    if engine is None:
        return [sys.executable, script, *args]
    flags = ENGINES[engine] if isinstance(engine, str) else engine
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2",
            "--main_process_port", str(free_port()), *flags, script, *args]


def run(cmd: list[str], timeout: int = 900, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout, **kwargs)


def run_ok(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = run(cmd, **kwargs)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.fixture
def in_process(capsys):
    """A recipe's or data tool's main() called in this process as its command line would call it, for
    what stops before anything trains (a launch would add nothing but seconds of imports). Returns what
    `run` returns; torch's threads and Accelerate's state, which a recipe sets for its process, are put
    back afterwards."""
    from accelerate.state import AcceleratorState

    threads = torch.get_num_threads()

    def call(script: str, *args: str) -> subprocess.CompletedProcess:
        main = runpy.run_path(script)["main"]
        capsys.readouterr()  # what the test printed before is not the command's
        code = 0
        try:
            main(list(args))
        except SystemExit as stop:  # as the interpreter ends on it: a message goes to stderr, with status 1
            code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
            if isinstance(stop.code, str):
                print(stop.code, file=sys.stderr)
        printed = capsys.readouterr()
        return subprocess.CompletedProcess([script, *args], code, printed.out, printed.err)

    yield call
    torch.set_num_threads(threads)
    AcceleratorState._reset_state(reset_partial_state=True)


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- reading runs ---------------------------------------------------------------------------------
def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> list[float]:
    return [line["train/loss"] for line in metrics(run_dir) if "train/loss" in line]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return model_weights(run_dir / "model")


def model_weights(directory: Path) -> dict[str, torch.Tensor]:
    """A model directory's weights in our names (its file holds HF names)."""
    return load_pretrained(directory).state_dict()


def assert_same_weights(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], atol: float) -> None:
    assert ours.keys() == reference.keys()
    for name, value in reference.items():
        assert (ours[name] - value).abs().max() <= atol, name


def assert_same_results(ours, reference, where: str = "results") -> None:
    """Evaluation results (nested dicts and lists) alike: scores to tolerances.SCORES, everything else
    exactly."""
    if isinstance(reference, dict):
        assert isinstance(ours, dict) and ours.keys() == reference.keys(), where
        for key in reference:
            assert_same_results(ours[key], reference[key], f"{where}/{key}")
    elif isinstance(reference, list):
        assert isinstance(ours, list) and len(ours) == len(reference), where
        for index, (a, b) in enumerate(zip(ours, reference)):
            assert_same_results(a, b, f"{where}[{index}]")
    elif isinstance(reference, float):
        assert ours == pytest.approx(reference, abs=SCORES), where
    else:
        assert ours == reference, where


# -- killing runs -----------------------------------------------------------------------------------
def log_of(run_dir: Path) -> Path:
    return run_dir.parent / f"{run_dir.name}.log"


def start_until_checkpoint(cmd: list[str], run_dir: Path, step: int) -> subprocess.Popen:
    """Start the run, its output appended to log_of(run_dir), and return once checkpoint `step` is complete."""
    done = run_dir / "checkpoints" / f"step_{step}" / "trainer_state.json"
    with open(log_of(run_dir), "a") as log:
        process = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while not done.exists():
        assert process.poll() is None, f"the run ended before checkpoint {step}:\n{log_of(run_dir).read_text()[-3000:]}"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return process


def ranks_of(launcher: subprocess.Popen) -> list[psutil.Process]:
    """The training processes a launch started (itself, when it is one process), by rank."""
    children = [p for p in psutil.Process(launcher.pid).children()  # not their dataloader workers
                if any(arg.endswith((PRETRAIN, FINETUNE)) for arg in p.cmdline())]
    if not children:
        return [psutil.Process(launcher.pid)]
    return sorted(children, key=lambda p: int(p.environ()["RANK"]))


def kill_one_rank(launcher: subprocess.Popen, run_dir: Path) -> None:
    """SIGKILL the last rank alone, in the middle of a step, as a node or an OOM killer would: the
    launch must end, non-zero, within 60 s."""
    ranks = ranks_of(launcher)
    ranks[-1].send_signal(signal.SIGKILL)
    try:
        code = launcher.wait(timeout=60)
    except subprocess.TimeoutExpired:
        kill_tree(launcher)
        raise AssertionError(f"the launch outlived its killed rank by 60 s:\n{log_of(run_dir).read_text()[-3000:]}")
    assert code != 0 or len(ranks) == 1
    _, alive = psutil.wait_procs(ranks, timeout=30)
    assert not alive, f"ranks {alive} outlived the launch"


def kill_launcher(launcher: subprocess.Popen, run_dir: Path) -> None:
    """SIGKILL the launcher alone, as a dropped login or an OOM killer would: its ranks, in sessions of
    their own, must follow within 30 s rather than train on as orphans."""
    ranks = ranks_of(launcher)
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    _, alive = psutil.wait_procs(ranks, timeout=30)
    for rank in alive:
        rank.kill()
    assert not alive, f"ranks outlived their launcher by 30 s:\n{log_of(run_dir).read_text()[-3000:]}"


def kill_tree(process: subprocess.Popen) -> None:
    parent = psutil.Process(process.pid)
    tree = [parent, *parent.children(recursive=True)]
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    psutil.wait_procs(tree, timeout=60)


def run_to_end(cmd: list[str], run_dir: Path) -> str:
    """Run (again) to the end; returns what it printed, which is appended to log_of(run_dir) too."""
    result = run(cmd)
    with open(log_of(run_dir), "a") as log:
        log.write(result.stdout + result.stderr)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def resumed_from(run_dir: Path) -> list[int]:
    """The step of every resume so far, in order."""
    return [int(n) for n in re.findall(r"resumed from \S+step_(\d+) ", log_of(run_dir).read_text())]


# -- the staged run the resume tests kill ------------------------------------------------------------
# The tiny staged preset, shortened: lit (vision frozen) steps 0-5, flip (everything, mask 0.5, double
# batch) 6-11, unmasked 12-15; a checkpoint every 2 steps, an evaluation at every stage end.
STAGED = ["--config", str(CONFIGS / "tiny_staged.yaml"),
          "stages.0.steps=6", "stages.1.steps=6", "stages.2.steps=4", "checkpoint.every_steps=2",
          "checkpoint.keep_last=100", "train.log_every=1", "data.num_workers=0", "data.synthetic.val_size=32",
          "eval.batch_size=16", "eval.at_start=false", "eval.at_stage_end=true"]


def staged(run_dir, batch, engine=None, *overrides):
    """Per-process batches: `batch` in lit and unmasked, twice that in flip; the same global batches
    for 1 process x 2b and 2 processes x b."""
    return command(PRETRAIN, *STAGED, f"data.batch_size={batch}", f"stages.1.batch_size={2 * batch}",
                   f"run.output_dir={run_dir}", *overrides, engine=engine)


def check_resumed_run_matches(resumed: Path, reference: Path, atol: float = REPEATED) -> None:
    """The same weights and the same loss at every step as `reference`, a run never interrupted. When
    that ran on the same ranks (atol REPEATED), also the same evaluations (those made before a kill
    travel in the checkpoints); a reference on other ranks (one process) sums in another order: atol
    TRAINING."""
    assert_same_weights(final_weights(resumed), final_weights(reference), atol=atol)
    last = lambda run: max(m["step"] for m in metrics(run))  # noqa: E731
    assert last(resumed) == last(reference) == 16
    by_step = lambda run: {m["step"]: m["train/loss"] for m in metrics(run) if "train/loss" in m}  # noqa: E731
    assert by_step(resumed).keys() == by_step(reference).keys() == set(range(1, 17))
    for step, loss in by_step(reference).items():
        assert abs(by_step(resumed)[step] - loss) <= atol, step
    resumed_results, results = (json.loads((run / "eval.json").read_text()) for run in (resumed, reference))
    assert list(resumed_results["during"]) == list(results["during"]) == ["6", "12"]
    if atol == REPEATED:
        assert_same_results(resumed_results, results)


# -- processes joined by gloo, without a launcher --------------------------------------------------
def _rank_main(rank: int, world_size: int, port: int, fn, args, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.save(fn(*args), os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_on_cpu_ranks(fn, *args, world_size: int = 2) -> list:
    """fn(*args) in `world_size` fresh processes joined by gloo; returns each rank's result in rank
    order. fn must be importable (defined at a module's top level)."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_rank_main, args=(world_size, free_port(), fn, args, out_dir), nprocs=world_size)
        return [torch.load(os.path.join(out_dir, f"{r}.pt")) for r in range(world_size)]


# -- models and datasets ---------------------------------------------------------------------------------------
TINY_CN_CLIP = dict(  # the tiny preset's shape, with the 64-wide heads cn_clip assumes
    embed_dim=128, image_resolution=64, vision_layers=4, vision_width=128, vision_patch_size=16, vocab_size=21128,
    text_attention_probs_dropout_prob=0.0, text_hidden_act="gelu", text_hidden_dropout_prob=0.0, text_hidden_size=128,
    text_initializer_range=0.02, text_intermediate_size=512, text_max_position_embeddings=64,
    text_num_attention_heads=2, text_num_hidden_layers=2, text_type_vocab_size=2)


def cn_clip_checkpoint(path: Path) -> Path:
    """A tiny model in Chinese-CLIP's own .pt format, written by cn_clip's `CLIP` (random weights)."""
    from cn_clip.clip.model import CLIP

    torch.manual_seed(0)
    model = CLIP(**TINY_CN_CLIP).float()
    state = {f"module.{name}": value for name, value in model.state_dict().items()}
    torch.save({"epoch": 1, "step": 100, "name": "tiny", "state_dict": state}, path)
    return path


def responsive_model(out: Path) -> Path:
    """A tiny random model (saved as a model directory) whose features depend on the input as a trained
    model's do: at initialisation the blocks' small weights leave every image (and text) at nearly the
    same feature, so they are scaled up; with CLIP's largest logit scale, probabilities are far from uniform."""
    from chinese_clip.checkpoints import save_pretrained
    from chinese_clip.config import Config
    from chinese_clip.model import ChineseCLIP
    from chinese_clip.tokenizer import load_tokenizer

    torch.manual_seed(0)
    model = ChineseCLIP(TINY)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100))
        for name, weight in model.named_parameters():
            if weight.ndim == 2 and any(part in name for part in ("blocks", "encoder.layer", "patch_embed")):
                weight.mul_(5)
    save_pretrained(model.state_dict(), Config(model=TINY), out, load_tokenizer())
    return out


def synthetic_pairs(size: int, image_size: int, seed: int = 0):
    """The synthetic training split as raw JPEG pairs, keyed "synthetic:<index>": input for build_shards."""
    dataset = SyntheticShapes("train", size, image_size, seed=seed)
    for index in range(size):
        sample = dataset[index]
        yield RawPair(f"synthetic:{index}", sample["text"], encode_jpeg(sample["image"]))


def write_shards(path: Path, pairs: int, rows_per_shard: int, image_size: int = 64, seed: int = 0) -> Path:
    build_shards(synthetic_pairs(pairs, image_size, seed=seed), path, rows_per_shard=rows_per_shard)
    return path


def write_tars(path: Path, pairs: int, per_tar: int, image_size: int = 64, seed: int = 0,
               member_prefix: str = "") -> Path:
    """The synthetic pairs as webdataset tars in img2dataset's layout (NNNNN.tar holding key.jpg,
    key.txt, key.json), every member's name starting with `member_prefix`."""
    path.mkdir(parents=True, exist_ok=True)
    for index, pair in enumerate(synthetic_pairs(pairs, image_size, seed=seed)):
        key = f"{member_prefix}{index:09d}"
        members = [(f"{key}.jpg", pair.image), (f"{key}.txt", pair.caption.encode()),
                   (f"{key}.json", json.dumps({"key": f"{index:09d}", "status": "success"}).encode())]
        with tarfile.open(path / f"{index // per_tar:05d}.tar", "a") as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def on_shards(path: Path, workers: int) -> list[str]:
    """The overrides that train on the shards at `path`, read by `workers` dataloader workers per rank."""
    return ["data.source=shards", f"data.shards=[{{path: {path}}}]", f"data.num_workers={workers}",
            "data.shuffle_buffer=32"]


def break_rows(shard: Path, rows: dict[int, bytes]) -> None:
    """Replace the image bytes of some rows of a shard, as a disk fault would after the build."""
    table = pq.read_table(shard).to_pylist()
    for index, data in rows.items():
        table[index]["image"] = data
    pq.write_table(pa.Table.from_pylist(table, schema=pq.read_schema(shard)), shard)


def write_retrieval_set(root: Path, images: int = 5, texts: int = 7) -> Path:
    """A retrieval set in Chinese-CLIP's layout (valid_imgs.tsv + valid_texts.jsonl): image ids 100...,
    text t matching images t and t + 1 (modulo the image count)."""
    root.mkdir(parents=True, exist_ok=True)
    shapes = SyntheticShapes("train", max(images, texts), 32)
    (root / "valid_imgs.tsv").write_text("".join(
        f"{100 + i}\t{base64.urlsafe_b64encode(encode_jpeg(shapes[i]['image'])).decode()}\n" for i in range(images)))
    (root / "valid_texts.jsonl").write_text("".join(
        json.dumps({"text_id": t, "text": shapes[t]["text"], "image_ids": [100 + t % images, 100 + (t + 1) % images]},
                   ensure_ascii=False) + "\n" for t in range(texts)), encoding="utf-8")
    return root


def write_class_folder(root: Path, per_class=(3, 2, 0)) -> Path:
    """Class folders 000, 001, ... of synthetic shapes, label_cn.txt beside them (Chinese-CLIP's layout)."""
    shapes = SyntheticShapes("train", 200, 32)
    (root / "test").mkdir(parents=True)
    names = []
    for label, count in enumerate(per_class):
        folder = root / "test" / f"{label:03d}"
        folder.mkdir()
        for i in [i for i in range(200) if shapes[i]["label"] == label][:count]:
            shapes[i]["image"].save(folder / f"{i}.png")
        names.append(class_name(label))
    (root / "label_cn.txt").write_text("\n".join(names) + "\n", encoding="utf-8")
    return root / "test"


def chromium_driver():
    """Headless Chromium through selenium: Debian's chromium + chromium-driver (which .ci/run installs)."""
    webdriver = pytest.importorskip("selenium.webdriver")
    driver_path, browser = shutil.which("chromedriver"), shutil.which("chromium") or shutil.which("chromium-browser")
    if not (driver_path and browser):
        if os.environ.get("REQUIRE_BROWSER"):
            pytest.fail("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
        pytest.skip("no chromium/chromedriver on this machine")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,1600"):
        options.add_argument(flag)
    return webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)


# -- hostile inputs -------------------------------------------------------------------------------
@functools.cache
def decompression_bomb(side: int = 20000) -> bytes:
    """A valid PNG of side x side black pixels, 1 bit each: 48 KB on disk for 20000, and the 1.2 GB RGB
    tensor a decoder allocates for it (measured: torchvision's decode_image peaked 1146 MiB higher)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    pixels = zlib.compress(b"\x00" * (side // 8 + 1) * side, 9)  # each row: filter byte 0, then side bits
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))


def animated(fmt: str = "GIF", colours=((220, 30, 30), (30, 30, 220)), size: int = 48) -> bytes:
    """An animation of one frame per colour: torchvision decodes a GIF to [frames, 3, H, W] and refuses
    an animated WebP."""
    frames = [Image.new("RGB", (size, size), colour) for colour in colours]
    out = io.BytesIO()
    frames[0].save(out, format=fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return out.getvalue()


@contextlib.contextmanager
def peak_memory_growth() -> Iterator[dict]:
    """{"MiB": how far this process's peak resident memory rose inside the block}. Linux resets the peak
    (VmHWM) on writing 5 to /proc/self/clear_refs, so the figure is the block's own."""
    def status(field: str) -> int:
        line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field))
        return int(line.split()[1]) // 1024
    Path("/proc/self/clear_refs").write_text("5")
    before, grown = status("VmRSS:"), {}
    try:
        yield grown
    finally:
        grown["MiB"] = status("VmHWM:") - before
