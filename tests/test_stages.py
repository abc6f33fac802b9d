"""Stage plans and freeze rules as data: lengths in steps or samples, first matching rule wins, typos refused."""
import re

import pytest

from chinese_clip.config import ConfigError, ParamRule, StageConfig, load_config
from chinese_clip.model import ChineseCLIP
from chinese_clip.stages import freeze, plan_stages, resolve_lr_scales, stage_lr_scales, stage_rules, summary
from tests.conftest import CONFIGS, FINETUNE, error_lines

NAMES = ["logit_scale", "logit_bias", "visual.cls_token", "visual.blocks.0.attn.qkv.weight",
         "visual.blocks.1.attn.qkv.weight", "visual.blocks.11.mlp.fc1.weight", "visual_projection.weight",
         "text.embeddings.word_embeddings.weight", "text.encoder.layer.0.output.dense.weight", "text_projection.weight"]


def test_lengths_in_samples_round_up_to_whole_global_batches():
    stages = [StageConfig("a", steps=10, batch_size=4), StageConfig("b", samples=100, batch_size=8),
              StageConfig("c", samples=64, batch_size=4)]
    a, b, c = plan_stages(stages, processes=2, accum_freq=2)
    assert (a.global_batch, a.start_step, a.end_step, a.start_sample) == (16, 0, 10, 0)
    assert (b.global_batch, b.steps, b.start_step, b.start_sample) == (32, 4, 10, 160)  # 100 / 32 -> 4 steps
    assert (c.steps, c.start_step, c.start_sample) == (4, 14, 288)
    assert b.sample_at(12) == 160 + 2 * 32


def test_first_matching_rule_wins_and_unmatched_parameters_train_at_full_lr():
    rules = [ParamRule(r"visual\.blocks\.11\..*", 0.5), ParamRule(r"visual(_projection)?\..*", 0.0),
             ParamRule(r"text\.embeddings\..*", 0.1)]
    scales = resolve_lr_scales(NAMES, rules, "s")
    assert scales["visual.blocks.11.mlp.fc1.weight"] == 0.5  # all but the last block frozen
    assert scales["visual.blocks.0.attn.qkv.weight"] == scales["visual_projection.weight"] == 0.0
    assert scales["text.embeddings.word_embeddings.weight"] == 0.1
    assert scales["text.encoder.layer.0.output.dense.weight"] == scales["logit_scale"] == 1.0


def test_patterns_match_whole_names():
    with pytest.raises(ConfigError, match='pattern "visual" matches no parameter'):
        resolve_lr_scales(NAMES, [ParamRule("visual", 0.0)], "lit")


def test_a_rule_that_matches_nothing_or_freezes_everything_is_refused():
    with pytest.raises(ConfigError, match=re.escape('stage \'lit\': pattern "visaul\\..*" matches no parameter (names look like visual.cls_token')):
        resolve_lr_scales(NAMES, [ParamRule(r"visaul\..*", 0.0)], "lit")
    with pytest.raises(ConfigError, match="only ones an earlier rule already matched"):
        resolve_lr_scales(NAMES, [ParamRule(r"visual\..*", 0.0), ParamRule(r"visual\.cls_token", 1.0)], "lit")
    with pytest.raises(ConfigError, match="stage 'x' freezes every parameter"):
        resolve_lr_scales(NAMES, [ParamRule(".*", 0.0)], "x")


def test_infonce_never_trains_the_bias_whatever_the_stage_says():
    stage = StageConfig("s", steps=1, params=[ParamRule("logit_.*", 2.0)])
    assert resolve_lr_scales(NAMES, stage_rules(stage, "clip"), "s")["logit_bias"] == 0.0
    assert resolve_lr_scales(NAMES, stage_rules(stage, "siglip"), "s")["logit_bias"] == 2.0


def test_freeze_sets_requires_grad_and_the_summary_counts_each_tower(tiny_model_cfg):
    model = ChineseCLIP(tiny_model_cfg)
    names = [n for n, _ in model.named_parameters()]
    scales = resolve_lr_scales(names, [ParamRule(r"visual(_projection)?\..*", 0.0)], "lit")
    trainable = freeze(model, scales)
    assert set(trainable) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith("visual"))
    cfg = load_config(None, ["train.steps=10"])
    (stage,) = plan_stages(cfg.stages, processes=2, accum_freq=1)
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    vision = sum(v for n, v in sizes.items() if n.startswith("visual"))
    text = summary(stage, 1, model.parameter_layout(), sizes, scales, 2, 1)
    assert f"vision              0 of {vision:>13,} parameters train (frozen)" in text
    assert "batch 128 x 2 processes = 256 per step, mask ratio 0.00" in text


