"""The distributed runtime: what the launch asked for, the Accelerator, and the ranks' lifetime."""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs

from chinese_clip.config import RunConfig, TrainConfig

# DeepSpeed still calls the torch.distributed collectives that torch 2.14 renamed; one warning
# per call per step would bury the progress bar.
warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated", category=FutureWarning)


def resolve_mixed_precision(choice: str) -> str:
    if choice != "auto":
        return choice
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def launched_engine() -> str:
    """What `accelerate launch` asked for: "deepspeed" (--use_deepspeed), "fsdp" (--use_fsdp), or
    "ddp" (--multi_gpu, or one process)."""
    for engine in ("deepspeed", "fsdp"):
        if os.environ.get(f"ACCELERATE_USE_{engine.upper()}", "false").lower() == "true":
            return engine
    return "ddp"


def build_accelerator(cfg: TrainConfig, run_dir: Path) -> Accelerator:
    # Without CUDA, Accelerate forms no process group for a multi-process launch unless told how:
    # a DeepSpeed launch needs the backend named, any other needs `cpu=True` (gloo; an FSDP launch
    # then shards over it as it would over NCCL). Otherwise every process silently trains alone.
    # A single process must do neither.
    multi_process_cpu = not torch.cuda.is_available() and launched_processes() > 1
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(cfg.mixed_precision),
        cpu=multi_process_cpu and launched_engine() != "deepspeed",
        log_with="tensorboard",
        project_dir=str(run_dir),
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if multi_process_cpu else [],
    )
    check_world_size(accelerator)
    return accelerator


def launched_processes() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_world_size(accelerator: Accelerator) -> None:
    """Several processes that do not average gradients would each train alone on their slice."""
    launched = launched_processes()
    if launched > 1 and (accelerator.num_processes != launched or accelerator.distributed_type == DistributedType.NO):
        raise RuntimeError(
            f"{launched} processes were launched but Accelerate runs {accelerator.num_processes} "
            f"({accelerator.distributed_type.value}): each would train alone. Launch with `accelerate launch` "
            "and a matching --num_processes."
        )


def exit_with_launcher() -> None:
    """A process started by a launcher ends within seconds of losing it. torchrun starts each rank in
    a session of its own, so when the launcher is killed (an OOM killer, a dropped login) its ranks
    would otherwise live on as orphans, training and checkpointing beside any relaunch."""
    # torchrun (and so every multi-process `accelerate launch`) marks its ranks with TORCHELASTIC_RUN_ID;
    # `accelerate launch` of one process marks it with ACCELERATE_USE_CPU. A process started by hand
    # (`nohup python recipes/pretrain.py &`) is left alone when its shell goes.
    if "TORCHELASTIC_RUN_ID" not in os.environ and "ACCELERATE_USE_CPU" not in os.environ:
        return
    launcher = os.getppid()

    def watch() -> None:
        while os.getppid() == launcher:  # an orphan is adopted by another process
            time.sleep(1)
        with contextlib.suppress(OSError):  # its terminal or log pipe may have gone with it
            print(f"error: the launcher (pid {launcher}) is gone; rank {os.environ.get('RANK', '0')} stops",
                  file=sys.stderr, flush=True)
        os._exit(1)  # at once, even while the main thread waits in a collective that will never finish

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()


def run_dir_of(cfg: RunConfig) -> Path:
    """One directory per run name, the same on every rank and on every relaunch of that run."""
    return Path(cfg.output_dir or f"runs/{cfg.name}")
