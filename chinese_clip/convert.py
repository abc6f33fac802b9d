"""Weight layouts of the implementations we load from and export to, mapped onto ours.

Ours: `visual.*` a timm VisionTransformer, `visual_projection.weight` [E, W], `text.*` an HF BertModel,
`text_projection.weight` [E, H], `logit_scale` and `logit_bias` of shape [1].
Chinese-CLIP (cn_clip `.pt`): an OpenAI-layout ViT `visual.*` with `visual.proj` [W, E], `bert.*`,
`text_projection` [H, E], `logit_scale` [].
HF `ChineseCLIPModel`: `vision_model.*` (CLIP vision layout, separate q/k/v), `text_model.*`,
`visual_projection.weight` [E, W], `text_projection.weight` [E, H], `logit_scale` []; it has no logit bias,
which our HF-layout files add as `logit_bias` [1] where it was trained (SigLIP).

Every conversion is renames, transposes and splits. A wrong one still runs, so each is tested for
equal features against cn_clip's and transformers' own models.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from chinese_clip.config import ModelConfig, TextConfig, VisionConfig

HEAD_WIDTH = 64  # the head width of Chinese-CLIP's towers, but for ViT-H's 80


def _layers(weights: dict[str, torch.Tensor], pattern: str) -> int:
    indices = [int(m.group(1)) for name in weights if (m := re.match(pattern, name))]
    return max(indices) + 1 if indices else 0


def _text_config(weights: dict[str, torch.Tensor], prefix: str) -> TextConfig:
    hidden = weights[f"{prefix}embeddings.word_embeddings.weight"].shape[1]
    return TextConfig(
        vocab_size=weights[f"{prefix}embeddings.word_embeddings.weight"].shape[0],
        hidden_size=hidden,
        layers=_layers(weights, rf"{re.escape(prefix)}encoder\.layer\.(\d+)\."),
        intermediate_size=weights[f"{prefix}encoder.layer.0.intermediate.dense.weight"].shape[0],
        max_position_embeddings=weights[f"{prefix}embeddings.position_embeddings.weight"].shape[0],
        type_vocab_size=weights[f"{prefix}embeddings.token_type_embeddings.weight"].shape[0],
    )


# ---------------------------------------------------------------- Chinese-CLIP (.pt)

CN_CLIP_REQUIRED = ("visual.class_embedding", "visual.conv1.weight", "visual.positional_embedding", "visual.proj",
                    "bert.embeddings.word_embeddings.weight", "text_projection", "logit_scale")


def cn_clip_model_config(weights: dict[str, torch.Tensor], heads: tuple[int, int] | None = None) -> ModelConfig:
    """The architecture of a Chinese-CLIP state dict. Head counts are not in the weights: they are
    `heads` (vision, text) when given, else those of the cn_clip model config with the same widths and
    depths (ViT-H's heads are 80 wide), else width / 64."""
    width = weights["visual.class_embedding"].shape[0]
    patch = weights["visual.conv1.weight"].shape[-1]
    grid = math.isqrt(weights["visual.positional_embedding"].shape[0] - 1)
    layers = _layers(weights, r"visual\.transformer\.resblocks\.(\d+)\.")
    text = _text_config(weights, "bert.")
    vision_heads, text_heads = heads or (None, None)
    for config in _cn_clip_configs().values():
        if (config.get("vision_width"), config.get("vision_layers"), config.get("vision_patch_size")) == (width, layers, patch):
            vision_heads = vision_heads or width // config.get("vision_head_width", HEAD_WIDTH)
        if (config.get("text_hidden_size"), config.get("text_num_hidden_layers")) == (text.hidden_size, text.layers):
            text_heads = text_heads or config["text_num_attention_heads"]
    text.heads = text_heads or max(1, text.hidden_size // HEAD_WIDTH)
    vision = VisionConfig(
        image_size=grid * patch, patch_size=patch, width=width, layers=layers,
        heads=vision_heads or max(1, width // HEAD_WIDTH),
        mlp_ratio=weights["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width,
        act="quick_gelu",
    )
    return ModelConfig(embed_dim=weights["visual.proj"].shape[1], vision=vision, text=text)


def _cn_clip_configs() -> dict[str, dict]:
    """The tower configs that ship with cn_clip, by name ("ViT-B-16", "RoBERTa-wwm-ext-base-chinese", ...)."""
    import cn_clip.clip

    directory = Path(cn_clip.clip.__file__).parent / "model_configs"
    return {path.stem: json.loads(path.read_text()) for path in sorted(directory.glob("*.json"))}


def cn_clip_named_heads(name: str) -> tuple[int, int]:
    """(vision heads, text heads) of a Chinese-CLIP model name: a released one ("ViT-B-16") or a
    "<vision>@<text>" pair of the configs that ship with cn_clip ("ViT-H-14@RoBERTa-wwm-ext-large-chinese")."""
    from cn_clip.clip.utils import _MODEL_INFO

    configs = _cn_clip_configs()
    vision_name, _, text_name = (_MODEL_INFO[name]["struct"] if name in _MODEL_INFO else name).partition("@")
    if vision_name not in configs or text_name not in configs:
        raise ValueError(f"unknown Chinese-CLIP model name {name!r}: expected one of {sorted(_MODEL_INFO)} "
                         f"or '<vision>@<text>' from {sorted(configs)}")
    vision, text = configs[vision_name], configs[text_name]
    if not isinstance(vision.get("vision_layers"), int):
        raise ValueError(f"{name}: ResNet vision towers are not supported; use a ViT model")
    return vision["vision_width"] // vision.get("vision_head_width", HEAD_WIDTH), text["text_num_attention_heads"]


def cn_clip_model_info(cfg: ModelConfig) -> dict:
    """cn_clip's `CLIP(**model_info)` arguments for our architecture: what its model config JSONs hold."""
    v, t = cfg.vision, cfg.text
    return {"embed_dim": cfg.embed_dim, "image_resolution": v.image_size, "vision_layers": v.layers,
            "vision_width": v.width, "vision_head_width": v.width // v.heads, "vision_patch_size": v.patch_size,
            "vocab_size": t.vocab_size, "text_attention_probs_dropout_prob": t.dropout, "text_hidden_act": "gelu",
            "text_hidden_dropout_prob": t.dropout, "text_hidden_size": t.hidden_size, "text_initializer_range": 0.02,
            "text_intermediate_size": t.intermediate_size, "text_max_position_embeddings": t.max_position_embeddings,
            "text_num_attention_heads": t.heads, "text_num_hidden_layers": t.layers,
            "text_type_vocab_size": t.type_vocab_size}


def from_cn_clip(weights: dict[str, torch.Tensor], visual: VisionTransformer) -> dict[str, torch.Tensor]:
    """Chinese-CLIP names -> ours. timm maps the OpenAI-layout ViT (and resamples the position
    embedding if `visual` takes another image size)."""
    vision = checkpoint_filter_fn({k: v for k, v in weights.items() if k.startswith("visual.")}, visual)
    out = {f"visual.{k}": v for k, v in vision.items() if not k.startswith("head.")}
    out["visual_projection.weight"] = vision["head.weight"]  # timm already transposed proj [W, E] to [E, W]
    out.update({f"text.{k.removeprefix('bert.')}": v for k, v in weights.items()
                if k.startswith("bert.") and ".pooler." not in k})
    out["text_projection.weight"] = weights["text_projection"].t()
    out["logit_scale"] = weights["logit_scale"].reshape(1)
    return out


_OPENAI_VIT_TOP = {"cls_token": "class_embedding", "pos_embed": "positional_embedding",
                   "patch_embed.proj.weight": "conv1.weight", "norm_pre.weight": "ln_pre.weight",
                   "norm_pre.bias": "ln_pre.bias", "norm.weight": "ln_post.weight", "norm.bias": "ln_post.bias"}
_OPENAI_VIT_BLOCK = {"norm1": "ln_1", "norm2": "ln_2", "attn.proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc",
                     "mlp.fc2": "mlp.c_proj"}
_BLOCK_PARAM = re.compile(r"blocks\.(\d+)\.(.+)\.(weight|bias)")


def _rename_ours(weights: dict[str, torch.Tensor], text_prefix: str, vision_prefix: str, top: dict[str, str],
                 rename_block) -> dict[str, torch.Tensor]:
    """The walk both exports share: the BERT tower moves under `text_prefix`; the ViT's tensors outside
    its blocks are renamed by `top` (the class token and position embedding lose their batch
    dimension), those in blocks by `rename_block(index, module, param, value) -> {name: tensor}`."""
    out: dict[str, torch.Tensor] = {}
    for name, value in weights.items():
        if name.startswith("text."):
            out[text_prefix + name.removeprefix("text.")] = value
        elif name.startswith("visual."):
            key = name.removeprefix("visual.")
            if key == "cls_token":
                value = value.reshape(-1)  # [1, 1, W] -> [W]
            elif key == "pos_embed":
                value = value[0]  # [1, N + 1, W] -> [N + 1, W]
            if key in top:
                out[vision_prefix + top[key]] = value
            else:
                out.update(rename_block(*_BLOCK_PARAM.fullmatch(key).groups(), value))
    return out


def to_cn_clip(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Ours -> Chinese-CLIP names (no `module.` prefix): timm's OpenAI-CLIP mapping read backwards."""
    def block(index: str, module: str, param: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
        theirs = f"attn.in_proj_{param}" if module == "attn.qkv" else f"{_OPENAI_VIT_BLOCK[module]}.{param}"
        return {f"visual.transformer.resblocks.{index}.{theirs}": value}

    out = _rename_ours(weights, "bert.", "visual.", _OPENAI_VIT_TOP, block)
    out["visual.proj"] = weights["visual_projection.weight"].t()
    out["text_projection"] = weights["text_projection.weight"].t()
    out["logit_scale"] = weights["logit_scale"].reshape(())
    return {name: value.contiguous() for name, value in out.items()}


# ---------------------------------------------------------------- HF ChineseCLIPModel

def hf_model_config(config: dict) -> ModelConfig:
    """Ours from an HF ChineseCLIPConfig (as a dict, config.json)."""
    v, t = config["vision_config"], config["text_config"]
    return ModelConfig(
        embed_dim=config.get("projection_dim", 512),
        vision=VisionConfig(image_size=v.get("image_size", 224), patch_size=v.get("patch_size", 32),
                            width=v.get("hidden_size", 768), layers=v.get("num_hidden_layers", 12),
                            heads=v.get("num_attention_heads", 12),
                            mlp_ratio=v.get("intermediate_size", 3072) / v.get("hidden_size", 768),
                            act=v.get("hidden_act", "quick_gelu")),
        text=TextConfig(vocab_size=t.get("vocab_size", 30522), hidden_size=t.get("hidden_size", 768),
                        layers=t.get("num_hidden_layers", 12), heads=t.get("num_attention_heads", 12),
                        intermediate_size=t.get("intermediate_size", 3072),
                        max_position_embeddings=t.get("max_position_embeddings", 512),
                        type_vocab_size=t.get("type_vocab_size", 2), dropout=t.get("hidden_dropout_prob", 0.1)),
    )


def hf_config(cfg: ModelConfig) -> dict:
    """The ChineseCLIPConfig arguments of our architecture."""
    v, t = cfg.vision, cfg.text
    return {
        "projection_dim": cfg.embed_dim,
        "vision_config": {"image_size": v.image_size, "patch_size": v.patch_size, "hidden_size": v.width,
                          "num_hidden_layers": v.layers, "num_attention_heads": v.heads,
                          "intermediate_size": round(v.width * v.mlp_ratio), "hidden_act": v.act,
                          "projection_dim": cfg.embed_dim, "layer_norm_eps": 1e-5},
        "text_config": {"vocab_size": t.vocab_size, "hidden_size": t.hidden_size, "num_hidden_layers": t.layers,
                        "num_attention_heads": t.heads, "intermediate_size": t.intermediate_size,
                        "max_position_embeddings": t.max_position_embeddings, "type_vocab_size": t.type_vocab_size,
                        "hidden_dropout_prob": t.dropout, "attention_probs_dropout_prob": t.dropout,
                        "hidden_act": "gelu", "layer_norm_eps": 1e-12},
    }


_HF_VIT_TOP = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding.weight",
               "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
               "norm_pre.weight": "pre_layrnorm.weight", "norm_pre.bias": "pre_layrnorm.bias",  # sic
               "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"}
_HF_VIT_BLOCK = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.proj": "self_attn.out_proj",
                 "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_HF_BLOCK_PARAM = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")


def to_hf(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Ours -> HF ChineseCLIPModel names."""
    def block(index: str, module: str, param: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
        layer = f"vision_model.encoder.layers.{index}"
        if module == "attn.qkv":  # timm packs q, k, v in this order along the output dimension
            return {f"{layer}.self_attn.{part}_proj.{param}": chunk for part, chunk in zip("qkv", value.chunk(3))}
        return {f"{layer}.{_HF_VIT_BLOCK[module]}.{param}": value}

    out = _rename_ours(weights, "text_model.", "vision_model.", _HF_VIT_TOP, block)
    out["visual_projection.weight"] = weights["visual_projection.weight"]
    out["text_projection.weight"] = weights["text_projection.weight"]
    out["logit_scale"] = weights["logit_scale"].reshape(())
    return {name: value.contiguous() for name, value in out.items()}


HF_REQUIRED = ("visual_projection.weight", "text_projection.weight", "logit_scale")  # what from_hf reads by name


def from_hf(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF ChineseCLIPModel names -> ours: `to_hf` read backwards, q/k/v packed again."""
    top = {theirs: ours for ours, theirs in _HF_VIT_TOP.items()}
    block = {theirs: ours for ours, theirs in _HF_VIT_BLOCK.items()}
    out: dict[str, torch.Tensor] = {}
    for name, value in weights.items():
        if name.endswith("position_ids") or ".pooler." in name:
            continue  # older files keep the index buffer; a text pooler CLIP does not use ([CLS] is read)
        if name.startswith("text_model."):
            out[f"text.{name.removeprefix('text_model.')}"] = value
        elif not name.startswith("vision_model."):
            continue
        elif (key := name.removeprefix("vision_model.")) == "embeddings.class_embedding":
            out["visual.cls_token"] = value.reshape(1, 1, -1)
        elif key == "embeddings.position_embedding.weight":
            out["visual.pos_embed"] = value[None]
        elif key in top:
            out[f"visual.{top[key]}"] = value
        elif (match := _HF_BLOCK_PARAM.fullmatch(key)) is None:
            out[name] = value  # not ours: load_pretrained names it as unexpected
        else:
            index, module, param = match.groups()
            if module == "self_attn.q_proj":
                parts = [weights[name.replace("q_proj", part)] for part in ("q_proj", "k_proj", "v_proj")]
                out[f"visual.blocks.{index}.attn.qkv.{param}"] = torch.cat(parts)
            elif module not in ("self_attn.k_proj", "self_attn.v_proj"):  # packed with q
                out[f"visual.blocks.{index}.{block.get(module, module)}.{param}"] = value
    out["visual_projection.weight"] = weights["visual_projection.weight"]
    out["text_projection.weight"] = weights["text_projection.weight"]
    out["logit_scale"] = weights["logit_scale"].reshape(1)
    if "logit_bias" in weights:  # a SigLIP model's, which our HF-layout files carry beside transformers' tensors
        out["logit_bias"] = weights["logit_bias"].reshape(1)
    return out


def is_hf_layout(weights: dict[str, torch.Tensor]) -> bool:
    """HF ChineseCLIPModel names (model directories written since they became HF-native) rather than ours."""
    return any(name.startswith("vision_model.") for name in weights)
