"""The runtime: what the launch asked for, the Accelerator, the ranks' lifetime, and the settings whose
best value depends on the machine (CPU threads, TF32, fused AdamW, pinned memory, prefetch)."""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import ContextManager

import psutil
import torch
from accelerate import Accelerator
from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers
from accelerate.utils import DistributedType, InitProcessGroupKwargs, ProjectConfiguration

from chinese_clip.config import Config, ConfigError, DataConfig, EvalConfig, OptimConfig, RunConfig, TrainConfig

# DeepSpeed still calls the torch.distributed collectives that torch 2.14 renamed; one warning
# per call per step would bury the progress bar.
warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated", category=FutureWarning)


def resolve_mixed_precision(choice: str) -> str:
    if choice != "auto":
        return choice
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


# -- the speed settings whose `auto` depends on the machine ---------------------------------------
def fused_adamw(cfg: OptimConfig) -> bool:
    return torch.cuda.is_available() if cfg.fused == "auto" else cfg.fused


def tf32(cfg: TrainConfig) -> bool:
    """TF32 matmuls: Ampere (compute capability 8) and newer have them; fp32 accuracy is rarely needed."""
    if cfg.tf32 != "auto":
        return cfg.tf32
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


def pin_memory(cfg: DataConfig) -> bool:
    return torch.cuda.is_available() if cfg.pin_memory == "auto" else cfg.pin_memory


def prefetch_factor(cfg: DataConfig) -> int:
    """Batches each loader worker prepares ahead: a GPU step is short against decoding a batch."""
    if cfg.prefetch_factor != "auto":
        return cfg.prefetch_factor
    return 4 if torch.cuda.is_available() else 2


def eval_precision(cfg: EvalConfig) -> str:
    """"bf16" or "no": evaluation's encoding under bf16 autocast where the GPU has bf16 (auto)."""
    return resolve_mixed_precision("auto") if cfg.mixed_precision == "auto" else cfg.mixed_precision


def eval_autocast(cfg: EvalConfig, device: torch.device) -> ContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=eval_precision(cfg) == "bf16")


def speed_summary(cfg: Config) -> str:
    """One line of what the `auto` speed settings resolved to here."""
    on = {True: "on", False: "off"}
    return (f"fused AdamW {on[fused_adamw(cfg.optim)]}, TF32 {on[tf32(cfg.train)]}, "
            f"pinned memory {on[pin_memory(cfg.data)]}, prefetch {prefetch_factor(cfg.data)} batches per worker, "
            f"evaluation {'bf16' if eval_precision(cfg.eval) == 'bf16' else 'fp32'}")


def launched_engine() -> str:
    """What `accelerate launch` asked for: "deepspeed" (--use_deepspeed), "fsdp" (--use_fsdp), or
    "ddp" (--multi_gpu, or one process)."""
    for engine in ("deepspeed", "fsdp"):
        if os.environ.get(f"ACCELERATE_USE_{engine.upper()}", "false").lower() == "true":
            return engine
    return "ddp"


def build_accelerator(cfg: TrainConfig, run_dir: Path, trackers: Sequence[str] = ()) -> Accelerator:
    """The Accelerator of this launch, logging to `trackers` (run.trackers) once `init_trackers` starts them."""
    check_trackers(trackers)
    # Without CUDA, Accelerate forms no process group for a multi-process launch unless told how:
    # a DeepSpeed launch needs the backend named, any other needs `cpu=True` (gloo; an FSDP launch
    # then shards over it as it would over NCCL). Otherwise every process silently trains alone.
    # A single process must do neither.
    torch.set_float32_matmul_precision("high" if tf32(cfg) else "highest")
    multi_process_cpu = not torch.cuda.is_available() and launched_processes() > 1
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(cfg.mixed_precision),
        cpu=multi_process_cpu and launched_engine() != "deepspeed",
        log_with=list(trackers),
        # TensorBoard writes under <logging_dir>/<project name>: runs/<name>/tensorboard/<name>/.
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "tensorboard")),
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if multi_process_cpu else [],
    )
    check_world_size(accelerator)
    return accelerator


def check_trackers(names: Sequence[str]) -> None:
    """Accelerate drops a tracker whose package is missing with a debug message only: the run would
    train for days with nothing in wandb. Say so at start-up instead."""
    installed = {str(tracker) for tracker in get_available_trackers()}
    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise ConfigError(f"run.trackers: unknown tracker {name!r} (Accelerate has: "
                              f"{', '.join(sorted(LOGGER_TYPE_TO_CLASS))})")
        if name not in installed:
            raise ConfigError(f"run.trackers: {name} is not installed here (pip install {name}), or remove it")


def set_cpu_threads(chosen: int | None) -> str:
    """Set this process's torch threads and say where the number came from. Unless the user chose one
    (`chosen`, i.e. train.cpu_threads; or OMP_NUM_THREADS / --num_cpu_threads_per_process given to the
    launch), each process takes its share of the cores: cores / processes on this machine."""
    if chosen is not None:
        threads, origin = chosen, "train.cpu_threads"
    elif user_chose_omp_threads():
        threads, origin = int(os.environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    else:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        threads, origin = max(1, available_cores() // local), f"{available_cores()} cores / {local} local processes"
    torch.set_num_threads(threads)
    return f"{threads} cpu threads per process ({origin})"


def available_cores() -> int:
    """The CPUs this process may run on (a SLURM or taskset binding narrows them), not the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def user_chose_omp_threads() -> bool:
    """Whether OMP_NUM_THREADS is the user's. `accelerate launch` and torchrun put OMP_NUM_THREADS=1
    into every process they start unless their own environment had it (or, for accelerate, unless
    --num_cpu_threads_per_process was given), so the launcher's environment and command line tell a
    choice from that default; a process started without a launcher has only the user's."""
    if "OMP_NUM_THREADS" not in os.environ:
        return False
    if not started_by_launcher():
        return True
    try:
        launcher = psutil.Process().parent()
        return "OMP_NUM_THREADS" in launcher.environ() or any(
            arg.startswith("--num_cpu_threads_per_process") for arg in launcher.cmdline())
    except (psutil.Error, AttributeError):  # a launcher we may not read (or none left): take the value as given
        return True


def started_by_launcher() -> bool:
    # torchrun (and so every multi-process `accelerate launch`) marks its ranks with TORCHELASTIC_RUN_ID;
    # `accelerate launch` of one process marks it with ACCELERATE_USE_CPU.
    return "TORCHELASTIC_RUN_ID" in os.environ or "ACCELERATE_USE_CPU" in os.environ


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
    # A process started by hand (`nohup python recipes/pretrain.py &`) is left alone when its shell goes.
    if not started_by_launcher():
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
