"""Features of many items (texts, images, class prompts) computed across ranks: every rank encodes
its share in batches and all of them get every feature, in the items' order. Texts go through
Chinese-CLIP's text preprocessing first, as its evaluation does."""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from tqdm import tqdm

from chinese_clip.distributed import gather_without_grad, rank, world_size
from chinese_clip.model import ChineseCLIP
from chinese_clip.tokenizer import ChineseTokenizer, chinese_clip_text


@torch.no_grad()
def encode_sharded(count: int, encode_batch: Callable[[list[int]], torch.Tensor], batch_size: int,
                   desc: str) -> torch.Tensor:
    """[count, D]: rank r encodes items r, r + W, ...; every rank makes the same number of forward calls
    (a forward is collective under ZeRO-3), padding its share with a repeat that is dropped."""
    share = list(range(rank(), count, world_size()))
    per_rank = math.ceil(count / world_size())
    padded = share + [share[0] if share else 0] * (per_rank - len(share))
    parts = []
    # closed on an error too, so that the error is not printed into the bar's line
    with tqdm(range(0, per_rank, batch_size), desc=desc, disable=rank() != 0, mininterval=1.0) as batches:
        for start in batches:
            parts.append(encode_batch(padded[start:start + batch_size]).float())
    local = torch.cat(parts)  # [per_rank, D]
    gathered = gather_without_grad(local)  # rank-major: rank r's rows at [r * per_rank, (r + 1) * per_rank)
    return gathered[[(i % world_size()) * per_rank + i // world_size() for i in range(count)]]


def encode_texts(model: ChineseCLIP, tokenizer: ChineseTokenizer, texts: Sequence[str],
                 device: torch.device) -> torch.Tensor:
    """[len(texts), D]: one batch of texts, preprocessed as Chinese-CLIP does and tokenized."""
    tokens = {k: v.to(device) for k, v in tokenizer([chinese_clip_text(t) for t in texts]).items()}
    return model.encode_text(tokens["input_ids"], tokens["attention_mask"])
