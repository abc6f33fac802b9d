"""Zero-shot accuracy with a stub model whose predictions are known, on one rank and sharded over two."""
import pytest
import torch
from torch import nn

from chinese_clip.evaluation.zeroshot import zero_shot_classification
from tests.conftest import run_on_cpu_ranks

CLASSES = ["红色圆形", "蓝色方形", "绿色三角", "黄色星形", "紫色十字", "黑色心形"]
TEMPLATES = ["一个{}", "{}的图片"]
# (predicted class ranking, true label): top-1 right for 3 of 7; top-5 misses the two samples whose
# label is ranked last, so right for 5 of 7.
SAMPLES = [([0, 1, 2, 3, 4, 5], 0), ([1, 0, 2, 3, 4, 5], 1), ([2, 1, 0, 3, 4, 5], 2),
           ([0, 1, 2, 3, 4, 5], 3), ([0, 1, 2, 3, 4, 5], 4), ([0, 1, 2, 3, 4, 5], 5), ([5, 4, 3, 2, 1, 0], 0)]


class StubModel(nn.Module):
    """Text features: class c -> e_c for every template. Image features: the sample's ranking as scores."""

    def encode_text(self, input_ids, attention_mask):
        return torch.eye(len(CLASSES))[input_ids[:, 0]]

    def encode_image(self, pixel_values):
        return pixel_values


class StubTokenizer:
    """A prompt's one token: the index of the class it names."""

    def __call__(self, texts):
        ids = [next(c for c, name in enumerate(CLASSES) if name in text) for text in texts]
        return {"input_ids": torch.tensor(ids)[:, None], "attention_mask": torch.ones(len(texts), 1)}


def _collate(samples):
    scores = torch.stack([torch.tensor([6.0 - r.index(c) for c in range(6)]) for r, _ in samples])
    return {"pixel_values": torch.nn.functional.normalize(scores, dim=-1), "label": torch.tensor([y for _, y in samples])}


def _evaluate(batch_size):
    return zero_shot_classification(StubModel(), StubTokenizer(), SAMPLES, _collate, CLASSES, TEMPLATES,
                                    torch.device("cpu"), batch_size=batch_size)


def test_hand_counted_accuracy():
    result = _evaluate(batch_size=3)
    assert result["top1"] == pytest.approx(300 / 7) and result["top5"] == pytest.approx(500 / 7)
    assert result["num_images"] == 7 and result["chance_top1"] == pytest.approx(100 / 6)


def test_two_ranks_with_a_ragged_shard_count_each_image_once():
    ranks = run_on_cpu_ranks(_evaluate, 2)
    for result in ranks:
        assert result["top1"] == pytest.approx(300 / 7) and result["top5"] == pytest.approx(500 / 7) and result["num_images"] == 7
