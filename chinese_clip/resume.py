"""A run's checkpoints: written atomically, the last N kept, the newest complete one found on restart.

A checkpoint is `checkpoints/step_N/`: Accelerate's state (model, optimizer, RNG of every rank;
sharded under ZeRO) plus `trainer_state.json`, written last. It is written under a hidden
`.step_N.partial` name and renamed only when every rank has finished and the trainer state is on
disk, so a run killed mid-write leaves the previous checkpoint as the newest complete one.
Ranks on several nodes must share the run directory's filesystem.

Parameters a stage freezes are read back from the fp32 weights file written at the stage's
start (`stages/`), never from the engine, whose copy may be bf16.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from chinese_clip.config import ConfigError

STATE_FILE = "trainer_state.json"
_COMPLETE = re.compile(r"step_(\d+)")


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def stage_weights_path(run_dir: Path, index: int, name: str) -> Path:
    return run_dir / "stages" / f"{index}-{name}.safetensors"


def write_weights(weights: dict[str, torch.Tensor], path: Path) -> None:
    """Atomically: a reader sees the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    save_file({k: v.contiguous() for k, v in weights.items()}, str(partial))
    os.replace(partial, path)


def read_weights(path: Path, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    weights = load_file(str(path))
    return weights if names is None else {name: weights[name] for name in names}


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(run_dir)
    found = [(int(m.group(1)), p) for p in root.glob("step_*") if (m := _COMPLETE.fullmatch(p.name))
             and (p / STATE_FILE).is_file()] if root.is_dir() else []
    return [p for _, p in sorted(found)]


def read_trainer_state(checkpoint: Path) -> dict:
    state_file = Path(checkpoint) / STATE_FILE
    if not state_file.is_file():
        raise ConfigError(f"{checkpoint} is not a complete checkpoint: {STATE_FILE} is missing")
    return json.loads(state_file.read_text())


def find_resume_checkpoint(run_dir: Path, resume: str) -> Path | None:
    """checkpoint.resume: "auto" (newest complete checkpoint, or None), "never", or a path."""
    if resume == "never":
        return None
    if resume == "auto":
        found = complete_checkpoints(run_dir)
        return found[-1] if found else None
    read_trainer_state(Path(resume))  # refuses an incomplete one
    return Path(resume)


def save_checkpoint(accelerator: Accelerator, run_dir: Path, trainer_state: dict, keep_last: int) -> Path:
    """Every rank writes its shards into a partial directory; the main process completes it with the
    trainer state, renames it into place, and then deletes all but the newest `keep_last`."""
    root = checkpoint_root(run_dir)
    final = root / f"step_{trainer_state['step']}"
    partial = root / f".{final.name}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial / STATE_FILE).write_text(json.dumps(trainer_state, indent=2, ensure_ascii=False))
        stale = root / f".{final.name}.stale"
        if final.exists():  # the same step again, after resuming from an older checkpoint
            os.replace(final, stale)
        os.replace(partial, final)
        shutil.rmtree(stale, ignore_errors=True)
        for old in complete_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def remove_partial_checkpoints(run_dir: Path) -> None:
    """Leftovers of a run killed while writing; never a complete checkpoint. Main process only."""
    root = checkpoint_root(run_dir)
    for leftover in [*root.glob(".step_*.partial"), *root.glob(".step_*.stale")] if root.is_dir() else []:
        shutil.rmtree(leftover, ignore_errors=True)
