"""Typed run configuration: nested dataclasses, loaded from YAML, with dotted key=value overrides.

Every field is checked against its annotation when loaded, so a typo or a wrong type stops the
run at start-up with a message that names the key, instead of hours later inside the trainer.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from chinese_clip.redact import redact

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
    # None: the loss's own choice (loss.name): InfoNCE starts at CLIP's temperature 0.07;
    # SigLIP at scale 10 and bias -10, as in the SigLIP paper. InfoNCE has no bias (it is frozen).
    init_logit_scale: Optional[float] = None  # log of the multiplier
    init_logit_bias: Optional[float] = None
    grad_checkpointing: bool = False  # recompute both towers' activations in backward


@dataclass
class SyntheticConfig:
    train_size: int = 100_000  # images are drawn on demand from (seed, index): size costs nothing
    val_size: int = 1_000
    seed: int = 0


@dataclass
class ShardSourceConfig:
    # webdataset tars or build_shards' parquet shards: a directory, a file, a glob or a brace list
    # ({00000..09999}.tar), local or an fsspec URL (s3://, gs://, hf://, https://)
    path: str = ""
    weight: float = 1.0  # relative share of each batch's samples; a small source with a large weight repeats
    # Curated shards (data_tools/curate.py write a score column): train only on pairs scoring at least
    # this, so another threshold needs no rebuild. The others are filtered and logged with their score.
    min_score: Optional[float] = None


@dataclass
class DataConfig:
    source: Literal["synthetic", "shards"] = "synthetic"
    shards: list[ShardSourceConfig] = field(default_factory=list)  # source=shards: where the pairs are
    batch_size: int = 128  # per device; the global batch is batch_size x processes
    num_workers: int = 1
    # The GPU input path: pinned host memory (with non-blocking copies), and batches each worker
    # prepares ahead; auto: pinned on CUDA, and 4 batches ahead there (torch's 2 on CPU)
    pin_memory: Literal["auto", True, False] = "auto"
    prefetch_factor: Union[Literal["auto"], int] = "auto"
    # Samples each dataloader worker mixes before batching; it holds their encoded images in memory.
    shuffle_buffer: int = 2000
    # Pretraining crops at random (scale is the crop's share of the image's area); "resize" squashes
    # the whole image to a square, as Chinese-CLIP trained and evaluates its released models.
    transform: Literal["random_resized_crop", "resize"] = "random_resized_crop"
    crop_scale: tuple[float, float] = (0.9, 1.0)
    # A sample that fails to decode in training is skipped and counted; past this share of the
    # samples a dataloader worker has read (once it has read bad_check_after) the run stops.
    max_bad_fraction: float = 0.01
    bad_check_after: int = 1000
    # Resume with other ranks, workers or sources: restart the data stream instead of refusing.
    reset_position: bool = False
    context_length: int = 52  # Chinese-CLIP's text length
    vocab: Optional[str] = None  # vocab.txt or a tokenizer directory; None = cn_clip's vocabulary
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class LossConfig:
    name: Literal["clip", "siglip"] = "clip"  # InfoNCE over the global batch, or SigLIP's pairwise sigmoid
    local_loss: bool = False  # clip: only this rank's rows of the logit matrix, memory linear in the batch
    exchange: Literal["ring", "gather"] = "ring"  # siglip: pass texts around the ranks, or gather them once
    chunk_size: Optional[int] = 1024  # siglip/triplet: image rows per logit block (recomputed in backward)
    triplet_alpha: float = 0.0  # weight of the hardest-negative triplet term; 0 leaves it out
    triplet_margin: float = 0.2  # in Euclidean distance between unit vectors (0..2)
    mask_false_negatives: bool = True  # samples sharing an image id or a caption are not negatives


@dataclass
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.2  # CLIP's; never applied to norms, biases, embeddings' scalars or logit params
    betas: tuple[float, float] = (0.9, 0.98)  # CLIP's; the SigLIP paper lowers beta2 to 0.95 at large batch
    eps: float = 1e-6
    warmup_steps: int = 500
    schedule: Literal["cosine", "linear", "constant"] = "cosine"  # after the warmup
    min_lr_ratio: float = 0.0  # cosine and linear decay to lr x this
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    # torch's fused AdamW kernel (one launch for all parameters; every engine, ZeRO included); auto: on CUDA
    fused: Literal["auto", True, False] = "auto"
    # Fine-tuning: weight decay pulls towards the weights each optimizer starts from (the pretrained
    # ones, for a stage that starts from them) instead of towards zero.
    decay_to_start: bool = False


@dataclass
class ParamRule:
    """Parameters whose full name matches `pattern` (re.fullmatch) train at lr x `lr_scale`."""
    pattern: str = ""  # e.g. visual\..* is the whole vision tower; visual\.blocks\.([0-9]|10)\..* its first 11 blocks
    lr_scale: float = 0.0  # 0 freezes them: no gradient, no optimizer state


@dataclass
class StageConfig:
    """One stage of a staged schedule. Unset (None) values come from optim.*, data.batch_size and
    model.vision.patch_drop_rate when the config is loaded, so the saved config shows what ran."""
    name: str = "train"
    steps: Optional[int] = None  # length in optimizer steps, or ...
    samples: Optional[int] = None  # ... in samples seen, rounded up to whole global batches
    params: list[ParamRule] = field(default_factory=list)  # first match wins; unmatched parameters train at lr x 1
    mask_ratio: Optional[float] = None  # FLIP: share of patches dropped in training; 0 is an unmasked stage
    batch_size: Optional[int] = None  # per device; a masked stage affords a larger one (FLIP's point)
    lr: Optional[float] = None
    warmup_steps: Optional[int] = None  # counted from the stage's first step
    schedule: Optional[Literal["cosine", "linear", "constant"]] = None
    min_lr_ratio: Optional[float] = None
    weight_decay: Optional[float] = None
    layer_decay: Optional[float] = None  # fine-tuning: block i of L trains at lr x layer_decay^(L - i); None: off


@dataclass
class TrainConfig:
    steps: Optional[int] = None  # a run without `stages` is one stage of this many steps (default 1000)
    seed: int = 0
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"  # auto: bf16 on GPUs that have it
    # TF32 for fp32 matmuls and convolutions (what runs outside autocast); auto: on Ampere and newer GPUs
    tf32: Literal["auto", True, False] = "auto"
    log_every: int = 10
    # Gradient cache: one optimizer step over accum_freq micro-batches of data.batch_size, every
    # sample a negative for every other, at the activation memory of one micro-batch.
    accum_freq: int = 1
    # torch threads per process; None: cores / processes on the machine, unless OMP_NUM_THREADS was set
    # for the launch (`accelerate launch` and torchrun would otherwise start every process with one)
    cpu_threads: Optional[int] = None
    # torch.compile each transformer block (inductor): faster steps after a compile of about half a
    # minute on a CPU at the start (and a shorter one when a stage changes the batch or mask ratio)
    compile: bool = False


@dataclass
class EvalSetConfig:
    """One evaluation set. `path` may name environment variables (${DATAPATH}), as Chinese-CLIP's scripts do."""
    name: str = ""  # how results, logs (eval/<name>/<metric>) and eval.best_metric refer to it
    task: Literal["retrieval", "classification"] = "retrieval"
    # retrieval: a directory in Chinese-CLIP's layout or our shards (a directory, .parquet file, glob or URL);
    # classification: an image folder with one sub-folder per class
    path: str = ""
    split: str = "valid"  # Chinese-CLIP's layout: {split}_imgs.tsv + {split}_texts.jsonl
    # classification: a label file (one Chinese class name per line, in sub-folder order), "cn_clip"
    # (the ImageNet class names in the cn_clip package), or unset: label_cn.txt in or beside the folder
    labels: Optional[str] = None
    # classification: a file (one prompt per line, {} for the class name), cn_clip:<name> (one of the
    # lists in cn_clip: food, aircraft, ..., imagenet), or unset: the 183 Chinese-CLIP's zero-shot script uses
    templates: Optional[str] = None
    reference: dict[str, float] = field(default_factory=dict)  # published scores to show beside ours, metric -> %


