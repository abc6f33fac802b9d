"""Evaluation inside training: a tiny model trained on synthetic data on 2 ZeRO-3 ranks evaluates a set in
Chinese-CLIP's layout, a labelled folder and our shards every few steps; recipes/evaluate.py scores
the saved model exactly as the run did; the best weights are kept, and a resumed run keeps the same
best; evaluating does not change what trains."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from chinese_clip.data.readers import read_cn_clip_tsv
from chinese_clip.data.shards import build_shards
from tests.test_evaluate import write_folder
from tests.test_retrieval_set import write_set
from tests.test_train import SHORT, run_ok

ROOT = Path(__file__).resolve().parents[1]
TWO_RANKS = ["--use_deepspeed", "--deepspeed_config_file", str(ROOT / "ds_configs" / "zero3.json")]
STEPS = ["train.steps=12", "checkpoint.every_steps=6", "eval.every_steps=6", "eval.at_start=true",
         "data.batch_size=16"]


def eval_sets(root: Path) -> str:
    muge = write_set(root / "MUGE", images=12, texts=16)
    shards = root / "shards"
    build_shards(read_cn_clip_tsv(muge, "valid"), shards, rows_per_shard=8)
    folder = write_folder(root / "shapes", per_class=(2,) * 24)
    return (f"eval.sets=[{{name: MUGE, path: {muge}}}, {{name: pairs, path: {shards}}}, "
            f"{{name: shapes, task: classification, path: {folder}}}]")


def evaluations(run_dir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if "tag" in line]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("in_training")
    sets = eval_sets(root / "data")
    overrides = SHORT + STEPS + [sets, "eval.best_metric=shapes/top1"]
    run_ok(root / "run", overrides, launcher=TWO_RANKS)
    return root, overrides


@pytest.mark.slow
def test_the_recipe_scores_the_saved_model_as_the_run_did(trained):
    root, overrides = trained
    run_dir = root / "run"
    results = json.loads((run_dir / "eval.json").read_text())
    assert set(results) == {"before", "during", "after", "best"} and list(results["during"]) == ["6"]
    assert set(results["after"]) == {"val", "novel", "MUGE", "pairs", "shapes"}
    assert [line["tag"] for line in evaluations(run_dir)] == ["before", "during", "after"]
    assert "eval/MUGE/t2i_R@1" in evaluations(run_dir)[1] and "eval/shapes/top5" in evaluations(run_dir)[1]

    sets = next(o for o in overrides if o.startswith("eval.sets="))
    out = root / "recipe"
    result = subprocess.run([sys.executable, str(ROOT / "recipes" / "evaluate.py"), "--model", str(run_dir / "model"),
                             "--config", str(ROOT / "recipes" / "configs" / "tiny_synthetic.yaml"), sets,
                             "--out", str(out), "--batch-size", "16"],  # the config's context length, 32
                            capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    recipe = json.loads((out / "results.json").read_text())["results"]
    for name in ("MUGE", "pairs", "shapes"):
        ours, theirs = recipe[name], results["after"][name]
        for key in {"text_to_image", "image_to_text", "mean_recall", "top1", "top5", "per_class_top1"} & set(theirs):
            assert ours[key] == pytest.approx(theirs[key], abs=1e-6), (name, key)
        assert ours["images"] == theirs["images"] > 10, name


@pytest.mark.slow
def test_the_best_weights_are_kept_and_a_resumed_run_keeps_the_same_best(trained, tmp_path):
    root, overrides = trained
    run_dir = root / "run"
    results = json.loads((run_dir / "eval.json").read_text())
    scores = {"0": results["before"]["shapes"]["top1"], "6": results["during"]["6"]["shapes"]["top1"],
              "12": results["after"]["shapes"]["top1"]}
    best_step = max(scores, key=lambda step: (scores[step], -int(step)))  # the first of equal scores stays
    best = json.loads((run_dir / "best" / "best.json").read_text())
    assert best == results["best"] == {"metric": "shapes/top1", "value": scores[best_step], "step": int(best_step)}
    assert (run_dir / "best" / "vocab.txt").is_file() and not (run_dir / "best.partial").exists()
    if best_step == "12":
        assert load_file(run_dir / "best" / "model.safetensors").keys() == load_file(run_dir / "model" / "model.safetensors").keys()
        for name, value in load_file(run_dir / "model" / "model.safetensors").items():
            assert (load_file(run_dir / "best" / "model.safetensors")[name] == value).all(), name

    # The run stopped after its step-6 checkpoint: it resumes there, and ends as the run that did not stop.
    resumed = tmp_path / "run"
    shutil.copytree(run_dir, resumed)
    for later in ("checkpoints/step_12", "model", "eval.json"):
        shutil.rmtree(resumed / later, ignore_errors=True) if (resumed / later).is_dir() else (resumed / later).unlink()
    run_ok(resumed, overrides, launcher=TWO_RANKS)
    again = json.loads((resumed / "eval.json").read_text())
    assert again["best"] == results["best"]
    assert again["after"]["shapes"]["top1"] == results["after"]["shapes"]["top1"]
    assert again["during"]["6"]["MUGE"]["mean_recall"] == pytest.approx(
        results["during"]["6"]["MUGE"]["mean_recall"])
    assert [line["tag"] for line in evaluations(resumed)] == ["before", "during", "after"]


@pytest.mark.slow
def test_evaluating_does_not_change_what_trains(tmp_path):
    """FLIP masks draw from the RNG every step; evaluating between steps must not shift them."""
    masked = SHORT + ["train.steps=6", "data.batch_size=16", "model.vision.patch_drop_rate=0.5"]
    run_ok(tmp_path / "plain", masked + ["eval.at_start=false"])
    run_ok(tmp_path / "evaluated", masked + ["eval.at_start=true", "eval.every_steps=2"])
    assert len(evaluations(tmp_path / "evaluated")) == 4
    plain, evaluated = (load_file(tmp_path / run / "model" / "model.safetensors") for run in ("plain", "evaluated"))
    for name, value in plain.items():
        assert (evaluated[name] == value).all(), name


@pytest.mark.slow
def test_each_stage_end_is_evaluated_and_the_run_end_once(tmp_path):
    staged = ["--config", str(ROOT / "recipes" / "configs" / "tiny_staged.yaml")]
    run_ok(tmp_path, staged + SHORT[1:] + ["stages.0.steps=2", "stages.1.steps=2", "stages.1.batch_size=16",
                                           "stages.2.steps=2", "data.batch_size=16", "eval.at_stage_end=true"])
    results = json.loads((tmp_path / "eval.json").read_text())
    assert list(results["during"]) == ["2", "4"] and "after" in results and "best" not in results
    assert [(line["tag"], line["step"]) for line in evaluations(tmp_path)] == [("during", 2), ("during", 4),
                                                                               ("after", 6)]
