"""Model weights in and out: this project's model directory, Chinese-CLIP `.pt` files, HF
`ChineseCLIPModel` directories, and the towers' starting weights for pretraining.

A model directory of ours is an HF ChineseCLIPModel directory (config.json, model.safetensors in HF
names, fp32, the tokenizer and image preprocessor files) plus `config.yaml` (the run config; its
`model` section is the architecture), the tokenizer's `vocab.txt` and a model card (README.md).
Earlier versions wrote `model.safetensors` in our own names; those directories still load. The key
mappings between the formats live in `chinese_clip.convert`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import checkpoint_filter_fn

from chinese_clip import convert
from chinese_clip.config import (CLIP_MEAN, CLIP_STD, LOGIT_INIT, Config, ConfigError, ModelConfig, load_config,
                                 save_config)
from chinese_clip.model import ChineseCLIP
from chinese_clip.tokenizer import ChineseTokenizer, load_tokenizer

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
HF_CONFIG_FILE = "config.json"
HF_WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin")


def write_weights(weights: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Atomically: a reader sees the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    save_file({k: v.contiguous() for k, v in weights.items()}, str(partial), metadata=metadata)
    os.replace(partial, path)


def read_weights(path: Path, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    try:
        weights = load_file(str(path))
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None
    return weights if names is None else {name: weights[name] for name in names}


def save_pretrained(weights: dict[str, torch.Tensor], cfg: Config, out_dir: Path,
                    tokenizer: ChineseTokenizer | None = None) -> None:
    """A model directory of ours: `weights` (our names) as an HF ChineseCLIPModel directory, and the run config."""
    tokenizer = tokenizer or load_tokenizer(cfg.data.vocab, cfg.data.context_length)
    write_hf(weights, cfg.model, Path(out_dir), tokenizer, cfg.data.mean, cfg.data.std)
    save_config(cfg, Path(out_dir) / CONFIG_FILE)


def load_pretrained(path: str | Path, model_name: str | None = None) -> ChineseCLIP:
    """A Chinese-CLIP `.pt` (released or trained), an HF ChineseCLIPModel directory, or a model
    directory of ours (a run's `model/`, or `recipes/export.py`'s output). A `.pt` holds no head
    counts: they are width / 64, as in every released Chinese-CLIP, unless `model_name` names the
    architecture ("ViT-B-16", or "<vision>@<text>" of cn_clip's model configs)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_file():
        return _load_cn_clip(path, model_name)
    if (path / CONFIG_FILE).is_file():
        cfg = load_config(path / CONFIG_FILE).model
        weights = read_weights(_require(path, WEIGHTS_FILE))
        if convert.is_hf_layout(weights):  # else our own names, as model directories were first written
            weights = _from_hf(weights, path / WEIGHTS_FILE)
        return model_from_weights(cfg, weights, path / WEIGHTS_FILE)
    if (path / HF_CONFIG_FILE).is_file():
        return _load_hf(path)
    raise ValueError(f"{path}: no {CONFIG_FILE} (a model directory of ours) or {HF_CONFIG_FILE} (an HF ChineseCLIPModel); "
                     "expected one of them, or a Chinese-CLIP .pt file")


def _require(directory: Path, name: str) -> Path:
    if not (directory / name).is_file():
        raise ValueError(f"{directory}: no {name}; expected a model directory with {CONFIG_FILE} and {WEIGHTS_FILE}")
    return directory / name


def _torch_load(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as e:
        raise ValueError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): "
                         f"{str(e).splitlines()[0]}") from None


