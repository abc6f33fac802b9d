"""Zero-shot classification, the one path every classification set takes: accuracy with a stub model
whose predictions are known (one rank, and two with a ragged share), and the same result schema for
the synthetic held-out splits and a labelled folder."""
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from torch import nn

from chinese_clip.config import DataConfig, SyntheticConfig
from chinese_clip.data.collate import ImageTextCollator
from chinese_clip.data.loaders import build_collator
from chinese_clip.evaluation.classification import (ClassificationSet, read_classification_set,
                                                    zero_shot_classification)
from chinese_clip.evaluation.synthetic import synthetic_sets
from chinese_clip.evaluation.tasks import scalar_metrics
from chinese_clip.model import ChineseCLIP
from chinese_clip.tokenizer import load_tokenizer
from tests.conftest import TINY, run_on_cpu_ranks, write_class_folder

CLASSES = ["红色圆形", "蓝色方形", "绿色三角", "黄色星形", "紫色十字", "黑色心形"]
TEMPLATES = ["一个{}", "{}的图片"]
# (predicted class ranking, true label): top-1 right for 3 of 7; top-5 misses the two samples whose
# label is ranked last, so right for 5 of 7.
SAMPLES = [([0, 1, 2, 3, 4, 5], 0), ([1, 0, 2, 3, 4, 5], 1), ([2, 1, 0, 3, 4, 5], 2),
           ([0, 1, 2, 3, 4, 5], 3), ([0, 1, 2, 3, 4, 5], 4), ([0, 1, 2, 3, 4, 5], 5), ([5, 4, 3, 2, 1, 0], 0)]
SIDE = 6  # stub images are 6 x 6, the stub model's input size: the evaluation resize leaves them as they are


class StubModel(nn.Module):
    """Text features: class c -> e_c for every template. Image features: the first pixel row's red values,
    which hold the class scores."""
    cfg = SimpleNamespace(vision=SimpleNamespace(image_size=SIDE))

    def encode_text(self, input_ids, attention_mask):
        return torch.eye(len(CLASSES))[input_ids[:, 0]]

    def encode_image(self, pixel_values):
        return nn.functional.normalize(pixel_values[:, 0, 0, :] - pixel_values.min() + 1, dim=-1)  # [b, 6], > 0


class StubTokenizer:
    """A prompt's one token: the index of the class it names."""

    def __call__(self, texts):
        ids = [next(c for c, name in enumerate(CLASSES) if name in text) for text in texts]
        return {"input_ids": torch.tensor(ids)[:, None], "attention_mask": torch.ones(len(texts), 1)}


def stub_image(ranking: list[int]) -> Image.Image:
    """Red value 40 x (6 - rank) in column c of the first row: the higher, the more the stub prefers class c."""
    image = Image.new("RGB", (SIDE, SIDE))
    for c in range(len(CLASSES)):
        image.putpixel((c, 0), (40 * (6 - ranking.index(c)), 0, 0))
    return image


def _evaluate(batch_size):
    data = ClassificationSet([stub_image(r) for r, _ in SAMPLES], [y for _, y in SAMPLES], CLASSES, TEMPLATES,
                             "stub", "CLASSES", "TEMPLATES")
    collator = ImageTextCollator(StubTokenizer(), DataConfig().mean, DataConfig().std)
    return zero_shot_classification(StubModel(), data, collator, torch.device("cpu"), batch_size=batch_size)


def test_hand_counted_accuracy():
    result = _evaluate(batch_size=3)
    assert result["top1"] == pytest.approx(300 / 7) and result["top5"] == pytest.approx(500 / 7)
    assert result["per_class_top1"] == pytest.approx({"红色圆形": 50.0, "蓝色方形": 100.0, "绿色三角": 100.0,
                                                      "黄色星形": 0.0, "紫色十字": 0.0, "黑色心形": 0.0})
    assert (result["images"], result["classes"], result["templates"]) == (7, 6, 2)


def test_two_ranks_with_a_ragged_shard_count_each_image_once():
    ranks = run_on_cpu_ranks(_evaluate, 2)
    for result in ranks:
        assert result["top1"] == pytest.approx(300 / 7) and result["top5"] == pytest.approx(500 / 7)
        assert result["images"] == 7


def test_the_synthetic_splits_and_a_labelled_folder_give_one_result_schema(tmp_path):
    torch.manual_seed(0)
    model = ChineseCLIP(TINY)
    collator = build_collator(DataConfig(), load_tokenizer(None, 16))
    templates = tmp_path / "templates.txt"
    templates.write_text("一张{}的图片\n{}\n", encoding="utf-8")
    sets = {"folder": read_classification_set(write_class_folder(tmp_path / "shapes", per_class=(2, 1, 0)), None,
                                              templates),
            **synthetic_sets(DataConfig(synthetic=SyntheticConfig(val_size=8)), TINY.vision.image_size)}
    keys = {"task", "data", "images", "classes", "empty_classes", "labels_from", "labels_sha256", "templates_from",
            "templates", "templates_sha256", "top1", "top5", "per_class_top1"}
    for name, data in sets.items():
        result = zero_shot_classification(model, data, collator, torch.device("cpu"), batch_size=4)
        assert set(result) == keys and set(scalar_metrics(result)) == {"top1", "top5"}, name
        assert result["images"] == len(data.labels) and result["classes"] == len(data.class_names), name
        present = {data.class_names[label] for label in data.labels}
        assert set(result["per_class_top1"]) == present and set(result["empty_classes"]) == set(data.class_names) - present
        assert 0 <= result["top1"] <= result["top5"] <= 100
    assert (sets["val"].data, sets["val"].images[0].size, len(sets["val"].class_names)) == ("synthetic:val", (32, 32), 24)
