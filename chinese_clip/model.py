"""ChineseCLIP: a BERT-Chinese text tower and a timm ViT vision tower in one embedding space."""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import PatchDropout
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from transformers import BertConfig, BertModel

from chinese_clip.config import LOGIT_INIT, ModelConfig, TextConfig, VisionConfig

MAX_LOGIT_SCALE = math.log(100)  # CLIP clamps the temperature so logits stay below 100


@dataclass(frozen=True)
class ParamPlace:
    """Where a parameter sits in the model: its tower, and its layer counted from the input."""
    tower: str  # "vision", "text", or "logit" (the logit scale and bias)
    layer: int  # 0: the embeddings, 1..depth: the blocks, depth + 1: after them (final norm, projection)
    depth: int  # blocks in the tower


def build_vision_tower(cfg: VisionConfig) -> VisionTransformer:
    """An OpenAI-CLIP-layout ViT (pre-norm, no patch bias, LayerNorm eps 1e-5) so released
    OpenAI / Chinese-CLIP vision weights map onto it one to one."""
    vit = VisionTransformer(
        img_size=cfg.image_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.width,
        depth=cfg.layers,
        num_heads=cfg.heads,
        mlp_ratio=cfg.mlp_ratio,
        num_classes=0,  # the projection lives in ChineseCLIP so both towers read alike
        global_pool="token",
        pre_norm=True,
        act_layer=cfg.act,
        norm_layer=partial(nn.LayerNorm, eps=1e-5),
        drop_path_rate=cfg.drop_path_rate,
    )
    # Always a PatchDropout (timm builds an Identity for rate 0) so that a stage can change the ratio.
    # It is the identity in eval mode: evaluation never masks.
    vit.patch_drop = PatchDropout(cfg.patch_drop_rate, num_prefix_tokens=vit.num_prefix_tokens)
    return vit


def build_text_tower(cfg: TextConfig) -> BertModel:
    config = BertConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        type_vocab_size=cfg.type_vocab_size,
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
        attn_implementation="sdpa",
    )
    # CLIP reads the [CLS] state, not BERT's pooler; an unused pooler breaks DDP.
    return BertModel(config, add_pooling_layer=False)


class ChineseCLIP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.visual = build_vision_tower(cfg.vision)
        self.visual_projection = nn.Linear(cfg.vision.width, cfg.embed_dim, bias=False)
        self.text = build_text_tower(cfg.text)
        self.text_projection = nn.Linear(cfg.text.hidden_size, cfg.embed_dim, bias=False)
        # A config that never went through load_config has no loss to take the defaults from: CLIP's.
        default_scale, default_bias = LOGIT_INIT["clip"]
        init_scale = default_scale if cfg.init_logit_scale is None else cfg.init_logit_scale
        init_bias = default_bias if cfg.init_logit_bias is None else cfg.init_logit_bias
        # Shape [1], not []: DeepSpeed views every parameter as bytes, which a 0-dim tensor cannot do.
        self.logit_scale = nn.Parameter(torch.full([1], init_scale))
        self.logit_bias = nn.Parameter(torch.full([1], init_bias))
        nn.init.normal_(self.visual_projection.weight, std=cfg.vision.width**-0.5)
        nn.init.normal_(self.text_projection.weight, std=cfg.text.hidden_size**-0.5)
        if cfg.grad_checkpointing:
            self.set_grad_checkpointing(True)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        if enable:
            self.text.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.text.activation_checkpointing_disable()

    def compile_blocks(self) -> None:
        """torch.compile every transformer block in place (names and parameters unchanged). Per block, not
        the whole model: the blocks of a tower share one compiled graph, so compiling costs one block
        per tower; FLIP's patch masking and the engines' hooks stay outside the compiled code; and a
        stage that changes the token count or batch recompiles once (the shape then becomes dynamic)."""
        for block in self.blocks():
            block.compile()

    def blocks(self) -> list[nn.Module]:
        """The transformer blocks of both towers: the units FSDP shards and gathers one at a time."""
        return [*self.visual.blocks, *self.text.encoder.layer]

    def parameter_layout(self) -> dict[str, ParamPlace]:
        """Every parameter's tower and layer, read from the modules themselves (not from name patterns),
        for freeze rules, layer-wise lr decay and the stage summary."""
        layout = {}
        towers = (("vision", "visual", self.visual.blocks, "visual_projection"),
                  ("text", "text", self.text.encoder.layer, "text_projection"))
        for tower, trunk, blocks, projection in towers:
            block_of = {id(p): index for index, block in enumerate(blocks, start=1) for p in block.parameters()}
            depth, past_blocks = len(blocks), False
            # A tower registers its embeddings, then its blocks, then its final norm: the forward order.
            for name, p in getattr(self, trunk).named_parameters():
                layer = block_of.get(id(p))
                past_blocks |= layer is not None
                layout[f"{trunk}.{name}"] = ParamPlace(tower, layer or (depth + 1 if past_blocks else 0), depth)
            for name, _ in getattr(self, projection).named_parameters():
                layout[f"{projection}.{name}"] = ParamPlace(tower, depth + 1, depth)
        for name in ("logit_scale", "logit_bias"):
            layout[name] = ParamPlace("logit", 0, 0)
        return {name: layout[name] for name, _ in self.named_parameters()}  # every parameter, in the model's order

    def no_weight_decay(self) -> set[str]:
        """Parameters weight decay leaves alone: norm weights, biases and the logit scalars (all under
        2-D), and what timm's ViT declares (position embedding, class token)."""
        return ({name for name, p in self.named_parameters() if p.ndim < 2}
                | {f"visual.{name}" for name in self.visual.no_weight_decay()})

    def set_mask_ratio(self, ratio: float) -> None:
        """FLIP: the share of image patches dropped in training from now on."""
        self.visual.patch_drop.prob = ratio

    # encode_image and encode_text are what evaluation calls, one tower at a time; FSDP registers them
    # as forward methods of their own. The training forward does not go through them: a registered
    # method called inside forward would reshard the root's parameters in the middle of the step.
    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._image_features(pixel_values)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self._text_features(input_ids, attention_mask)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """Features and logit parameters in one call: under ZeRO-3 and FSDP parameters are only whole
        inside a module's forward, so the loss must receive the scale from here."""
        image_features = self._image_features(pixel_values)
        text_features = self._text_features(input_ids, attention_mask)
        logit_scale = self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()  # [1]
        # A copy, not the parameter: the gathered one (FSDP's bf16 copy, say) is freed after forward.
        return image_features, text_features, logit_scale, self.logit_bias.clone()

    def _image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # DeepSpeed bf16 and FSDP gather the weights in bf16 themselves (no autocast): the input must follow them.
        pixel_values = pixel_values.to(self.visual.patch_embed.proj.weight.dtype)
        pooled = self.visual(pixel_values)  # [B, width], the class token after the final norm
        return F.normalize(self.visual_projection(pooled), dim=-1)  # [B, D]

    def _text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, L, H]
        return F.normalize(self.text_projection(hidden[:, 0]), dim=-1)  # [B, D]