@dataclass
class EvalConfig:
    at_start: bool = True  # zero-shot scores of the untrained model, as the baseline
    at_end: bool = True
    every_steps: int = 0  # also every this many optimizer steps; 0: never
    at_stage_end: bool = False  # also when each stage but the last ends (the last is at_end)
    batch_size: int = 256
    num_workers: int = 2  # DataLoader workers per process decoding the sets' images
    mixed_precision: Literal["auto", "no", "bf16"] = "auto"  # encoding under autocast; auto: bf16 on GPUs that have it
    sets: list[EvalSetConfig] = field(default_factory=list)  # besides the synthetic held-out splits on synthetic data
    # "<set name>/<metric>" (e.g. MUGE/mean_recall): the weights that score highest on it are kept in
    # <run>/best/; None keeps none
    best_metric: Optional[str] = None
    reference_name: str = ""  # whose numbers the sets' `reference` holds, for the table header


@dataclass
class CheckpointConfig:
    every_steps: int = 1000  # besides these, a checkpoint at every stage end and at the end; 0: only those
    keep_last: int = 2  # complete checkpoints kept; older ones are deleted once a newer one is complete
    resume: str = "auto"  # auto: the newest complete checkpoint of this run, if any; never; or a checkpoint path


@dataclass
class InitConfig:
    """Where training starts; unset: random weights from train.seed. Applied only to a fresh run (a
    resumed one continues from its checkpoint)."""
    pretrained: Optional[str] = None  # a whole model (Chinese-CLIP .pt, HF ChineseCLIPModel dir, ours): its architecture replaces model.*
    model_name: Optional[str] = None  # the Chinese-CLIP architecture of a .pt ("ViT-B-16"), for its head counts
    vision: Optional[str] = None  # the image tower: OpenAI / open_clip CLIP weights or a timm ViT checkpoint
    text: Optional[str] = None  # the text tower: an HF BERT directory (chinese-roberta-wwm-ext, RBT3)


