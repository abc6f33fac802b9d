"""Zero-shot class embeddings: class prompts through the text tower, computed across ranks."""
from __future__ import annotations

from typing import Sequence

import torch

from chinese_clip.evaluation.features import encode_sharded, encode_texts
from chinese_clip.model import ChineseCLIP
from chinese_clip.tokenizer import ChineseTokenizer


@torch.no_grad()
def class_embeddings(model: ChineseCLIP, tokenizer: ChineseTokenizer, class_names: Sequence[str],
                     templates: Sequence[str], device: torch.device, batch_size: int = 256) -> torch.Tensor:
    """[C, D]: each class's prompt embeddings (unit length) averaged over the templates and
    re-normalised, as Chinese-CLIP's zero-shot classifier. The prompts (1,000 ImageNet classes x 183
    templates) are encoded in batches, shared across ranks."""
    prompts = [t.replace("{}", name) for name in class_names for t in templates]

    features = encode_sharded(prompts, lambda texts: encode_texts(model, tokenizer, texts, device), batch_size,
                              "class prompts").to(device)  # [C*T, D]
    mean = features.view(len(class_names), len(templates), -1).mean(dim=1)  # [C, D]
    return torch.nn.functional.normalize(mean, dim=-1)
