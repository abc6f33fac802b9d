"""recipes/evaluate.py: retrieval scores of a saved model on a set in Chinese-CLIP's layout, the same
from one process, from two, and from the library; features in Chinese-CLIP's format; one-line errors."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chinese_clip.checkpoints import save_pretrained
from chinese_clip.config import Config, DataConfig
from chinese_clip.data.loaders import build_collator
from chinese_clip.distributed import free_port
from chinese_clip.evaluation.tasks import evaluate_retrieval
from chinese_clip.model import ChineseCLIP
from chinese_clip.tokenizer import load_tokenizer
from tests.test_retrieval_set import TINY, write_set

ROOT = Path(__file__).resolve().parents[1]
EVALUATE = str(ROOT / "recipes" / "evaluate.py")


@pytest.fixture(scope="module")
def model_and_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    torch.manual_seed(0)
    model = ChineseCLIP(TINY)
    save_pretrained(model.state_dict(), Config(model=TINY), root / "model")
    return root / "model", write_set(root / "MUGE", images=9, texts=13)


def evaluate(model_dir, data, out, launcher=()):
    result = subprocess.run([sys.executable, *launcher, EVALUATE, "--model", str(model_dir), "--retrieval", str(data),
                             "--out", str(out), "--batch-size", "4", "--save-features"],
                            capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "results.json").read_text())["results"]["MUGE/valid"], result.stdout


def test_the_recipe_scores_what_the_library_scores_and_writes_chinese_clips_features(model_and_set, tmp_path):
    model_dir, data = model_and_set
    ours, printed = evaluate(model_dir, data, tmp_path / "out")
    torch.manual_seed(0)
    model = ChineseCLIP(TINY)
    expected = evaluate_retrieval(model, data, "valid", build_collator(DataConfig(), load_tokenizer(None, 52)),
                                  torch.device("cpu"), batch_size=4)
    assert ours["text_to_image"] == pytest.approx(expected["text_to_image"])
    assert ours["image_to_text"] == pytest.approx(expected["image_to_text"])
    assert (ours["texts"], ours["images"]) == (13, 9) and "| MUGE/valid |" in printed
    features = tmp_path / "out" / "features" / "MUGE" / "valid"
    first = json.loads((features / "valid_imgs.img_feat.jsonl").read_text().splitlines()[0])
    assert first["image_id"] == "100" and len(first["feature"]) == TINY.embed_dim
    assert len((features / "valid_texts.txt_feat.jsonl").read_text().splitlines()) == 13


@pytest.mark.slow
def test_two_processes_score_the_same_as_one(model_and_set, tmp_path):
    model_dir, data = model_and_set
    one, _ = evaluate(model_dir, data, tmp_path / "one")
    two, printed = evaluate(model_dir, data, tmp_path / "two", launcher=["-m", "accelerate.commands.launch",
                                                                          "--multi_gpu", "--num_processes", "2", "--main_process_port",
                                                                          str(free_port())])
    assert "processes: 2" in printed
    assert two["text_to_image"] == pytest.approx(one["text_to_image"])
    assert two["image_to_text"] == pytest.approx(one["image_to_text"])


def test_a_missing_set_is_one_line(model_and_set, tmp_path):
    model_dir, _ = model_and_set
    result = subprocess.run([sys.executable, EVALUATE, "--model", str(model_dir), "--retrieval", str(tmp_path / "none"),
                             "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: none/valid: ")
