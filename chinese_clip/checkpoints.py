"""Model weights in and out: this project's model directory, and consolidated fp32 weights from a
training checkpoint (ZeRO shards included).

A model directory holds `model.safetensors` (fp32), `config.yaml` (the run config; its `model`
section is the architecture) and the tokenizer's `vocab.txt`.
"""
from __future__ import annotations

from pathlib import Path

import torch
from accelerate.utils.constants import MODEL_NAME, SAFE_WEIGHTS_NAME

from chinese_clip.config import Config, load_config, save_config
from chinese_clip.model import ChineseCLIP
from chinese_clip.resume import read_trainer_state, read_weights, write_weights
from chinese_clip.tokenizer import ChineseTokenizer, load_tokenizer

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"


def save_pretrained(weights: dict[str, torch.Tensor], cfg: Config, out_dir: Path,
                    tokenizer: ChineseTokenizer | None = None) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_weights(weights, out_dir / WEIGHTS_FILE)
    save_config(cfg, out_dir / CONFIG_FILE)
    if tokenizer is not None:
        tokenizer.save(out_dir)


def load_pretrained(path: str | Path) -> ChineseCLIP:
    """A model directory written by `save_pretrained` (a run's `model/`, or `recipes/export.py`'s output)."""
    path = Path(path)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise ValueError(f"{path}: no {name}; expected a model directory with {CONFIG_FILE} and {WEIGHTS_FILE}")
    model = ChineseCLIP(load_config(path / CONFIG_FILE).model)
    weights = read_weights(path / WEIGHTS_FILE)
    expected = model.state_dict()
    missing, unexpected = expected.keys() - weights.keys(), weights.keys() - expected.keys()
    if missing or unexpected:
        raise ValueError(f"{path / WEIGHTS_FILE} does not match {path / CONFIG_FILE}: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    for name, value in weights.items():
        if value.shape != expected[name].shape:
            raise ValueError(f"{path / WEIGHTS_FILE}: {name} has shape {tuple(value.shape)}, "
                             f"the config gives {tuple(expected[name].shape)}")
    model.load_state_dict(weights)
    return model


def consolidate(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights of a training checkpoint `runs/<name>/checkpoints/step_N`: trained parameters
    from the optimizer's fp32 copies (ZeRO shards are merged), frozen ones from the stage's weights file."""
    checkpoint = Path(checkpoint)
    state = read_trainer_state(checkpoint)
    if (checkpoint / MODEL_NAME).is_dir():  # DeepSpeed: one shard per rank
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        weights = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=MODEL_NAME)
    else:  # plain or DDP: Accelerate saved the whole (wrapped) model
        weights = {name.removeprefix("module."): value for name, value in read_weights(checkpoint / SAFE_WEIGHTS_NAME).items()}
    run_dir = checkpoint.parent.parent
    weights.update(read_weights(run_dir / state["stage_weights"], state["frozen"]))
    return {name: value.float() for name, value in weights.items()}


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """A training checkpoint -> a model directory that `load_pretrained` reads."""
    checkpoint = Path(checkpoint)
    run_dir = checkpoint.parent.parent
    cfg = load_config(run_dir / CONFIG_FILE)
    tokenizer = load_tokenizer(cfg.data.vocab, cfg.data.context_length)
    save_pretrained(consolidate(checkpoint), cfg, Path(out_dir), tokenizer)
    return Path(out_dir)
