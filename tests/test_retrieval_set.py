"""Retrieval sets in Chinese-CLIP's layout: every malformed input is a clear error, and features
computed by two ranks (uneven shares) equal those of one process, in the set's order."""
import base64

import pytest
import torch

from chinese_clip.config import DataConfig
from chinese_clip.data.collate import ImageTextCollator
from chinese_clip.data.transforms import eval_transform
from chinese_clip.evaluation.retrieval_set import read_retrieval_set, retrieval_features
from chinese_clip.model import ChineseCLIP
from chinese_clip.tokenizer import load_tokenizer
from tests.conftest import TINY, run_on_cpu_ranks, write_retrieval_set
from tests.tolerances import FEATURES

def features(root):
    torch.manual_seed(0)
    model = ChineseCLIP(TINY)
    data = read_retrieval_set(root, "valid")
    collator = ImageTextCollator(load_tokenizer(None, 16), DataConfig().mean, DataConfig().std)
    return retrieval_features(model, data, collator, eval_transform(32),
                              torch.device("cpu"), batch_size=2)


def test_two_ranks_compute_the_same_features_in_the_same_order_as_one_process(tmp_path):
    root = write_retrieval_set(tmp_path / "set")
    texts, images = features(root)
    assert texts.shape == (7, 16) and images.shape == (5, 16)
    for rank_texts, rank_images in run_on_cpu_ranks(features, root):
        assert torch.allclose(rank_texts, texts, atol=FEATURES) and torch.allclose(rank_images, images, atol=FEATURES)
    data = read_retrieval_set(root, "valid")
    assert data.text_to_images[6] == [1, 2] and data.image_ids[0] == "100"


@pytest.mark.parametrize("damage, message", [
    (lambda r: (r / "valid_imgs.tsv").write_text("100\t@@not base64@@\n"), "valid_imgs.tsv:1: image 100 is not valid base64"),
    (lambda r: (r / "valid_imgs.tsv").write_text("100 no tab\n"), "expected image_id<TAB>base64"),
    (lambda r: (r / "valid_texts.jsonl").write_text('{"text_id": 1, "text": "一只猫", "image_ids": [999]}\n'),
     "text 1 names image 999, which valid_imgs.tsv does not have"),
    (lambda r: (r / "valid_texts.jsonl").write_text('{"text_id": 1, "text": "一只猫"}\n'), "valid_texts.jsonl:1: expected"),
    (lambda r: (r / "valid_texts.jsonl").write_text('{"text_id": 1, "text": "一只猫", "image_ids": []}\n'),
     "text 1 has no image_ids"),
    (lambda r: (r / "valid_texts.jsonl").unlink(), "valid_texts.jsonl: no such file"),
])
def test_a_malformed_set_is_refused_with_the_line_and_id(tmp_path, damage, message):
    root = write_retrieval_set(tmp_path / "set")
    damage(root)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        read_retrieval_set(root, "valid")


def test_an_image_that_does_not_decode_is_named(tmp_path):
    root = write_retrieval_set(tmp_path / "set", images=2, texts=2)
    (root / "valid_imgs.tsv").write_text(f"100\t{base64.b64encode(b'<html>gone</html>').decode()}\n"
                                         + (root / "valid_imgs.tsv").read_text().splitlines()[1] + "\n")
    with pytest.raises(ValueError, match="image 100: not an image"):
        features(root)
