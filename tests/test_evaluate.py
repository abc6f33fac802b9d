"""recipes/evaluate.py: retrieval scores of a saved model on a set in Chinese-CLIP's layout, the same
from one process, from two, and from the library; features that Chinese-CLIP's own scripts score as
we do; one-line errors."""
import json
import re
import shutil

import pytest
import torch

from chinese_clip.checkpoints import save_pretrained
from chinese_clip.config import Config, DataConfig, EvalSetConfig
from chinese_clip.data.loaders import build_collator
from chinese_clip.evaluation.classification import read_labelled_folder
from chinese_clip.evaluation.tasks import evaluate_set, read_sets
from chinese_clip.model import ChineseCLIP
from chinese_clip.tokenizer import load_tokenizer
from tests.conftest import EVALUATE, TINY, command, run_ok, write_class_folder, write_retrieval_set
from tests.tolerances import SCORES
from tests.test_retrieval import run_cn_clip_script


@pytest.fixture(scope="module")
def model_and_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    torch.manual_seed(0)
    model = ChineseCLIP(TINY)
    save_pretrained(model.state_dict(), Config(model=TINY), root / "model")
    # at least 10 images and texts: Chinese-CLIP's scripts rank the top 10 in both directions
    return root / "model", write_retrieval_set(root / "MUGE", images=12, texts=13)


def evaluate(model_dir, data, out, launch, extra=()):
    """The retrieval scores (every set's, when `extra` names more sets) and what the recipe printed, run
    by `launch` (run_ok of a command, or the in_process fixture)."""
    result = launch(EVALUATE, "--model", str(model_dir), "--retrieval", str(data), "--out", str(out),
                    "--batch-size", "4", "--save-features", *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())["results"]
    return (results if extra else results["MUGE/valid"]), result.stdout


def test_the_recipe_scores_what_the_library_and_chinese_clips_own_scripts_score(model_and_set, tmp_path,
                                                                                  monkeypatch, in_process):
    model_dir, data = model_and_set
    ours, printed = evaluate(model_dir, data, tmp_path / "out", in_process)
    torch.manual_seed(0)
    model = ChineseCLIP(TINY)
    expected = evaluate_set(model, read_sets([EvalSetConfig(name="MUGE", path=str(data))])[0],
                            build_collator(DataConfig(), load_tokenizer(None, 52)), torch.device("cpu"), batch_size=4)
    assert ours["text_to_image"] == pytest.approx(expected["text_to_image"], abs=SCORES)
    assert ours["image_to_text"] == pytest.approx(expected["image_to_text"], abs=SCORES)
    assert (ours["texts"], ours["images"]) == (13, 12) and "| MUGE/valid |" in printed
    features = tmp_path / "out" / "features" / "MUGE" / "valid"
    first = json.loads((features / "valid_imgs.img_feat.jsonl").read_text().splitlines()[0])
    assert first["image_id"] == 100 and len(first["feature"]) == TINY.embed_dim  # an integer, as Chinese-CLIP's
    assert len((features / "valid_texts.txt_feat.jsonl").read_text().splitlines()) == 13

    # Chinese-CLIP's own pipeline on those files and the set's annotation scores what results.json says.
    answers = tmp_path / "valid_texts.jsonl"
    shutil.copy(data / "valid_texts.jsonl", answers)  # its transform script writes beside its input
    files = ["--image-feats", str(features / "valid_imgs.img_feat.jsonl"),
             "--text-feats", str(features / "valid_texts.txt_feat.jsonl"), "--top-k", "10"]
    run_cn_clip_script("make_topk_predictions", [*files, "--output", str(tmp_path / "t2i.jsonl")], monkeypatch)
    run_cn_clip_script("evaluation", [str(answers), str(tmp_path / "t2i.jsonl"), str(tmp_path / "t2i_score.json")],
                       monkeypatch)
    run_cn_clip_script("transform_ir_annotation_to_tr", ["--input", str(answers)], monkeypatch)
    run_cn_clip_script("make_topk_predictions_tr", [*files, "--output", str(tmp_path / "i2t.jsonl")], monkeypatch)
    run_cn_clip_script("evaluation_tr", [str(tmp_path / "valid_texts.tr.jsonl"), str(tmp_path / "i2t.jsonl"),
                                         str(tmp_path / "i2t_score.json")], monkeypatch)
    theirs = {}
    for direction in ("t2i", "i2t"):
        score = json.loads((tmp_path / f"{direction}_score.json").read_text())
        assert score["success"], score
        theirs[direction] = score["scoreJson"]
    for direction, key in (("t2i", "text_to_image"), ("i2t", "image_to_text")):
        assert [theirs[direction][r] for r in ("r1", "r5", "r10")] == pytest.approx(
            [ours[key][f"R@{k}"] for k in (1, 5, 10)]), direction
    assert (theirs["t2i"]["mean_recall"] + theirs["i2t"]["mean_recall"]) / 2 == pytest.approx(ours["mean_recall"])
    assert 0 < ours["text_to_image"]["R@1"] < ours["text_to_image"]["R@10"] < 100  # a set where ranks matter


