"""Released-checkpoint formats in and out, each against the other implementation's own model:
cn_clip's `CLIP` for Chinese-CLIP `.pt` files, transformers' `ChineseCLIPModel` for HF directories."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from cn_clip.clip.model import CLIP
from cn_clip.clip.utils import image_transform
from PIL import Image
from safetensors.torch import save_file
from transformers import ChineseCLIPConfig, ChineseCLIPModel, ChineseCLIPProcessor

from chinese_clip import convert
from chinese_clip.checkpoints import (export_cn_clip, export_hf, init_text_tower, init_vision_tower, load_for_export,
                                      load_pretrained, save_pretrained)
from chinese_clip.config import CLIP_STD, Config, ModelConfig, TextConfig, VisionConfig, save_config
from chinese_clip.model import ChineseCLIP
from chinese_clip.tokenizer import load_tokenizer
from tests.conftest import EVALUATE, ROOT, write_retrieval_set
from tests.tolerances import FEATURES

TEXTS = ["一只橘色的猫", "红色的三角形在蓝色背景上", "A photo of 长城 2024!", ""]
TINY_CN_CLIP = dict(  # heads = width / 64, as cn_clip's own configs have them
    embed_dim=24, image_resolution=32, vision_layers=2, vision_width=128, vision_patch_size=8, vocab_size=21128,
    text_attention_probs_dropout_prob=0.0, text_hidden_act="gelu", text_hidden_dropout_prob=0.0, text_hidden_size=128,
    text_initializer_range=0.02, text_intermediate_size=256, text_max_position_embeddings=64,
    text_num_attention_heads=2, text_num_hidden_layers=2, text_type_vocab_size=2)
OURS = ModelConfig(  # 32-wide heads, where cn_clip's configs would assume 64
    embed_dim=16, vision=VisionConfig(image_size=32, patch_size=8, width=128, layers=2, heads=4),
    text=TextConfig(vocab_size=21128, hidden_size=128, layers=2, heads=4, intermediate_size=256,
                    max_position_embeddings=64, dropout=0.0))
TINY_HF = dict(
    projection_dim=24,
    text_config=dict(vocab_size=21128, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                     max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    vision_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, image_size=32,
                       patch_size=8, projection_dim=24))


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Every weight moved off its init, so that a swapped bias, norm or q/k/v chunk changes the features."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def inputs():
    tokens = load_tokenizer()(TEXTS, 52)
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return pixels, tokens["input_ids"], tokens["attention_mask"]


@pytest.fixture(scope="module")
def cn_clip_model():
    return perturbed(CLIP(**TINY_CN_CLIP).float())


def cn_clip_features(model: CLIP, pixels, input_ids):
    with torch.no_grad():
        return F.normalize(model.encode_image(pixels), dim=-1), F.normalize(model.encode_text(input_ids), dim=-1)


def hf_features(model: ChineseCLIPModel, pixels, input_ids, attention_mask):
    with torch.no_grad():
        image = model.get_image_features(pixel_values=pixels)
        text = model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
    # transformers 5 returns the projected features as the output's pooler_output
    image, text = (getattr(x, "pooler_output", x) for x in (image, text))
    return F.normalize(image, dim=-1), F.normalize(text, dim=-1)


def ours_features(model: ChineseCLIP, pixels, input_ids, attention_mask):
    with torch.no_grad():
        return model.encode_image(pixels), model.encode_text(input_ids, attention_mask)


def assert_same_features(a, b):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=FEATURES, rtol=0)


@pytest.mark.parametrize("prefix", ["module.", ""])
def test_a_cn_clip_checkpoint_loads_to_cn_clips_features(cn_clip_model, inputs, tmp_path, prefix):
    pixels, input_ids, attention_mask = inputs
    path = tmp_path / "epoch_latest.pt"
    state = {f"{prefix}{name}": value for name, value in cn_clip_model.state_dict().items()}
    torch.save({"epoch": 3, "step": 120, "name": "muge_finetune", "state_dict": state}, path)
    ours = load_pretrained(path).eval()
    assert (ours.cfg.vision.heads, ours.cfg.text.heads, ours.cfg.embed_dim) == (2, 2, 24)
    assert_same_features(ours_features(ours, *inputs), cn_clip_features(cn_clip_model, pixels, input_ids))
    assert torch.equal(ours.logit_scale, cn_clip_model.logit_scale.reshape(1))


def test_an_hf_directory_loads_to_transformers_features(inputs, tmp_path):
    hf = perturbed(ChineseCLIPModel(ChineseCLIPConfig(**TINY_HF)))
    hf.save_pretrained(tmp_path / "hf")
    ours = load_pretrained(tmp_path / "hf").eval()
    assert (ours.cfg.vision.heads, ours.cfg.text.heads) == (4, 2)
    assert_same_features(ours_features(ours, *inputs), hf_features(hf, *inputs))
    # the older pytorch_model.bin layout, with the index buffers older transformers saved
    weights = {**hf.state_dict(), "text_model.embeddings.position_ids": torch.arange(64)[None]}
    (tmp_path / "bin").mkdir()
    (tmp_path / "hf" / "config.json").rename(tmp_path / "bin" / "config.json")
    torch.save(weights, tmp_path / "bin" / "pytorch_model.bin")
    assert_same_features(ours_features(load_pretrained(tmp_path / "bin").eval(), *inputs), hf_features(hf, *inputs))


@pytest.fixture(scope="module")
def ours():
    torch.manual_seed(0)
    return perturbed(ChineseCLIP(OURS))


def test_export_hf_loads_in_transformers_with_the_same_features(ours, inputs, tmp_path):
    export_hf(ours, tmp_path)
    hf = ChineseCLIPModel.from_pretrained(tmp_path).eval()
    assert_same_features(hf_features(hf, *inputs), ours_features(ours, *inputs))
    assert torch.equal(hf.logit_scale.reshape(1), ours.logit_scale)
    assert_same_features(ours_features(load_pretrained(tmp_path).eval(), *inputs), ours_features(ours, *inputs))


def test_a_model_directory_loads_in_transformers_and_keeps_a_trained_logit_bias(ours, inputs, tmp_path):
    """A model directory of ours is an HF directory: transformers loads it with no key missing. `ours` has
    a trained bias (as SigLIP leaves it), which transformers' model lacks: transformers names it as the
    one unexpected key, and load_pretrained restores it. A bias still at its initial value (InfoNCE's)
    is not written at all."""
    save_pretrained(ours.state_dict(), Config(model=OURS), tmp_path / "siglip")
    hf, info = ChineseCLIPModel.from_pretrained(tmp_path / "siglip", output_loading_info=True)
    assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == (set(), {"logit_bias"}, set())
    assert_same_features(hf_features(hf.eval(), *inputs), ours_features(ours, *inputs))
    loaded = load_pretrained(tmp_path / "siglip").eval()
    assert torch.equal(loaded.logit_bias, ours.logit_bias) and torch.equal(loaded.logit_scale, ours.logit_scale)
    assert_same_features(ours_features(loaded, *inputs), ours_features(ours, *inputs))

    clip = {**ours.state_dict(), "logit_bias": ChineseCLIP(OURS).logit_bias.detach()}
    save_pretrained(clip, Config(model=OURS), tmp_path / "clip")
    _, info = ChineseCLIPModel.from_pretrained(tmp_path / "clip", output_loading_info=True)
    assert (info["missing_keys"], info["unexpected_keys"]) == (set(), set())
    assert torch.equal(load_pretrained(tmp_path / "clip").logit_bias, clip["logit_bias"])


def test_a_model_directory_in_the_first_layout_still_loads(ours, inputs, tmp_path):
    """Model directories were first written with our own names in model.safetensors (no config.json)."""
    save_config(Config(model=OURS), tmp_path / "config.yaml")
    save_file({name: value.contiguous() for name, value in ours.state_dict().items()}, tmp_path / "model.safetensors")
    loaded = load_pretrained(tmp_path).eval()
    assert all(torch.equal(value, ours.state_dict()[name]) for name, value in loaded.state_dict().items())
    assert_same_features(ours_features(loaded, *inputs), ours_features(ours, *inputs))


def test_the_exported_processor_tokenizes_and_resizes_as_chinese_clip(ours, tmp_path):
    export_hf(ours, tmp_path)
    processor = ChineseCLIPProcessor.from_pretrained(tmp_path)
    image = Image.fromarray(torch.randint(0, 256, (40, 90, 3), dtype=torch.uint8).numpy())  # not square: no crop
    batch = processor(text=TEXTS, images=[image], padding="max_length", max_length=52, return_tensors="pt")
    assert torch.equal(batch["input_ids"], load_tokenizer()(TEXTS, 52)["input_ids"])
    reference = image_transform(32)(image)  # cn_clip's own: PIL bicubic to the square, CLIP mean/std
    # transformers' default backend resizes in torchvision: within one grey level of PIL's rounding
    one_level = 1 / 255 / min(CLIP_STD) + 1e-6
    assert (batch["pixel_values"][0] - reference).abs().max() <= one_level
    # with PIL, the same resize: only the normalisation's arithmetic may round otherwise (measured: equal)
    pil = ChineseCLIPProcessor.from_pretrained(tmp_path, backend="pil")
    torch.testing.assert_close(pil(images=[image], return_tensors="pt")["pixel_values"][0], reference, atol=1e-6, rtol=0)


def test_export_cn_clip_loads_in_cn_clip_with_the_same_features(ours, inputs, tmp_path):
    path = export_cn_clip(ours, tmp_path / "ours.pt")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert all(name.startswith("module.") for name in checkpoint["state_dict"])
    theirs = CLIP(**checkpoint["model_info"]).float()
    # what cn_clip.clip.utils.create_model does with a `module.` checkpoint, strict
    theirs.load_state_dict({name.removeprefix("module."): value for name, value in checkpoint["state_dict"].items()})
    pixels, input_ids, _ = inputs
    assert_same_features(cn_clip_features(theirs.eval(), pixels, input_ids), ours_features(ours, *inputs))
    assert_same_features(ours_features(load_pretrained(path).eval(), *inputs), ours_features(ours, *inputs))


def test_released_names_give_their_head_counts():
    assert convert.cn_clip_named_heads("ViT-B-16") == (12, 12)
    assert convert.cn_clip_named_heads("ViT-H-14") == (16, 16)  # 80-wide vision heads
    assert convert.cn_clip_named_heads("ViT-L-14@RBT3-chinese") == (16, 12)
    with pytest.raises(ValueError, match="unknown Chinese-CLIP model name 'ViT-X'"):
        convert.cn_clip_named_heads("ViT-X")
    with pytest.raises(ValueError, match="ResNet vision towers are not supported"):
        convert.cn_clip_named_heads("RN50")


def test_a_vit_h_shaped_state_dict_gets_80_wide_heads():
    weights = {"visual.class_embedding": torch.empty(1280), "visual.conv1.weight": torch.empty(1280, 3, 14, 14),
               "visual.positional_embedding": torch.empty(257, 1280), "visual.proj": torch.empty(1280, 1024),
               "visual.transformer.resblocks.0.mlp.c_fc.weight": torch.empty(5120, 1280),
               "visual.transformer.resblocks.31.ln_1.weight": torch.empty(1280),
               "bert.embeddings.word_embeddings.weight": torch.empty(21128, 1024),
               "bert.embeddings.position_embeddings.weight": torch.empty(512, 1024),
               "bert.embeddings.token_type_embeddings.weight": torch.empty(2, 1024),
               "bert.encoder.layer.0.intermediate.dense.weight": torch.empty(4096, 1024),
               "bert.encoder.layer.23.output.dense.bias": torch.empty(1024)}
    cfg = convert.cn_clip_model_config(weights)
    assert (cfg.vision.image_size, cfg.vision.layers, cfg.vision.heads, cfg.text.layers, cfg.text.heads) == (224, 32, 16, 24, 16)


def test_bad_files_get_one_line_naming_the_file_and_what_was_expected(cn_clip_model, tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"state_dict": cn_clip_model.state_dict()}, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"truncated.pt: not a readable PyTorch checkpoint \(truncated or corrupt\?\)"):
        load_pretrained(truncated)
    other = tmp_path / "other.pt"
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, other)
    with pytest.raises(ValueError, match="other.pt: not a Chinese-CLIP ViT checkpoint: no visual.class_embedding"):
        load_pretrained(other)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty: no config.yaml \(a model directory of ours\) or config.json"):
        load_pretrained(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="missing.pt: no such file"):
        load_pretrained(tmp_path / "missing.pt")


def broken_model_dir(path: Path, weights: bytes) -> Path:
    """A model directory of ours whose model.safetensors holds `weights` (not a safetensors file)."""
    path.mkdir()
    save_config(Config(model=OURS), path / "config.yaml")
    (path / "model.safetensors").write_bytes(weights)
    return path


def test_corrupt_weights_and_pt_files_that_hold_no_checkpoint_get_one_line(cn_clip_model, tmp_path):
    readable = r"model.safetensors: not a readable safetensors file \(truncated or corrupt\?\): [^\n]*$"
    with pytest.raises(ValueError, match=f"ours/{readable}"):
        load_pretrained(broken_model_dir(tmp_path / "ours", bytes(range(256)) * 4))
    hf = tmp_path / "hf"
    ChineseCLIPModel(ChineseCLIPConfig(**TINY_HF)).save_pretrained(hf)
    whole = (hf / "model.safetensors").read_bytes()
    (hf / "model.safetensors").write_bytes(whole[:len(whole) // 2])
    with pytest.raises(ValueError, match=f"hf/{readable}"):
        load_for_export(hf)

    for name, content, problem in [
            ("int_keys.pt", {101: 1}, "not a Chinese-CLIP ViT checkpoint: no visual.class_embedding"),
            ("tensor.pt", torch.zeros(3), r"not a model checkpoint: expected a dict of tensors by name \(or a dict "
                                          r"holding one under state_dict\), got Tensor$"),
            ("info.pt", {"state_dict": cn_clip_model.state_dict(), "model_info": {"vision_width": 128}},
             r"its model_info is not a cn_clip model config \(vision_width, ")]:
        torch.save(content, tmp_path / name)
        with pytest.raises(ValueError, match=f"{name}: {problem}"):
            load_pretrained(tmp_path / name)
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "pytorch_model.bin").write_bytes((tmp_path / "int_keys.pt").read_bytes())
    (tmp_path / "bert" / "config.json").write_text(json.dumps(TINY_HF))
    with pytest.raises(ValueError, match="pytorch_model.bin: not ChineseCLIPModel weights: no visual_projection.weight, "
                                         "text_projection.weight, logit_scale$"):
        load_pretrained(tmp_path / "bert")


def test_the_recipes_say_a_model_is_broken_in_one_line(tmp_path, in_process):
    broken = broken_model_dir(tmp_path / "broken", b"\x08" + bytes(100))
    result = in_process(str(ROOT / "recipes" / "predict.py"), "classify", "--model", str(broken), str(tmp_path),
                        "--labels", "猫,狗")
    one_line = f"error: {broken / 'model.safetensors'}: not a readable safetensors file (truncated or corrupt?): "
    assert result.returncode == 1 and result.stderr.startswith(one_line) and result.stderr.count("\n") == 1
    result = in_process(EVALUATE, "--model", str(broken), "--retrieval", str(write_retrieval_set(tmp_path / "MUGE")),
                        "--out", str(tmp_path / "out"))
    assert result.returncode == 1 and result.stderr.startswith(one_line) and result.stderr.count("\n") == 1


def test_a_bert_wider_than_its_config_is_named(tmp_path):
    hf = ChineseCLIPModel(ChineseCLIPConfig(**TINY_HF))
    hf.save_pretrained(tmp_path)
    narrower = {**TINY_HF, "text_config": {**TINY_HF["text_config"], "hidden_size": 32}}
    ChineseCLIPConfig(**narrower).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"model.safetensors: text.embeddings.word_embeddings.weight has shape "
                                         r"\(21128, 64\), the config gives \(21128, 32\)"):
        load_pretrained(tmp_path)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("torchscript", [False, True], ids=["state dict", "TorchScript as OpenAI releases"])
def test_the_vision_tower_starts_from_an_open_clip_state_dict_with_open_clips_features(tmp_path, torchscript):
    from open_clip.model import CLIP as OpenCLIP, CLIPTextCfg, CLIPVisionCfg

    reference = perturbed(OpenCLIP(16, CLIPVisionCfg(layers=2, width=128, head_width=32, patch_size=8, image_size=32),
                                   CLIPTextCfg(context_length=8, vocab_size=100, width=64, heads=1, layers=1),
                                   quick_gelu=True))
    if torchscript:
        example = (torch.randn(1, 3, 32, 32), torch.randint(0, 100, (1, 8)))
        torch.jit.save(torch.jit.trace(reference, example, strict=False, check_trace=False), tmp_path / "open_clip.pt")
    else:
        torch.save({"state_dict": reference.state_dict()}, tmp_path / "open_clip.pt")
    torch.manual_seed(0)
    ours = ChineseCLIP(OURS).eval()
    text_before = {n: v.clone() for n, v in ours.text.state_dict().items()}
    assert init_vision_tower(ours, tmp_path / "open_clip.pt") == []
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(pixels), F.normalize(reference.encode_image(pixels), dim=-1),
                                   atol=FEATURES, rtol=0)
    assert all(torch.equal(v, text_before[n]) for n, v in ours.text.state_dict().items())


def test_the_vision_tower_starts_from_a_timm_checkpoint_and_names_what_it_left(tmp_path):
    torch.manual_seed(1)
    source = ChineseCLIP(OURS).visual.state_dict()
    from safetensors.torch import save_file
    save_file({**source, "head.weight": torch.zeros(10, 128), "head.bias": torch.zeros(10)}, tmp_path / "vit.safetensors")
    ours = ChineseCLIP(OURS)
    projection = ours.visual_projection.weight.clone()
    assert init_vision_tower(ours, tmp_path / "vit.safetensors") == ["head.weight (an image classifier, not a CLIP projection)"]
    assert all(torch.equal(v, source[n]) for n, v in ours.visual.state_dict().items())
    assert torch.equal(ours.visual_projection.weight, projection)
    narrow = ChineseCLIP(dataclasses.replace(OURS, vision=dataclasses.replace(OURS.vision, width=64, heads=2)))
    with pytest.raises(ValueError, match=r"vit.safetensors: visual.cls_token has shape \(1, 1, 128\), the model's is \(1, 1, 64\)"):
        init_vision_tower(narrow, tmp_path / "vit.safetensors")


def test_the_text_tower_starts_from_an_hf_bert_directory(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    t = OURS.text
    mlm = perturbed(BertForMaskedLM(BertConfig(vocab_size=t.vocab_size, hidden_size=t.hidden_size, num_hidden_layers=t.layers,
                                               num_attention_heads=t.heads, intermediate_size=t.intermediate_size,
                                               max_position_embeddings=t.max_position_embeddings)))
    mlm.save_pretrained(tmp_path / "bert")
    ours = ChineseCLIP(OURS)
    unused = init_text_tower(ours, tmp_path / "bert")
    assert unused and all(name.startswith("cls.") for name in unused), unused
    source = mlm.bert.state_dict()
    assert all(torch.equal(v, source[n]) for n, v in ours.text.state_dict().items())
    wider = ChineseCLIP(dataclasses.replace(OURS, text=dataclasses.replace(t, hidden_size=256, intermediate_size=512)))
    with pytest.raises(ValueError, match=r"bert: text.embeddings.word_embeddings.weight has shape \(21128, 128\), "
                                         r"the model's is \(21128, 256\)"):
        init_text_tower(wider, tmp_path / "bert")
    with pytest.raises(ValueError, match="no config.json; expected an HF BERT directory"):
        init_text_tower(ours, tmp_path)
