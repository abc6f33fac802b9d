"""Config loading: every shipped config builds its model; bad input is one clear line."""
import json
import math
from pathlib import Path

import pytest
import torch

from chinese_clip.config import Config, ConfigError, load_config, save_config
from chinese_clip.data.stream import open_sources
from chinese_clip.model import ChineseCLIP
from tests.conftest import CONFIGS, PRETRAIN, error_lines

RECIPE_CONFIGS = sorted(CONFIGS.glob("*.yaml"))
CN_CLIP_CONFIGS = Path(__import__("cn_clip.clip", fromlist=["x"]).__file__).parent / "model_configs"


def test_there_are_configs():
    assert any(p.stem == "tiny_synthetic" for p in RECIPE_CONFIGS)


@pytest.mark.parametrize("path", RECIPE_CONFIGS, ids=lambda p: p.stem)
def test_every_config_loads_and_builds_its_model(path):
    assert path.read_text(encoding="utf-8").startswith("# accelerate launch"), "a config starts with its launch command"
    cfg = load_config(path)
    with torch.device("meta"):  # hub-sized presets without allocating their weights
        model = ChineseCLIP(cfg.model)
    image = torch.empty(2, 3, cfg.model.vision.image_size, cfg.model.vision.image_size, device="meta")
    assert model.encode_image(image).shape == (2, cfg.model.embed_dim)
    # BERT's mask code reads values, which meta tensors lack: check the text tower's shapes instead.
    assert model.text_projection.weight.shape == (cfg.model.embed_dim, cfg.model.text.hidden_size)
    assert model.text.embeddings.word_embeddings.weight.shape == (cfg.model.text.vocab_size, cfg.model.text.hidden_size)
    assert cfg.data.context_length <= cfg.model.text.max_position_embeddings


PRESETS = {  # our preset -> Chinese-CLIP's published vision and text configs
    "vit_b16_roberta_base": ("ViT-B-16", "RoBERTa-wwm-ext-base-chinese"),
    "vit_l14_roberta_base": ("ViT-L-14", "RoBERTa-wwm-ext-base-chinese"),
    "vit_h14_roberta_large": ("ViT-H-14", "RoBERTa-wwm-ext-large-chinese"),
    "vit_b16_rbt3": ("ViT-B-16", "RBT3-chinese"),
}


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_have_chinese_clip_architectures(preset):
    vision_name, text_name = PRESETS[preset]
    vision = json.loads((CN_CLIP_CONFIGS / f"{vision_name}.json").read_text())
    text = json.loads((CN_CLIP_CONFIGS / f"{text_name}.json").read_text())
    cfg = load_config(CONFIGS / f"{preset}.yaml")
    v, t = cfg.model.vision, cfg.model.text
    assert cfg.model.embed_dim == vision["embed_dim"]
    assert (v.image_size, v.patch_size, v.width, v.layers) == (
        vision["image_resolution"], vision["vision_patch_size"], vision["vision_width"], vision["vision_layers"])
    assert v.heads == vision["vision_width"] // vision.get("vision_head_width", 64)
    assert (t.vocab_size, t.hidden_size, t.layers, t.heads, t.intermediate_size, t.max_position_embeddings) == (
        text["vocab_size"], text["text_hidden_size"], text["text_num_hidden_layers"],
        text["text_num_attention_heads"], text["text_intermediate_size"], text["text_max_position_embeddings"])


