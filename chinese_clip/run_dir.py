"""A run's directory, and the one owner of everything written into it.

    .lock                 held by the launch that trains here (see `RunDir.hold`)
    config.yaml           the resolved config
    metrics.jsonl         one line per logged step (and TensorBoard under tensorboard/)
    stages/I-NAME.safetensors   full fp32 weights at the start of stage I
    checkpoints/step_N/   the engine's state of every rank, and trainer_state.json, written last
    model/  best/         final and best weights (model directories of ours: HF ChineseCLIPModel
                          directories with config.yaml and a model card, README.md)
    eval.json             every evaluation: before, during (by step), after, and the best score
    skipped/rank-N.jsonl  training samples that did not decode (written by the data workers)

A checkpoint is written under a hidden `.step_N.partial` name and renamed only when every rank has
finished and the trainer state is on disk, so a run killed or out of disk mid-write leaves the
previous checkpoint as the newest complete one. Ranks on several nodes must share the filesystem.
Parameters a stage freezes are read back from its stage weights (fp32), never from an engine,
whose copy may be bf16.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from chinese_clip.checkpoints import CONFIG_FILE, model_from_weights, read_weights, save_pretrained, write_weights
from chinese_clip.config import Config, ConfigError, flatten, load_config, save_config, to_dict
from chinese_clip.engine import Engine, consolidate_checkpoint
from chinese_clip.model import ChineseCLIP
from chinese_clip.model_card import write_model_card
from chinese_clip.redact import redact
from chinese_clip.stages import Stage, plan_stages
from chinese_clip.tokenizer import ChineseTokenizer

STATE_FILE = "trainer_state.json"
LOCK_FILE = ".lock"
_COMPLETE = re.compile(r"step_(\d+)")


class RunDirError(Exception):
    """Something of the run could not be written (a full disk, a lost mount): the run stops."""


class RunDir:
    """Where one run keeps everything. Creating it touches nothing; `hold` claims the directory for
    this launch, `open` prepares it for training. Writes happen on the main process, and the methods
    that every rank calls together say so."""

    def __init__(self, path: str | Path, accelerator: Accelerator):
        self.path = Path(path)
        self.accelerator = accelerator
        self._lock = None  # the open lock file, for as long as this launch lives

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def stage_weights_path(self, stage: Stage) -> Path:
        return self.path / "stages" / f"{stage.index}-{stage.name}.safetensors"

    def skipped_log(self, rank: int) -> Path:
        return self.path / "skipped" / f"rank-{rank}.jsonl"

    # -- one launch at a time ----------------------------------------------------------------------
    def hold(self) -> None:
        """Every rank. Claim the directory for this launch, or stop (ConfigError) because a live run
        holds it. The claim is an flock of the main process: the kernel drops it when that process
        ends, however it ends, so a crashed run never leaves the directory locked."""
        refusal = None
        if self.accelerator.is_main_process:
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock = open(self.path / LOCK_FILE, "a+")
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._lock.seek(0)
                holder = self._lock.read().strip() or "another process"
                refusal = (f"{self.path} is in use by a live run ({holder}); wait for it to end or stop it, "
                           "or give this run another run.output_dir")
            else:
                self._lock.seek(0)
                self._lock.truncate()
                self._lock.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}")
                self._lock.flush()
        refusal = broadcast_object_list([refusal])[0]
        if refusal:
            raise ConfigError(refusal)

    def open(self, cfg: Config, resumed_step: int | None) -> None:
        """Every rank. Ready for training: the config written, a checkpoint write cut short removed, the
        metrics of a fresh run cleared or those of a resumed run kept up to its checkpoint, TensorBoard started."""
        if self.accelerator.is_main_process:
            self.path.mkdir(parents=True, exist_ok=True)
            for leftover in [*self.checkpoints.glob(".step_*.partial"), *self.checkpoints.glob(".step_*.stale")]:
                shutil.rmtree(leftover, ignore_errors=True)
            save_config(cfg, self.path / CONFIG_FILE)
            metrics = self.path / "metrics.jsonl"
            if resumed_step is None or not metrics.is_file():
                metrics.unlink(missing_ok=True)
            else:
                kept = [line for line in metrics.read_text().splitlines() if json.loads(line)["step"] <= resumed_step]
                metrics.write_text("".join(line + "\n" for line in kept))
        self.accelerator.wait_for_everyone()
        hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                   for k, v in flatten(redact(to_dict(cfg))).items()}  # trackers upload them
        self.accelerator.init_trackers(cfg.run.name, config=hparams)

    # -- logs, weights, results --------------------------------------------------------------------
    def log(self, step: int, record: dict, tag: str | None = None) -> None:
        """Every rank (TensorBoard logs on the main one). One line of metrics.jsonl."""
        self.accelerator.log(record, step=step)
        if self.accelerator.is_main_process:
            line = {"step": step, **({"tag": tag} if tag else {}), **record}
            with open(self.path / "metrics.jsonl", "a") as f:
                f.write(json.dumps(line, ensure_ascii=False) + "\n")

    def write_stage_weights(self, stage: Stage, weights: dict[str, torch.Tensor] | None) -> None:
        """Every rank. The stage's starting weights (the main process's `weights`; the others may pass
        None): where its frozen parameters are read back from."""
        if self.accelerator.is_main_process:
            write_weights(weights, self.stage_weights_path(stage))
        self.accelerator.wait_for_everyone()

    def read_stage_weights(self, stage: Stage, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        return read_weights(self.stage_weights_path(stage), names)

    def save_model(self, weights: dict[str, torch.Tensor], cfg: Config, tokenizer: ChineseTokenizer | None) -> None:
        if self.accelerator.is_main_process:
            save_pretrained(weights, cfg, self.path / "model", tokenizer)
            self.write_card("model", cfg, {})

    def save_best(self, weights: dict[str, torch.Tensor], cfg: Config, tokenizer: ChineseTokenizer | None,
                  best: dict) -> None:
        """best/ (a model directory and best.json): the new copy is complete before it replaces the old one."""
        if not self.accelerator.is_main_process:
            return
        best_dir, partial, old = (self.path / name for name in ("best", "best.partial", "best.old"))
        shutil.rmtree(partial, ignore_errors=True)
        save_pretrained(weights, cfg, partial, tokenizer)
        (partial / "best.json").write_text(json.dumps(best, indent=2))
        write_model_card(partial, cfg, self.plan(cfg), {"best": best}, best["step"])
        if best_dir.exists():
            best_dir.rename(old)
        partial.rename(best_dir)
        shutil.rmtree(old, ignore_errors=True)

    def write_results(self, results: dict) -> None:
        """eval.json, and the model cards of model/ and best/ brought up to date with it."""
        if self.accelerator.is_main_process:
            (self.path / "eval.json").write_text(json.dumps(results, indent=2, ensure_ascii=False))
            cfg = load_config(self.path / CONFIG_FILE)
            for name in ("model", "best"):
                if (self.path / name).is_dir():
                    self.write_card(name, cfg, results)

    def write_card(self, name: str, cfg: Config, results: dict) -> None:
        best = self.path / name / "best.json"
        step = json.loads(best.read_text())["step"] if name == "best" and best.is_file() else None
        write_model_card(self.path / name, cfg, self.plan(cfg), results, step)

    def plan(self, cfg: Config) -> list[Stage]:
        return plan_stages(cfg.stages, self.accelerator.num_processes, cfg.train.accum_freq)

    # -- checkpoints -------------------------------------------------------------------------------
    def find_checkpoint(self, resume: str) -> Path | None:
        """checkpoint.resume: "auto" (the newest complete checkpoint, or None), "never", or a path."""
        if resume == "never":
            return None
        if resume == "auto":
            found = complete_checkpoints(self.path)
            return found[-1] if found else None
        read_trainer_state(Path(resume))  # refuses an incomplete one
        return Path(resume)

    def save_checkpoint(self, engine: Engine, trainer_state: dict, keep_last: int) -> Path:
        """Every rank. Each writes its share into a partial directory; the main process completes it with
        the trainer state, renames it into place, and then deletes all but the newest `keep_last`. A
        write that fails stops the run (RunDirError) with the previous checkpoint untouched."""
        acc = self.accelerator
        final = self.checkpoints / f"step_{trainer_state['step']}"
        partial = self.checkpoints / f".{final.name}.partial"
        try:
            if acc.is_main_process:
                shutil.rmtree(partial, ignore_errors=True)
                self.checkpoints.mkdir(parents=True, exist_ok=True)
            acc.wait_for_everyone()
            engine.save(partial)
            acc.wait_for_everyone()
            if acc.is_main_process:
                (partial / STATE_FILE).write_text(json.dumps(trainer_state, indent=2, ensure_ascii=False))
        except Exception as e:  # torch.save, safetensors and DCP each report a refused write in their own way
            found = complete_checkpoints(self.path)
            kept = f"{found[-1].name} is still the newest complete checkpoint" if found else "there is no earlier checkpoint"
            free = shutil.disk_usage(self.checkpoints).free / 2**20
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise RunDirError(f"checkpoint {final.name} could not be written to {self.checkpoints} ({reason}; "
                              f"{free:,.0f} MiB free there); {kept}. Free space or fix the directory, then relaunch to "
                              "resume") from e
        if acc.is_main_process:
            stale = self.checkpoints / f".{final.name}.stale"
            if final.exists():  # the same step again, after resuming from an older checkpoint
                os.replace(final, stale)
            os.replace(partial, final)
            shutil.rmtree(stale, ignore_errors=True)
            for old in complete_checkpoints(self.path)[:-keep_last]:
                shutil.rmtree(old)
        acc.wait_for_everyone()
        return final


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of the run at `run_dir`, oldest first."""
    root = run_dir / "checkpoints"
    found = [(int(m.group(1)), p) for p in root.glob("step_*") if (m := _COMPLETE.fullmatch(p.name))
             and (p / STATE_FILE).is_file()] if root.is_dir() else []
    return [p for _, p in sorted(found)]


