"""The model card of weights taken mid-run (a run's best/, or an export of a checkpoint): it describes the
training those weights had, not the whole schedule, and their own scores. (The card of a whole run, read
against its eval.json: tests/test_staged.py.)"""
import yaml

from chinese_clip.config import load_config
from chinese_clip.model_card import model_card
from chinese_clip.stages import plan_stages
from tests.conftest import CONFIGS


def classification(top1):
    return {"task": "classification", "top1": top1, "top5": 2 * top1}


def test_a_card_of_weights_from_mid_run_describes_their_training_and_their_scores():
    cfg = load_config(CONFIGS / "tiny_staged.yaml", [
        "stages.0.steps=6", "stages.1.steps=6", "stages.2.steps=4", "data.batch_size=16", "stages.1.batch_size=32",
        "data.source=shards", "data.shards=[{path: s3://bucket/laion_zh, weight: 2}, {path: /data/wukong}]"])
    plan = plan_stages(cfg.stages, processes=2, accum_freq=1)
    results = {"before": {"val": classification(4.0)}, "during": {"6": {"val": classification(6.5)},
                                                                  "8": {"val": classification(8.0)}},
               "best": {"metric": "val/top1", "value": 8.0, "step": 8}}
    card = model_card(cfg, plan, results, step=8)
    assert yaml.safe_load(card.split("---\n")[1])["license"] is None
    assert "these are its weights at step 8." in card
    assert "Data: `s3://bucket/laion_zh` (weight 2), `/data/wukong` (weight 1). Trained for 8 steps on 320 samples" in card
    assert "| lit | 0-5 (6) | 192 | 32 | 0 | 1.00e-03 | vision: frozen; text: all |" in card
    assert "| flip | 6-7 (2 of 6) | 128 | 64 | 0.5 | 1.00e-03 | vision: all; text: all (lr x 1, 0.5) |" in card
    assert "| unmasked |" not in card
    assert "| set | metric | before | step 8 (these weights) |" in card and "| val | top1 | 4.00 | 8.00 |" in card
    assert "Best on `val/top1`: 8.00 at step 8" in card


def test_a_converted_model_has_no_training_section():
    card = model_card(load_config(CONFIGS / "tiny_staged.yaml"), source="clip_cn_vit-b-16.pt")
    assert "It was converted from `clip_cn_vit-b-16.pt`." in card
    assert "## Training" not in card and "## Evaluation" not in card and "## Architecture" in card