@pytest.mark.slow
def test_two_processes_score_the_same_as_one(model_and_set, tmp_path, in_process):
    model_dir, data = model_and_set
    classification = ["--classification", str(write_class_folder(tmp_path / "shapes", per_class=(3, 2, 2)))]
    one, _ = evaluate(model_dir, data, tmp_path / "one", in_process, extra=classification)
    two, printed = evaluate(model_dir, data, tmp_path / "two", lambda *args: run_ok(command(*args, engine="ddp")),
                            extra=classification)
    assert "processes: 2" in printed
    for key in ("text_to_image", "image_to_text"):
        assert two["MUGE/valid"][key] == pytest.approx(one["MUGE/valid"][key], abs=SCORES)
    assert two["test"]["images"] == one["test"]["images"] == 7
    assert two["test"]["per_class_top1"] == pytest.approx(one["test"]["per_class_top1"], abs=SCORES)


def test_a_missing_set_is_one_line(model_and_set, tmp_path, in_process):
    model_dir, _ = model_and_set
    result = in_process(EVALUATE, "--model", str(model_dir), "--retrieval", str(tmp_path / "none"),
                        "--out", str(tmp_path / "out"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: eval set none/valid: ")


def test_classification_scores_a_labelled_folder_and_names_its_labels_and_templates(model_and_set, tmp_path,
                                                                                     in_process):
    from chinese_clip.evaluation.classification import accuracy, chinese_clip_templates, digest

    model_dir, _ = model_and_set
    folder = write_class_folder(tmp_path / "shapes")
    out = tmp_path / "out"
    result = in_process(EVALUATE, "--model", str(model_dir), "--classification", str(folder), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    scores = json.loads((out / "results.json").read_text())["results"]["test"]
    assert (scores["images"], scores["classes"], scores["empty_classes"]) == (5, 3, ["红色三角形"])
    assert scores["labels_sha256"] == digest(["红色圆形", "红色正方形", "红色三角形"])
    assert scores["templates_sha256"] == digest(chinese_clip_templates()) and scores["templates"] > 10
    assert set(scores["per_class_top1"]) <= {"红色圆形", "红色正方形"} and "| test |" in result.stdout
    # the metric itself, by hand: 3 images, classes 0/1/2
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.3, 0.5], [0.1, 0.8, 0.1]])
    scored = accuracy(logits, torch.tensor([0, 1, 2]), ["a", "b", "c"])
    assert scored["top1"] == pytest.approx(100 / 3) and scored["top5"] == 100.0  # 3 classes: top-5 is top-3
    assert scored["per_class_top1"] == {"a": 100.0, "b": 0.0, "c": 0.0}
    two = accuracy(logits[:, :2].contiguous(), torch.tensor([0, 1, 0]), ["a", "b"])  # the last row says b
    assert two["top1"] == pytest.approx(200 / 3) and two["per_class_top1"] == {"a": 50.0, "b": 100.0}


@pytest.mark.parametrize("damage, message", [
    (lambda root: (root / "label_cn.txt").write_text("\n"), "names no class"),
    (lambda root: (root / "label_cn.txt").write_text("一\n二\n"), "3 class folders but .* 2 classes"),
    (lambda root: (root / "label_cn.txt").unlink(), "no label_cn.txt"),
])
def test_a_broken_label_file_is_refused_naming_what_is_wrong(tmp_path, damage, message):
    folder = write_class_folder(tmp_path / "shapes")
    damage(tmp_path / "shapes")
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        read_labelled_folder(folder)


def test_the_recipe_says_what_is_wrong_with_a_set_in_one_line(model_and_set, tmp_path, in_process):
    model_dir, _ = model_and_set
    folder = write_class_folder(tmp_path / "shapes")
    (tmp_path / "shapes" / "label_cn.txt").write_text("一\n二\n")
    result = in_process(EVALUATE, "--model", str(model_dir), "--classification", str(folder),
                        "--out", str(tmp_path / "out"))
    assert result.returncode == 1 and re.fullmatch(r"error: eval set test: .*3 class folders but .* 2 classes.*",
                                                   result.stderr.strip().splitlines()[-1]), result.stderr
