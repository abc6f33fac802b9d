"""Typed run configuration: nested dataclasses, loaded from YAML, with dotted key=value overrides.

Every field is checked against its annotation when loaded, so a typo or a wrong type stops the
run at start-up with a message that names the key, instead of hours later inside the trainer.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ConfigError(ValueError):
    """A configuration problem the user can fix; recipes print it as one line."""


@dataclass
class VisionConfig:
    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    patch_drop_rate: float = 0.0  # FLIP: share of patches dropped in training; eval never drops
    act: str = "quick_gelu"  # OpenAI CLIP ViTs, and so Chinese-CLIP's, use QuickGELU
    drop_path_rate: float = 0.0


@dataclass
class TextConfig:
    vocab_size: int = 21128  # the cn_clip / chinese-roberta-wwm-ext vocabulary
    hidden_size: int = 768
    layers: int = 12
    heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    dropout: float = 0.1  # hidden and attention dropout, as RoBERTa-wwm-ext was trained


@dataclass
class ModelConfig:
    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    init_logit_scale: float = math.log(1 / 0.07)  # CLIP's temperature 0.07
    init_logit_bias: float = -10.0  # SigLIP's initial bias; unused (and frozen) by InfoNCE
    grad_checkpointing: bool = False  # recompute both towers' activations in backward


@dataclass
class SyntheticConfig:
    train_size: int = 100_000  # images are drawn on demand from (seed, index): size costs nothing
    val_size: int = 1_000
    seed: int = 0


@dataclass
class DataConfig:
    source: Literal["synthetic"] = "synthetic"
    batch_size: int = 128  # per device; the global batch is batch_size x processes
    num_workers: int = 1
    context_length: int = 52  # Chinese-CLIP's text length
    vocab: Optional[str] = None  # vocab.txt or a tokenizer directory; None = cn_clip's vocabulary
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class LossConfig:
    name: Literal["clip"] = "clip"
    local_loss: bool = False  # only this rank's rows of the logit matrix: memory linear in the batch


@dataclass
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.2  # CLIP's; never applied to norms, biases, embeddings' scalars or logit params
    betas: tuple[float, float] = (0.9, 0.98)  # CLIP's beta2 for stability at large batch
    eps: float = 1e-6
    warmup_steps: int = 500
    min_lr_ratio: float = 0.0  # cosine decays to lr x this
    grad_clip: float = 1.0  # max global grad norm; 0 disables


@dataclass
class TrainConfig:
    steps: int = 1000
    seed: int = 0
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"  # auto: bf16 on GPUs that have it
    log_every: int = 10


@dataclass
class EvalConfig:
    at_start: bool = True  # zero-shot scores of the untrained model, as the baseline
    at_end: bool = True
    batch_size: int = 256


@dataclass
class RunConfig:
    name: str = "run"
    output_dir: Optional[str] = None  # None: runs/<name>


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """YAML file (or defaults when None) plus `a.b.c=value` overrides -> a checked Config."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        _set_dotted(raw, key.strip(), yaml.safe_load(value) if value.strip() else None)
    return _build(Config, raw, prefix="")


def to_dict(cfg: Any) -> dict:
    """Plain dict of a config (tuples as lists) for YAML dumps and logging."""
    return yaml.safe_load(yaml.safe_dump(_plain(dataclasses.asdict(cfg))))


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True))


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; for hyperparameter logging."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _build(cls: type, raw: Any, prefix: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a section (mapping), got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else f" (known: {', '.join(names)})"
            raise ConfigError(f"unknown config key {prefix}{key}{hint}")
    kwargs = {name: _coerce(raw[name], hints[name], f"{prefix}{name}") for name in names if name in raw}
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, key: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, prefix=f"{key}.")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: expected one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        # YAML 1.1 reads `1e-3` (no dot) as a string; accept any number spelling Python accepts.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{key}: unsupported annotation {tp!r}")