def _state_dict(checkpoint: object, path: Path, keys: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The tensors by name in `checkpoint`, or in its entry under the first of `keys` it has; what else it
    holds (an epoch, an optimizer's settings) is left out, and a missing tensor is the caller's to name."""
    weights = checkpoint
    if isinstance(checkpoint, dict):
        weights = next((checkpoint[key] for key in keys if key in checkpoint), checkpoint)
    if not isinstance(weights, dict):
        under = f" (or a dict holding one under {' or '.join(keys)})" if keys else ""
        raise ValueError(f"{path}: not a model checkpoint: expected a dict of tensors by name{under}, "
                         f"got {type(weights).__name__}")
    return {name: value for name, value in weights.items() if isinstance(name, str) and isinstance(value, torch.Tensor)}


def _load_cn_clip(path: Path, model_name: str | None) -> ChineseCLIP:
    checkpoint = _torch_load(path)
    weights = {name.removeprefix("module."): value for name, value in _state_dict(checkpoint, path, ("state_dict",)).items()}
    missing = [name for name in convert.CN_CLIP_REQUIRED if name not in weights]
    if missing:
        hint = " (a ResNet vision tower? only ViTs are supported)" if "visual.attnpool.c_proj.weight" in weights else ""
        raise ValueError(f"{path}: not a Chinese-CLIP ViT checkpoint{hint}: no {', '.join(missing)}")
    info = checkpoint.get("model_info")  # written by export_cn_clip: the exact head counts
    try:
        heads = (info["vision_width"] // info["vision_head_width"], info["text_num_attention_heads"]) if info else None
    except (KeyError, TypeError, ZeroDivisionError):
        raise ValueError(f"{path}: its model_info is not a cn_clip model config (vision_width, vision_head_width, "
                         "text_num_attention_heads)") from None
    cfg = convert.cn_clip_model_config(weights, convert.cn_clip_named_heads(model_name) if model_name else heads)
    model = ChineseCLIP(cfg)
    return model_from_weights(cfg, convert.from_cn_clip(weights, model.visual), path, model)


def _load_hf(path: Path) -> ChineseCLIP:
    try:
        config = json.loads((path / HF_CONFIG_FILE).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path / HF_CONFIG_FILE}: not valid JSON: {e}") from None
    if "vision_config" not in config or "text_config" not in config:
        raise ValueError(f"{path / HF_CONFIG_FILE}: not a ChineseCLIPModel config (no vision_config and text_config)")
    files = [path / name for name in HF_WEIGHTS_FILES if (path / name).is_file()]
    if not files:
        raise ValueError(f"{path}: no weights; expected {' or '.join(HF_WEIGHTS_FILES)} beside {HF_CONFIG_FILE}")
    weights = read_weights(files[0]) if files[0].suffix == ".safetensors" else _state_dict(_torch_load(files[0]), files[0])
    return model_from_weights(convert.hf_model_config(config), _from_hf(weights, files[0]), files[0])


def _from_hf(weights: dict[str, torch.Tensor], source: Path) -> dict[str, torch.Tensor]:
    if missing := [name for name in convert.HF_REQUIRED if name not in weights]:
        raise ValueError(f"{source}: not ChineseCLIPModel weights: no {', '.join(missing)}")
    return convert.from_hf(weights)


def model_from_weights(cfg: ModelConfig, weights: dict[str, torch.Tensor], source: Path,
                       model: ChineseCLIP | None = None) -> ChineseCLIP:
    """`weights` (our names) into a model of `cfg`, refusing any missing, unexpected or misshapen tensor."""
    model = model or ChineseCLIP(cfg)
    expected = model.state_dict()
    weights.setdefault("logit_bias", expected["logit_bias"])  # only SigLIP has one; other formats do not store it
    missing, unexpected = expected.keys() - weights.keys(), weights.keys() - expected.keys()
    if missing or unexpected:
        raise ValueError(f"{source} does not match its config: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    for name, tensor in expected.items():  # in the model's order: a wrong width shows at its embedding first
        if (value := weights[name]).shape != tensor.shape:
            raise ValueError(f"{source}: {name} has shape {tuple(value.shape)}, "
                             f"the config gives {tuple(tensor.shape)}")
    model.load_state_dict({name: value.float() for name, value in weights.items()})
    return model


EXPORT_FORMATS = ("ours", "hf", "cn_clip")


def export(model: ChineseCLIP, cfg: Config, out: str | Path, fmt: str, tokenizer: ChineseTokenizer) -> Path:
    """`model` written as `fmt`: a model directory of ours, an HF ChineseCLIPModel directory, or a
    Chinese-CLIP `.pt` file. `cfg` is the run config it came with (its `model` section is the model's)."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}: expected one of {', '.join(EXPORT_FORMATS)}")
    if fmt == "hf":
        return export_hf(model, out, tokenizer, cfg.data.mean, cfg.data.std)
    if fmt == "cn_clip":
        return export_cn_clip(model, out)
    save_pretrained(_fp32(model), cfg, Path(out), tokenizer)
    return Path(out)


def load_for_export(source: str | Path, model_name: str | None = None) -> tuple[ChineseCLIP, Config]:
    """Anything `load_pretrained` reads, with the run config it came with (defaults around its
    architecture when it has none)."""
    source = Path(source)
    model = load_pretrained(source, model_name)
    cfg = load_config(source / CONFIG_FILE) if (source / CONFIG_FILE).is_file() else Config(model=model.cfg)
    return model, cfg


def pretrained_vocab(path: str | Path) -> Path | None:
    """The vocab.txt that came with a checkpoint (in its directory), or None for the default."""
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    return directory / "vocab.txt" if (directory / "vocab.txt").is_file() else None


def export_hf(model: ChineseCLIP, out_dir: str | Path, tokenizer: ChineseTokenizer | None = None,
              mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD) -> Path:
    """An HF ChineseCLIPModel directory of `model` (see `write_hf`), without our run config."""
    out_dir = Path(out_dir)
    write_hf(_fp32(model), model.cfg, out_dir, tokenizer or load_tokenizer(), mean, std)
    return out_dir


def write_hf(weights: dict[str, torch.Tensor], cfg: ModelConfig, out_dir: Path, tokenizer: ChineseTokenizer,
             mean: tuple[float, ...], std: tuple[float, ...]) -> None:
    """What `transformers.ChineseCLIPModel.from_pretrained` and `ChineseCLIPProcessor.from_pretrained` load:
    config.json, model.safetensors in HF names, the tokenizer (and vocab.txt, which Chinese-CLIP's tools
    read) and the image preprocessor (a bicubic resize of the whole image to the square input, no centre
    crop, as Chinese-CLIP preprocesses).

    transformers' model has no logit bias. A trained one (SigLIP) is kept as one more tensor,
    `logit_bias`, which transformers leaves out, listing it as an unexpected key in its load report;
    a bias still at the config's initial value (InfoNCE freezes it there) is not written, so that those
    files load in transformers with no key left over."""
    from PIL import Image
    from transformers import ChineseCLIPConfig, ChineseCLIPImageProcessor, ChineseCLIPProcessor

    out_dir.mkdir(parents=True, exist_ok=True)
    config = ChineseCLIPConfig(**convert.hf_config(cfg))
    config.architectures = ["ChineseCLIPModel"]
    config.save_pretrained(out_dir)
    hf_weights = convert.to_hf(weights)
    # the value ChineseCLIP(cfg) starts from
    initial_bias = LOGIT_INIT["clip"][1] if cfg.init_logit_bias is None else cfg.init_logit_bias
    if "logit_bias" in weights and not torch.equal(weights["logit_bias"], torch.full([1], initial_bias)):
        hf_weights["logit_bias"] = weights["logit_bias"].reshape(1)
    write_weights(hf_weights, out_dir / WEIGHTS_FILE, metadata={"format": "pt"})
    size = cfg.vision.image_size
    image_processor = ChineseCLIPImageProcessor(
        size={"height": size, "width": size}, do_center_crop=False, crop_size={"height": size, "width": size},
        resample=Image.BICUBIC, image_mean=list(mean), image_std=list(std))
    ChineseCLIPProcessor(image_processor=image_processor, tokenizer=tokenizer.bert).save_pretrained(out_dir)
    tokenizer.save(out_dir)


def _fp32(model: ChineseCLIP) -> dict[str, torch.Tensor]:
    return {name: value.detach().float().cpu() for name, value in model.state_dict().items()}


def export_cn_clip(model: ChineseCLIP, out_path: str | Path) -> Path:
    """A `.pt` laid out as Chinese-CLIP's training saves it (`module.` names, as from its DDP model),
    which `cn_clip.clip.utils.create_model` and its training `--resume` load. cn_clip takes the
    architecture from a model config JSON; `model_info` in the file is that config for this model
    (`cn_clip.clip.model.CLIP(**checkpoint["model_info"])`), which matters when its heads are not
    64 wide, as cn_clip's configs assume."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    weights = convert.to_cn_clip(_fp32(model))
    checkpoint = {"epoch": 0, "step": 0, "name": out_path.stem, "model_info": convert.cn_clip_model_info(model.cfg),
                  "state_dict": {f"module.{name}": value for name, value in weights.items()}}
    partial = out_path.with_name(out_path.name + ".partial")
    torch.save(checkpoint, partial)
    partial.replace(out_path)
    return out_path


def init_vision_tower(model: ChineseCLIP, path: str | Path) -> list[str]:
    """Pretraining's starting point for the image tower: an OpenAI / open_clip CLIP state dict (its
    `visual.proj` becomes our projection) or a timm ViT checkpoint, in .pt, .bin or .safetensors.
    timm maps the layouts and resamples the position embedding to our image size. Returns the
    names in the file that were not used."""
    path = Path(path)
    weights = _read_tensors(path)
    is_clip = any(name.endswith(("visual.proj", "visual.head.proj.weight")) for name in weights)
    vision = checkpoint_filter_fn(weights, model.visual)
    head = vision.pop("head.weight", None)
    vision.pop("head.bias", None)
    _check_into(model.visual.state_dict(), vision, path, "visual.")
    model.visual.load_state_dict({name: value for name, value in vision.items() if name in model.visual.state_dict()})
    unused = sorted(name for name in vision if name not in model.visual.state_dict())
    if head is not None and is_clip:
        _check_into({"weight": model.visual_projection.weight}, {"weight": head}, path, "visual_projection.")
        model.visual_projection.weight.data.copy_(head)
    elif head is not None:
        unused.append("head.weight (an image classifier, not a CLIP projection)")
    return unused


def init_text_tower(model: ChineseCLIP, path: str | Path) -> list[str]:
    """Pretraining's starting point for the text tower: an HF BERT directory (chinese-roberta-wwm-ext,
    RBT3; BertModel or BertForMaskedLM weights). Returns the names in it that were not used (the
    masked-LM head, the pooler)."""
    from transformers import BertModel

    path = Path(path)
    if not (path / HF_CONFIG_FILE).is_file():
        raise ValueError(f"{path}: no {HF_CONFIG_FILE}; expected an HF BERT directory (config.json and weights)")
    bert, info = BertModel.from_pretrained(str(path), add_pooling_layer=False, output_loading_info=True)
    _check_into(model.text.state_dict(), bert.state_dict(), path, "text.")
    model.text.load_state_dict(bert.state_dict())
    return sorted(info["unexpected_keys"])


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        return read_weights(path)
    if zipfile.is_zipfile(path) and any(name.endswith("constants.pkl") for name in zipfile.ZipFile(path).namelist()):
        return torch.jit.load(str(path), map_location="cpu").state_dict()  # OpenAI's released CLIP files are TorchScript
    return _state_dict(_torch_load(path), path, ("state_dict", "model"))


def _check_into(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor], source: Path, prefix: str) -> None:
    """Refuse a tower whose weights leave part of it unset or disagree with its shapes."""
    missing = sorted(expected.keys() - given.keys())
    if missing:
        raise ValueError(f"{source}: no weights for {prefix}{missing[0]}"
                         f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}; is it the layout this tower expects?")
    for name, tensor in expected.items():
        if given[name].shape != tensor.shape:
            raise ValueError(f"{source}: {prefix}{name} has shape {tuple(given[name].shape)}, "
                             f"the model's is {tuple(tensor.shape)}")


def pretrained_architecture(loaded: ModelConfig, configured: ModelConfig) -> ModelConfig:
    """A loaded model's architecture with the run's training-only settings (masking, stochastic depth,
    dropout, activation checkpointing, the logit initialisation of a parameter the file lacks)."""
    return dataclasses.replace(
        loaded,
        vision=dataclasses.replace(loaded.vision, patch_drop_rate=configured.vision.patch_drop_rate,
                                   drop_path_rate=configured.vision.drop_path_rate),
        text=dataclasses.replace(loaded.text, dropout=configured.text.dropout),
        grad_checkpointing=configured.grad_checkpointing,
        init_logit_scale=configured.init_logit_scale, init_logit_bias=configured.init_logit_bias)


def prepare_init(cfg: Config, log: Callable[[str], None] = print,
                 main_process: bool = True) -> Callable[[ChineseCLIP], None] | None:
    """`cfg.init` as a function that a fresh run applies to its newly built model on the main process
    (None: keep the random init). With init.pretrained the file is read now, on every process:
    `cfg.model` becomes its architecture, so that the model is built to fit it and the saved config
    says what ran; only the main process keeps its weights."""
    init = cfg.init
    if init.pretrained:
        try:
            pretrained = load_pretrained(init.pretrained, init.model_name)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"init.pretrained: {e}") from None
        cfg.model = pretrained_architecture(pretrained.cfg, cfg.model)
        # handed over once, then dropped: no second copy for the whole run, and none on other processes
        pending = [pretrained.state_dict()] if main_process else []

        def load_whole(model: ChineseCLIP) -> None:
            weights = pending.pop()
            model.load_state_dict(weights)
            log(f"init: all {sum(v.numel() for v in weights.values()):,} parameters from {init.pretrained}")
        return load_whole
    if not (init.vision or init.text):
        return None

    def start_towers(model: ChineseCLIP) -> None:
        for key, source, start in (("init.vision", init.vision, init_vision_tower), ("init.text", init.text, init_text_tower)):
            if source:
                try:
                    unused = start(model, source)
                except (FileNotFoundError, ValueError) as e:
                    raise ConfigError(f"{key}: {e}") from None
                log(f"{key}: {source}" + (f" (not used: {', '.join(unused)})" if unused else ""))
    return start_towers


def model_stamp(model_path: str | Path) -> dict:
    """What identifies the model's weights: the files' sizes and modification times."""
    path = Path(model_path).resolve()
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin"))
    return {"path": str(path), "weights": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]}