@dataclass
class RunConfig:
    name: str = "run"
    output_dir: Optional[str] = None  # None: runs/<name>
    # Where the metrics go besides metrics.jsonl: any of Accelerate's trackers (tensorboard, wandb, mlflow,
    # comet_ml, aim, clearml, dvclive, swanlab, trackio), each under the project name run.name; [] for none
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    stages: list[StageConfig] = field(default_factory=list)  # empty: one stage of train.steps
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    init: InitConfig = field(default_factory=InitConfig)
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
    return _resolve(_check(_build(Config, raw, prefix="")))


DEFAULT_STEPS = 1000
LOGIT_INIT = {  # loss name -> (log logit scale, logit bias)
    "clip": (math.log(1 / 0.07), -10.0),
    "siglip": (math.log(10), -10.0),
}


def _check(cfg: Config) -> Config:
    """Ranges and combinations that the types alone cannot express."""
    positive = {"train.accum_freq": cfg.train.accum_freq, "data.batch_size": cfg.data.batch_size,
                "loss.chunk_size": 1 if cfg.loss.chunk_size is None else cfg.loss.chunk_size}
    for key, value in (("train.steps", cfg.train.steps), ("train.cpu_threads", cfg.train.cpu_threads),
                       ("data.prefetch_factor", cfg.data.prefetch_factor)):
        if value not in (None, "auto"):
            positive[key] = value
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be at least 1, got {value}")
    if any(source.weight <= 0 for source in cfg.data.shards):
        raise ConfigError("data.shards: every weight must be > 0")
    if not 0 < cfg.data.crop_scale[0] <= cfg.data.crop_scale[1] <= 1:
        raise ConfigError(f"data.crop_scale must satisfy 0 < low <= high <= 1, got {list(cfg.data.crop_scale)}")
    if not 0 <= cfg.data.max_bad_fraction <= 1 or cfg.data.shuffle_buffer < 1:
        raise ConfigError("data.max_bad_fraction must be in [0, 1] and data.shuffle_buffer at least 1")
    if cfg.loss.triplet_alpha < 0:
        raise ConfigError(f"loss.triplet_alpha must be >= 0, got {cfg.loss.triplet_alpha}")
    if cfg.loss.local_loss and cfg.loss.name != "clip":
        raise ConfigError("loss.local_loss applies to loss.name=clip; siglip always computes this rank's rows only")
    if not 0 <= cfg.model.vision.patch_drop_rate < 1:
        raise ConfigError(f"model.vision.patch_drop_rate must be in [0, 1), got {cfg.model.vision.patch_drop_rate}")
    if cfg.checkpoint.every_steps < 0 or cfg.checkpoint.keep_last < 1:
        raise ConfigError("checkpoint.every_steps must be >= 0 and checkpoint.keep_last >= 1")
    if cfg.eval.every_steps < 0:
        raise ConfigError(f"eval.every_steps must be >= 0, got {cfg.eval.every_steps}")
    if cfg.init.pretrained and (cfg.init.vision or cfg.init.text):
        raise ConfigError("init.pretrained gives the whole model; init.vision and init.text start single towers: "
                          "use one or the other")
    if cfg.stages and cfg.train.steps is not None:
        raise ConfigError("train.steps and stages both set the run's length; give each stage its steps or samples")
    names = [stage.name for stage in cfg.stages]
    for i, stage in enumerate(cfg.stages):
        _check_stage(stage, f"stages[{i}] ({stage.name})")
        if names.count(stage.name) > 1:
            raise ConfigError(f"stage name {stage.name!r} is used twice; names identify stages in logs and checkpoints")
    return cfg


