"""Evaluation inside training: a tiny model trained on synthetic data on 2 ranks (ZeRO-3, and FSDP2,
whose forward passes gather the sharded parameters) evaluates a set in Chinese-CLIP's layout, a
labelled folder and our shards every few steps; recipes/evaluate.py scores the saved model exactly
as the run did; the best weights are kept, and a resumed run ends with the same evaluations and best.
(Evaluating does not change what trains: tests/test_staged.py.)"""
import json
import shutil

import pytest

from chinese_clip.data.readers import read_pairs
from chinese_clip.data.shards import build_shards
from tests.conftest import (CONFIGS, EVALUATE, PRETRAIN, assert_same_results, command, final_weights, metrics, model_weights,
                            run_ok, write_class_folder, write_retrieval_set)
from tests.tolerances import SCORES
from tests.test_train import SHORT

STEPS = ["train.steps=12", "checkpoint.every_steps=6", "eval.every_steps=6", "eval.at_start=true",
         "data.batch_size=16"]


def eval_sets(root) -> str:
    muge = write_retrieval_set(root / "MUGE", images=12, texts=16)
    shards = root / "shards"
    build_shards(read_pairs(muge, "valid"), shards, rows_per_shard=8)
    folder = write_class_folder(root / "shapes", per_class=(2,) * 24)
    templates = root / "templates.txt"  # two prompts per class, not Chinese-CLIP's 183: this tests the plumbing
    templates.write_text("一张{}的图片\n{}\n", encoding="utf-8")
    return (f"eval.sets=[{{name: MUGE, path: {muge}}}, {{name: pairs, path: {shards}}}, "
            f"{{name: shapes, task: classification, path: {folder}, templates: {templates}}}]")


def evaluations(run_dir) -> list[dict]:
    return [line for line in metrics(run_dir) if "tag" in line]


def pretrain(run_dir, overrides, engine=None):
    return command(PRETRAIN, *overrides, f"run.output_dir={run_dir}", engine=engine)


@pytest.fixture(scope="module", params=["zero3", "fsdp"])
def trained(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"in_training_{request.param}")
    overrides = SHORT + STEPS + [eval_sets(root / "data"), "eval.best_metric=shapes/top1"]
    run_ok(pretrain(root / "run", overrides, request.param))
    return root, overrides, request.param


@pytest.mark.slow
def test_the_recipe_scores_the_saved_model_as_the_run_did(trained, in_process):
    root, overrides, _ = trained
    run_dir = root / "run"
    results = json.loads((run_dir / "eval.json").read_text())
    assert set(results) == {"before", "during", "after", "best"} and list(results["during"]) == ["6"]
    assert set(results["after"]) == {"val", "novel", "MUGE", "pairs", "shapes"}
    assert [line["tag"] for line in evaluations(run_dir)] == ["before", "during", "after"]
    assert "eval/MUGE/t2i_R@1" in evaluations(run_dir)[1] and "eval/shapes/top5" in evaluations(run_dir)[1]

    sets = next(o for o in overrides if o.startswith("eval.sets="))
    out = root / "recipe"
    result = in_process(EVALUATE, "--model", str(run_dir / "model"), "--config", str(CONFIGS / "tiny_synthetic.yaml"),
                        sets, "--out", str(out), "--batch-size", "16")  # the config's context length, 32
    assert result.returncode == 0, result.stderr[-3000:]
    recipe = json.loads((out / "results.json").read_text())["results"]
    for name in ("MUGE", "pairs", "shapes"):
        ours, theirs = recipe[name], results["after"][name]
        for key in {"text_to_image", "image_to_text", "mean_recall", "top1", "top5", "per_class_top1"} & set(theirs):
            assert ours[key] == pytest.approx(theirs[key], abs=SCORES), (name, key)
        assert ours["images"] == theirs["images"] > 10, name


@pytest.mark.slow
def test_the_best_weights_are_kept_and_a_resumed_run_keeps_the_same_best(trained, tmp_path):
    root, overrides, engine = trained
    run_dir = root / "run"
    results = json.loads((run_dir / "eval.json").read_text())
    scores = {"0": results["before"]["shapes"]["top1"], "6": results["during"]["6"]["shapes"]["top1"],
              "12": results["after"]["shapes"]["top1"]}
    best_step = max(scores, key=lambda step: (scores[step], -int(step)))  # the first of equal scores stays
    best = json.loads((run_dir / "best" / "best.json").read_text())
    assert best == results["best"] == {"metric": "shapes/top1", "value": scores[best_step], "step": int(best_step)}
    assert (run_dir / "best" / "vocab.txt").is_file() and not (run_dir / "best.partial").exists()
    card = (run_dir / "best" / "README.md").read_text(encoding="utf-8")  # brought up to date with eval.json
    assert f"these are its weights at step {best_step}." in card
    assert f"Best on `shapes/top1`: {best['value']:.2f} at step {best_step}" in card
    assert f"| shapes | top1 | {scores['0']:.2f} | {scores['12']:.2f} |" in card  # before, after
    if best_step == "12":
        best_weights = model_weights(run_dir / "best")
        assert final_weights(run_dir).keys() == best_weights.keys()
        for name, value in final_weights(run_dir).items():
            assert (best_weights[name] == value).all(), name

    # The run stopped after its step-6 checkpoint: it resumes there, and ends as the run that did not stop.
    # (What a checkpoint keeps of the evaluations and the best does not depend on the engine: FSDP's
    # resume stands for both.)
    if engine != "fsdp":
        return
    resumed = tmp_path / "run"
    shutil.copytree(run_dir, resumed)
    for later in ("checkpoints/step_12", "model", "eval.json"):
        shutil.rmtree(resumed / later, ignore_errors=True) if (resumed / later).is_dir() else (resumed / later).unlink()
    run_ok(pretrain(resumed, overrides, engine))
    assert_same_results(json.loads((resumed / "eval.json").read_text()), results)
    assert [line["tag"] for line in evaluations(resumed)] == ["before", "during", "after"]
