"""ChineseCLIP: a BERT-Chinese text tower and a timm ViT vision tower in one embedding space."""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import PatchDropout
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from transformers import BertConfig, BertModel

from chinese_clip.config import LOGIT_INIT, ModelConfig, TextConfig, VisionConfig

MAX_LOGIT_SCALE = math.log(100)  # CLIP clamps the temperature so logits stay below 100


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

    def set_mask_ratio(self, ratio: float) -> None:
        """FLIP: the share of image patches dropped in training from now on."""
        self.visual.patch_drop.prob = ratio

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # DeepSpeed bf16 casts the weights themselves (no autocast): the input must follow them.
        pixel_values = pixel_values.to(self.visual.patch_embed.proj.weight.dtype)
        pooled = self.visual(pixel_values)  # [B, width], the class token after the final norm
        return F.normalize(self.visual_projection(pooled), dim=-1)  # [B, D]

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, L, H]
        return F.normalize(self.text_projection(hidden[:, 0]), dim=-1)  # [B, D]

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """Features and logit parameters in one call: under ZeRO-3 parameters are only whole
        inside a module's forward, so the loss must receive the scale from here."""
        image_features = self.encode_image(pixel_values)
        text_features = self.encode_text(input_ids, attention_mask)
        logit_scale = self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()  # [1]
        return image_features, text_features, logit_scale, self.logit_bias