def _check_stage(stage: StageConfig, where: str) -> None:
    if (stage.steps is None) == (stage.samples is None):
        raise ConfigError(f"{where}: give exactly one of steps and samples")
    if (stage.steps or stage.samples) < 1:
        raise ConfigError(f"{where}: its length must be at least 1")
    if stage.mask_ratio is not None and not 0 <= stage.mask_ratio < 1:
        raise ConfigError(f"{where}: mask_ratio must be in [0, 1), got {stage.mask_ratio}")
    if stage.layer_decay is not None and not 0 < stage.layer_decay <= 1:
        raise ConfigError(f"{where}: layer_decay must be in (0, 1], got {stage.layer_decay}")
    if stage.batch_size is not None and stage.batch_size < 1:
        raise ConfigError(f"{where}: batch_size must be at least 1, got {stage.batch_size}")
    for rule in stage.params:
        try:
            re.compile(rule.pattern)
        except re.error as e:
            raise ConfigError(f"{where}: pattern \"{rule.pattern}\" is not a valid regular expression: {e}") from None
        if rule.lr_scale < 0:
            raise ConfigError(f"{where}: lr_scale of \"{rule.pattern}\" must be >= 0, got {rule.lr_scale}")


def _resolve(cfg: Config) -> Config:
    """Fill the defaults that depend on other fields, so the saved config says what actually ran."""
    scale, bias = LOGIT_INIT[cfg.loss.name]
    if cfg.model.init_logit_scale is None:
        cfg.model.init_logit_scale = scale
    if cfg.model.init_logit_bias is None:
        cfg.model.init_logit_bias = bias
    if not cfg.stages:
        cfg.stages = [StageConfig(name="train", steps=cfg.train.steps or DEFAULT_STEPS)]
        cfg.train.steps = None
    inherited = {"mask_ratio": cfg.model.vision.patch_drop_rate, "batch_size": cfg.data.batch_size,
                 "lr": cfg.optim.lr, "warmup_steps": cfg.optim.warmup_steps, "schedule": cfg.optim.schedule,
                 "min_lr_ratio": cfg.optim.min_lr_ratio, "weight_decay": cfg.optim.weight_decay}
    for stage in cfg.stages:
        for key, value in inherited.items():
            if getattr(stage, key) is None:
                setattr(stage, key, value)
    return cfg


def to_dict(cfg: Any) -> dict:
    """Plain dict of a config (tuples as lists) for YAML dumps and logging."""
    return yaml.safe_load(yaml.safe_dump(_plain(dataclasses.asdict(cfg))))


def save_config(cfg: Config, path: str | Path) -> None:
    """config.yaml, with the credentials in URLs redacted: it is shared and published. Nothing that needs the
    real URLs reads it back (a resumed run takes its config from the command line)."""
    Path(path).write_text(yaml.safe_dump(redact(to_dict(cfg)), sort_keys=False, allow_unicode=True))


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
    """`a.b.c=v`; a number indexes a list that the YAML already has (`stages.1.lr=1e-4`)."""
    node = raw
    parts = key.split(".")
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override {key}: {'.'.join(parts[:depth]) or 'config'} has {len(node)} entries; "
                                  f"{part!r} is not one of their indices")
            part = int(part)
            if last:
                node[part] = value
            else:
                node = node[part]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise ConfigError(f"override {key}: {'.'.join(parts[:depth])} is a value, not a section")


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


def _yaml_repr(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else repr(value)


def _coerce(value: Any, tp: Any, key: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, prefix=f"{key}.")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for option in inner[:-1]:  # the first that takes the value; the last one's error otherwise
            try:
                return _coerce(value, option, key)
            except ConfigError:
                pass
        return _coerce(value, inner[-1], key)
    if origin is Literal:
        if isinstance(value, bool) and not any(isinstance(option, bool) for option in args):
            value = "yes" if value else "no"  # YAML 1.1 reads an unquoted no (train.mixed_precision=no) as false
        if not any(value == option and type(value) is type(option) for option in args):  # 1 is not True
            raise ConfigError(f"{key}: expected one of {', '.join(map(_yaml_repr, args))}, got {_yaml_repr(value)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {_coerce(k, args[0], f"{key} key"): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
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