def read_trainer_state(checkpoint: Path) -> dict:
    state_file = Path(checkpoint) / STATE_FILE
    if not state_file.is_file():
        raise ConfigError(f"{checkpoint} is not a complete checkpoint: {STATE_FILE} is missing")
    return json.loads(state_file.read_text())


def consolidate(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights of a training checkpoint `runs/<name>/checkpoints/step_N`, in one process: the
    trained parameters from the engine's shards (fp32 master copies), the frozen ones from the stage's
    weights file."""
    checkpoint = Path(checkpoint)
    state = read_trainer_state(checkpoint)
    weights = consolidate_checkpoint(checkpoint)
    weights.update(read_weights(checkpoint.parent.parent / state["stage_weights"], state["frozen"]))
    return {name: value.float() for name, value in weights.items()}


def checkpoint_model(checkpoint: str | Path) -> tuple[ChineseCLIP, Config]:
    """The model a training checkpoint holds, with its run's config."""
    checkpoint = Path(checkpoint)
    cfg = load_config(checkpoint.parent.parent / CONFIG_FILE)
    return model_from_weights(cfg.model, consolidate(checkpoint), checkpoint), cfg


def write_checkpoint_card(checkpoint: str | Path, cfg: Config, out_dir: str | Path) -> None:
    """The model card of a training checkpoint's weights: its run's stages (on as many processes as
    saved it) and the evaluations up to it, or the run's eval.json when it is the run's last step."""
    checkpoint = Path(checkpoint)
    state = read_trainer_state(checkpoint)
    plan = plan_stages(cfg.stages, len(state["data"]), cfg.train.accum_freq)  # one data position per rank
    run_results = checkpoint.parent.parent / "eval.json"
    if state["step"] == plan[-1].end_step and run_results.is_file():
        results = json.loads(run_results.read_text())
    else:
        results = {**state["results"], **({"best": state["best"]} if state["best"] else {})}
    write_model_card(out_dir, cfg, plan, results, state["step"])