def test_layer_decay_scales_each_block_by_its_depth_and_multiplies_the_rules(tiny_model_cfg):
    layout = ChineseCLIP(tiny_model_cfg).parameter_layout()  # 2 vision blocks, 2 text layers
    stage = StageConfig(name="full", steps=1, layer_decay=0.5,
                        params=[ParamRule(r"text\.encoder\.layer\.0\..*", 0.1), ParamRule(r"visual\.blocks\.0\..*", 0.0)])
    scales = stage_lr_scales(layout, stage, "clip", "full")
    expected = {"visual.cls_token": 0.125, "visual.patch_embed.proj.weight": 0.125, "visual.norm_pre.weight": 0.125,
                "visual.blocks.0.attn.qkv.weight": 0.0, "visual.blocks.1.attn.qkv.weight": 0.5,
                "visual.norm.weight": 1.0, "visual_projection.weight": 1.0,
                "text.embeddings.word_embeddings.weight": 0.125, "text.encoder.layer.0.output.dense.weight": 0.1 * 0.25,
                "text.encoder.layer.1.output.dense.weight": 0.5, "text_projection.weight": 1.0,
                "logit_scale": 1.0, "logit_bias": 0.0}
    assert {name: scales[name] for name in expected} == pytest.approx(expected)
    assert stage_lr_scales(layout, StageConfig(name="s", steps=1), "clip", "s") == resolve_lr_scales(
        list(layout), stage_rules(StageConfig(name="s", steps=1), "clip"), "s")


def test_layer_decay_without_the_layers_of_a_tower_stops_at_start_up(tiny_model_cfg, tmp_path, in_process):
    """The layout comes from the modules; a tower without blocks gives layer decay nothing to go by,
    and the run says so before training, instead of training that tower at x 1."""
    tiny_model_cfg.text.layers = 0
    layout = ChineseCLIP(tiny_model_cfg).parameter_layout()
    assert {place.layer for name, place in layout.items() if name.startswith("text.")} == {0}
    with pytest.raises(ConfigError, match="stage 'full': layer_decay needs the blocks of both towers, and the text "
                                          "tower has none"):
        stage_lr_scales(layout, StageConfig(name="full", steps=1, layer_decay=0.75), "clip", "full")
    result = in_process(FINETUNE, "--pretrained", str(_saved(tmp_path)), "stages.1.layer_decay=0.5",
                        f"run.output_dir={tmp_path / 'run'}", "data.num_workers=0")
    assert result.returncode == 2 and error_lines(result) == [
        "error: stage 'full': layer_decay needs the blocks of both towers, and the text tower has none"], result.stderr[-2000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def _saved(tmp_path):
    """A tiny model of ours without text layers, as recipes/finetune.py takes one."""
    from chinese_clip.checkpoints import save_pretrained
    from chinese_clip.config import load_config as load

    cfg = load(CONFIGS / "tiny_finetune.yaml", ["model.text.layers=0"])
    save_pretrained(ChineseCLIP(cfg.model).state_dict(), cfg, tmp_path / "no_text_layers")
    return tmp_path / "no_text_layers"


def test_the_model_places_every_parameter_and_names_what_weight_decay_skips(tiny_model_cfg):
    model = ChineseCLIP(tiny_model_cfg)
    layout = model.parameter_layout()
    assert list(layout) == [name for name, _ in model.named_parameters()]
    assert {(place.tower, place.depth) for place in layout.values()} == {("vision", 2), ("text", 2), ("logit", 0)}
    assert layout["visual.pos_embed"].layer == layout["text.embeddings.LayerNorm.weight"].layer == 0
    assert layout["visual.blocks.1.mlp.fc2.weight"].layer == layout["text.encoder.layer.1.output.dense.weight"].layer == 2
    assert layout["visual.norm.weight"].layer == layout["text_projection.weight"].layer == 3
    blocks = model.blocks()
    assert len(blocks) == 4 and all(sum(p.numel() for p in b.parameters()) for b in blocks)
    skip = model.no_weight_decay()
    assert {"visual.pos_embed", "visual.cls_token", "logit_scale", "visual.norm.weight",
            "text.encoder.layer.0.output.dense.bias"} <= skip
    assert not {"visual.blocks.0.attn.qkv.weight", "text.embeddings.word_embeddings.weight"} & skip