def test_overrides_are_typed_and_dotted():
    cfg = load_config(None, ["optim.lr=1e-3", "data.batch_size=64", "model.vision.patch_size=8",
                             "optim.betas=[0.9, 0.95]", "run.output_dir=null", "loss.local_loss=true"])
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.data.batch_size == 64 and cfg.model.vision.patch_size == 8
    assert cfg.optim.betas == (0.9, 0.95) and cfg.run.output_dir is None and cfg.loss.local_loss is True


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(None, ["optim.lr=3e-4", "model.text.layers=3"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
    defaults = load_config(None)
    defaults.model.init_logit_scale = defaults.model.init_logit_bias = None  # resolved from loss.name
    defaults.stages = []  # resolved from train.steps
    assert defaults == Config()


def test_a_run_without_stages_is_one_stage_that_inherits_everything():
    cfg = load_config(None, ["train.steps=50", "optim.lr=2e-3", "model.vision.patch_drop_rate=0.5", "data.batch_size=8"])
    (stage,) = cfg.stages
    assert (stage.name, stage.steps, stage.lr, stage.mask_ratio, stage.batch_size) == ("train", 50, 2e-3, 0.5, 8)
    assert (stage.warmup_steps, stage.schedule, stage.weight_decay) == (cfg.optim.warmup_steps, "cosine", cfg.optim.weight_decay)
    assert cfg.train.steps is None, "the saved config gives the length once, in its stage"
    assert load_config(None).stages[0].steps == 1000


def test_stages_inherit_what_they_do_not_set_and_take_list_overrides():
    cfg = load_config(CONFIGS / "tiny_staged.yaml", ["stages.1.lr=3e-4", "stages.2.steps=7"])
    lit, flip, unmasked = cfg.stages
    assert (lit.lr, flip.lr, unmasked.lr) == (cfg.optim.lr, 3e-4, 2e-4)
    assert (lit.batch_size, flip.batch_size) == (cfg.data.batch_size, 128) and unmasked.steps == 7
    assert flip.params == unmasked.params and flip.params[0].lr_scale == 0.5


def test_logit_initialisation_follows_the_loss_unless_set():
    clip, siglip = load_config(None), load_config(None, ["loss.name=siglip"])
    assert clip.model.init_logit_scale == pytest.approx(math.log(1 / 0.07))
    assert (siglip.model.init_logit_scale, siglip.model.init_logit_bias) == (pytest.approx(math.log(10)), -10.0)
    chosen = load_config(None, ["loss.name=siglip", "model.init_logit_scale=0.0", "model.init_logit_bias=-5"])
    assert (chosen.model.init_logit_scale, chosen.model.init_logit_bias) == (0.0, -5.0)


@pytest.mark.parametrize("overrides, message", [
    (["optim.lrr=1"], "unknown config key optim.lrr (did you mean optim.lr?)"),
    (["modle.embed_dim=3"], "unknown config key modle"),
    (["optim.lr=fast"], "optim.lr: expected a number, got 'fast'"),
    (["data.batch_size=1.5"], "data.batch_size: expected an integer, got 1.5"),
    (["data.batch_size=true"], "data.batch_size: expected an integer, got True"),
    (["train.accum_freq=0"], "train.accum_freq must be at least 1, got 0"),
    (["loss.chunk_size=0"], "loss.chunk_size must be at least 1, got 0"),
    (["loss.triplet_alpha=-1"], "loss.triplet_alpha must be >= 0"),
    (["loss.name=siglip", "loss.local_loss=true"], "loss.local_loss applies to loss.name=clip"),
    (["loss.name=infonce"], "loss.name: expected one of 'clip', 'siglip', got 'infonce'"),
    (["optim.betas=[0.9]"], "optim.betas: expected a list of 2 values"),
    (["eval.at_end=yes please"], "eval.at_end: expected true or false"),
    (["model=3"], "model: expected a section"),
    (["optim.lr"], "not of the form key=value"),
    (["stages=[{name: a, steps: 5}]", "train.steps=5"], "train.steps and stages both set the run's length"),
    (["stages=[{name: a}]"], "stages[0] (a): give exactly one of steps and samples"),
    (["stages=[{name: a, steps: 5, samples: 9}]"], "stages[0] (a): give exactly one of steps and samples"),
    (["stages=[{name: a, steps: 5, mask_ratio: 1.0}]"], "stages[0] (a): mask_ratio must be in [0, 1)"),
    (["stages=[{name: a, steps: 5}, {name: a, steps: 5}]"], "stage name 'a' is used twice"),
    (["stages=[{name: a, steps: 5, params: [{pattern: 'visual.(*'}]}]"], 'pattern "visual.(*" is not a valid regular expression'),
    (["stages=[{name: a, steps: 5, params: [{pattern: x, lr_scale: -1}]}]"], 'lr_scale of "x" must be >= 0'),
    (["stages=[{name: a, steps: 5, frozen: true}]"], "unknown config key stages[0].frozen"),
    (["stages=[{name: a, steps: 5}]", "stages.3.lr=1"], "override stages.3.lr: stages has 1 entries; '3' is not one of their indices"),
    (["model.vision.patch_drop_rate=1.5"], "model.vision.patch_drop_rate must be in [0, 1)"),
])
def test_bad_overrides_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        load_config(bad)


def test_recipe_reports_config_errors_in_one_line(tmp_path, monkeypatch, in_process):
    """The recipe ends with the error line, exit status 2 and no traceback (a traceback would escape
    main() as an exception here)."""
    monkeypatch.chdir(tmp_path)  # a relative path, as a user gives it
    for args, message in [(["optim.lrr=1"], "error: unknown config key optim.lrr (did you mean optim.lr?)"),
                          (["--config", "missing.yaml"], "error: config file not found: missing.yaml"),
                          (["train.steps=many"], "error: train.steps: expected an integer, got 'many'")]:
        result = in_process(PRETRAIN, *args)
        assert result.returncode == 2
        assert result.stderr.strip().splitlines()[-1].startswith(message)


GPU_PRESETS = ["vit_b16_roberta_base", "vit_b16_roberta_base_staged", "vit_b16_rbt3", "vit_l14_roberta_base",
               "vit_h14_roberta_large"]


@pytest.mark.parametrize("preset", GPU_PRESETS)
def test_presets_for_gpus_train_on_real_data_that_the_user_names(preset):
    cfg = load_config(CONFIGS / f"{preset}.yaml")
    assert cfg.data.source == "shards"
    with pytest.raises(ConfigError, match=r"^data.shards is empty: set it to the pairs to train on"):
        open_sources(cfg.data, world_size=1, say=print)
    assert load_config(CONFIGS / f"{preset}.yaml", ["data.source=synthetic"]).data.source == "synthetic"


def test_launching_a_gpu_preset_without_data_stops_with_one_line_naming_the_key(tmp_path, in_process):
    result = in_process(PRETRAIN, "--config", str(CONFIGS / "vit_b16_rbt3.yaml"), f"run.output_dir={tmp_path}")
    assert result.returncode == 2
    [line] = error_lines(result)
    assert line.startswith("error: data.shards is empty") and "data.source=synthetic" in line
