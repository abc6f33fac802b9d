"""Retrieval metrics: hand-computed cases (several matches per query, ties, distractor images) and
parity with Chinese-CLIP's own evaluation scripts on the same features."""
import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from chinese_clip.evaluation.retrieval import recall_at_k, retrieval_metrics, write_cn_clip_features


def unit_rows(*angles):
    """2-d unit vectors at the given angles (degrees): their dot products are the cosines."""
    radians = torch.tensor(angles, dtype=torch.float64) * torch.pi / 180
    return torch.stack([radians.cos(), radians.sin()], dim=1)


def test_recall_counts_a_hit_when_any_relevant_candidate_is_in_the_top_k():
    candidates = unit_rows(0, 10, 20, 30, 45, 60)
    queries = unit_rows(0, 25, 50)
    # query 0: candidate 0 (relevant) is the closest -> rank 1; query 1 (25 deg): candidates 2 and 3 are
    # 5 deg away, 1 is 15, 4 is 20: its best match, candidate 4, is 4th; query 2: its one match,
    # candidate 0, is the farthest -> 6th
    relevant = [[0, 3], [4, 5], [0]]
    assert recall_at_k(queries, candidates, relevant, ks=(1, 3, 4, 5, 6)) == pytest.approx(
        {"R@1": 100 / 3, "R@3": 100 / 3, "R@4": 200 / 3, "R@5": 200 / 3, "R@6": 100.0})


def test_a_tie_with_a_non_matching_candidate_counts_against_the_model():
    same = unit_rows(0, 0, 0)
    assert recall_at_k(unit_rows(0), same, [[2]], ks=(1, 2, 3)) == {"R@1": 0.0, "R@2": 0.0, "R@3": 100.0}
    assert recall_at_k(unit_rows(0), same, [[0, 1, 2]], ks=(1,)) == {"R@1": 100.0}  # ties among matches are fine


def test_both_directions_with_several_images_per_text_and_a_distractor_image():
    images = unit_rows(0, 30, 60, 90)  # image 3 matches no text: a candidate, never an image-to-text query
    texts = unit_rows(5, 50)
    result = retrieval_metrics(texts, images, [[0, 1], [2]])
    assert result["text_to_image"] == {"R@1": 100.0, "R@5": 100.0, "R@10": 100.0}
    # image 1 (30 deg) matches text 0 (25 deg away) but text 1 is closer (20 deg): a miss at 1, a hit at 5
    assert result["image_to_text"]["R@1"] == pytest.approx(200 / 3) and result["image_to_text"]["R@5"] == 100.0
    assert result["queries"] == {"text_to_image": 2, "image_to_text": 3}
    assert result["mean_recall"] == pytest.approx((300 + 200 / 3 + 200) / 6)


def test_a_query_without_any_match_is_an_error_not_a_zero():
    with pytest.raises(ValueError, match="1 queries have no relevant candidate .*query 1"):
        recall_at_k(unit_rows(0, 10), unit_rows(0, 10), [[0], []])
    with pytest.raises(ValueError, match="3 queries but relevance lists for 2"):
        recall_at_k(unit_rows(0, 10, 20), unit_rows(0), [[0], [0]])


def test_feature_ids_are_integers_where_chinese_clips_are_and_strings_otherwise(tmp_path):
    features = torch.eye(3)
    write_cn_clip_features(tmp_path / "images.jsonl", ["100", 7, "00000-000012"], features, "image")
    ids = [json.loads(line)["image_id"] for line in (tmp_path / "images.jsonl").read_text().splitlines()]
    assert ids == [100, 7, "00000-000012"]  # a tsv id, a jsonl id, a shard's row id


def run_cn_clip_script(module: str, argv: list[str], monkeypatch) -> None:
    """cn_clip's eval scripts are `__main__` programs that move tensors to CUDA; on CPU, .cuda() is the identity."""
    import cn_clip

    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)
    monkeypatch.setattr(sys, "argv", [module, *argv])
    runpy.run_path(str(Path(cn_clip.__file__).parent / "eval" / f"{module}.py"), run_name="__main__")


def test_recalls_equal_chinese_clips_own_evaluation_on_the_same_features(tmp_path, monkeypatch):
    from cn_clip.eval.evaluation import compute_score
    from cn_clip.eval.evaluation_tr import compute_score as compute_score_tr

    g = torch.Generator().manual_seed(0)
    images, texts = F.normalize(torch.randn(120, 16, generator=g), dim=1), F.normalize(torch.randn(200, 16, generator=g), dim=1)
    matches = [torch.randperm(100, generator=g)[:1 + t % 3].tolist() for t in range(200)]  # images 100-119: distractors
    texts = F.normalize(texts + 0.8 * torch.stack([images[m].mean(0) for m in matches]), dim=1)  # recall mid-range
    image_ids, text_ids = [1000 + i for i in range(120)], [7 + 3 * t for t in range(200)]
    write_cn_clip_features(tmp_path / "images.jsonl", image_ids, images, "image")
    write_cn_clip_features(tmp_path / "texts.jsonl", text_ids, texts, "text")
    (tmp_path / "answers.jsonl").write_text("".join(
        json.dumps({"text_id": text_ids[t], "image_ids": [image_ids[i] for i in m]}) + "\n" for t, m in enumerate(matches)))

    features = ["--image-feats", str(tmp_path / "images.jsonl"), "--text-feats", str(tmp_path / "texts.jsonl")]
    run_cn_clip_script("make_topk_predictions", [*features, "--top-k", "10", "--output", str(tmp_path / "t2i.jsonl")],
                       monkeypatch)
    run_cn_clip_script("transform_ir_annotation_to_tr", ["--input", str(tmp_path / "answers.jsonl")], monkeypatch)
    run_cn_clip_script("make_topk_predictions_tr", [*features, "--top-k", "10", "--output", str(tmp_path / "i2t.jsonl")],
                       monkeypatch)
    theirs_t2i = compute_score(str(tmp_path / "answers.jsonl"), str(tmp_path / "t2i.jsonl"))  # [mean, R1, R5, R10]
    theirs_i2t = compute_score_tr(str(tmp_path / "answers.tr.jsonl"), str(tmp_path / "i2t.jsonl"))

    ours = retrieval_metrics(texts, images, matches)
    assert [ours["text_to_image"][k] for k in ("R@1", "R@5", "R@10")] == pytest.approx(theirs_t2i[1:])
    assert [ours["image_to_text"][k] for k in ("R@1", "R@5", "R@10")] == pytest.approx(theirs_i2t[1:])
    assert 10 < ours["text_to_image"]["R@1"] < 90  # a test that could tell a wrong rank from a right one
