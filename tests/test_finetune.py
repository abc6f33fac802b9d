"""recipes/finetune.py: a tiny checkpoint in Chinese-CLIP's own .pt format, written by cn_clip's `CLIP`,
fine-tuned in stages on the synthetic data by 2 processes under DeepSpeed ZeRO-2."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cn_clip.clip.model import CLIP
from safetensors.torch import load_file

from chinese_clip import convert
from chinese_clip.checkpoints import load_pretrained
from chinese_clip.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
FINETUNE = str(ROOT / "recipes" / "finetune.py")
TINY_CN_CLIP = dict(  # the tiny preset's shape, with the 64-wide heads cn_clip assumes
    embed_dim=128, image_resolution=64, vision_layers=4, vision_width=128, vision_patch_size=16, vocab_size=21128,
    text_attention_probs_dropout_prob=0.0, text_hidden_act="gelu", text_hidden_dropout_prob=0.0, text_hidden_size=128,
    text_initializer_range=0.02, text_intermediate_size=512, text_max_position_embeddings=64,
    text_num_attention_heads=2, text_num_hidden_layers=2, text_type_vocab_size=2)
QUICK = ["data.num_workers=0", "data.synthetic.val_size=256", "eval.batch_size=128", "train.log_every=10"]


def cn_clip_checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    model = CLIP(**TINY_CN_CLIP).float()
    state = {f"module.{name}": value for name, value in model.state_dict().items()}
    torch.save({"epoch": 1, "step": 100, "name": "tiny", "state_dict": state}, path)
    return path


@pytest.mark.slow
def test_finetuning_a_cn_clip_checkpoint_on_two_zero2_processes_improves_it(tmp_path):
    pretrained = cn_clip_checkpoint(tmp_path / "tiny.pt")
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2",
               "--main_process_port", str(free_port()), "--use_deepspeed", "--deepspeed_config_file",
               str(ROOT / "ds_configs" / "zero2.json"), FINETUNE, "--pretrained", str(pretrained),
               f"run.output_dir={run_dir}", "data.batch_size=32", *QUICK]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "init: all" in result.stdout and str(pretrained) in result.stdout

    scores = json.loads((run_dir / "eval.json").read_text())
    before, after = scores["before"]["val"]["top1"], scores["after"]["val"]["top1"]
    assert after >= before + 15, (before, after)

    # the run is the checkpoint's architecture and starts from its weights; the text stage leaves
    # the image tower as released, bit for bit
    released = convert.from_cn_clip(
        {k.removeprefix("module."): v for k, v in torch.load(pretrained, weights_only=True)["state_dict"].items()},
        load_pretrained(pretrained).visual)
    start, after_text = (load_file(run_dir / "stages" / name) for name in ("0-text.safetensors", "1-full.safetensors"))
    for name, value in released.items():
        assert torch.equal(start[name], value), name
        if name.startswith("visual"):
            assert torch.equal(after_text[name], value), name
    final = load_pretrained(run_dir / "model")
    assert final.cfg.vision.width == 128 and final.cfg.text.heads == 2
    assert not torch.equal(final.state_dict()["visual.blocks.0.attn.qkv.weight"], released["visual.blocks.0.attn.qkv.weight"])


def test_a_missing_or_broken_pretrained_model_is_one_line(tmp_path):
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    for path, message in [(tmp_path / "missing.pt", "no such file or directory"),
                          (tmp_path / "broken.pt", "not a readable PyTorch checkpoint")]:
        result = subprocess.run([sys.executable, FINETUNE, "--pretrained", str(path), f"run.output_dir={tmp_path / 'run'}"],
                                capture_output=True, text=True, cwd=ROOT)
        assert result.returncode == 2
        assert result.stderr.strip().splitlines()[-1].startswith(f"error: init.pretrained: {path}: {message}"), result.stderr


def test_pretraining_starts_its_towers_from_timm_and_hf_bert_files(tmp_path):
    """init.vision and init.text through recipes/pretrain.py: the run's starting weights are the files'."""
    from safetensors.torch import save_file
    from transformers import BertConfig, BertModel

    from chinese_clip.config import load_config
    from chinese_clip.model import ChineseCLIP

    tiny = load_config(ROOT / "recipes" / "configs" / "tiny_synthetic.yaml").model
    torch.manual_seed(3)
    vision = ChineseCLIP(tiny).visual.state_dict()
    save_file({**vision, "head.weight": torch.zeros(10, 128), "head.bias": torch.zeros(10)}, tmp_path / "vit.safetensors")
    t = tiny.text
    bert = BertModel(BertConfig(vocab_size=t.vocab_size, hidden_size=t.hidden_size, num_hidden_layers=t.layers,
                                num_attention_heads=t.heads, intermediate_size=t.intermediate_size,
                                max_position_embeddings=t.max_position_embeddings))
    bert.save_pretrained(tmp_path / "bert")
    result = subprocess.run([sys.executable, str(ROOT / "recipes" / "pretrain.py"), "train.steps=2",
                             f"init.vision={tmp_path / 'vit.safetensors'}", f"init.text={tmp_path / 'bert'}",
                             f"run.output_dir={tmp_path / 'run'}", "eval.at_start=false", "eval.at_end=false",
                             "data.batch_size=8", *QUICK], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(not used: head.weight (an image classifier, not a CLIP projection))" in result.stdout
    start = load_file(tmp_path / "run" / "stages" / "0-train.safetensors")
    assert all(torch.equal(start[f"visual.{name}"], value) for name, value in vision.items())
    assert all(torch.equal(start[f"text.{name}"], value) for name, value in bert.state_dict().items()
               if not name.startswith("pooler."))
    assert "(not used: pooler.dense.bias, pooler.dense.weight)" in result.stdout  # CLIP reads [CLS], not the pooler


def test_the_muge_preset_fine_tunes_a_cn_clip_checkpoint_on_shards_of_chinese_clips_layout(tmp_path):
    """The preset as shipped, on a tiny generated dataset in MUGE's layout (several images per query)
    turned into shards, shortened to 3 steps: the data path a user runs, end to end."""
    import base64

    from chinese_clip.data.images import encode_jpeg
    from chinese_clip.data.synthetic import SyntheticShapes

    raw = tmp_path / "datasets" / "MUGE"
    raw.mkdir(parents=True)
    images = SyntheticShapes("train", 24, 64)
    (raw / "train_imgs.tsv").write_text("".join(f"{i}\t{base64.urlsafe_b64encode(encode_jpeg(images[i]['image'])).decode()}\n"
                                                for i in range(24)))
    (raw / "train_texts.jsonl").write_text("".join(
        json.dumps({"text_id": q, "text": images[2 * q]["text"], "image_ids": [2 * q, 2 * q + 1]}, ensure_ascii=False)
        + "\n" for q in range(12)), encoding="utf-8")
    for kind in ("imgs.tsv", "texts.jsonl"):  # the valid split the preset evaluates: the same pairs, here
        shutil.copy(raw / f"train_{kind}", raw / f"valid_{kind}")
    shards = tmp_path / "shards"
    build = subprocess.run([sys.executable, str(ROOT / "data_tools" / "build_shards.py"), str(raw), "--out", str(shards),
                            "--rows-per-shard", "6", "--workers", "1"], capture_output=True, text=True, cwd=ROOT)
    assert build.returncode == 0 and "written to shards                       24" in build.stdout, build.stdout
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, FINETUNE, "--pretrained", str(cn_clip_checkpoint(tmp_path / "tiny.pt")),
                             "--config", str(ROOT / "recipes" / "configs" / "muge_vit_b16_finetune.yaml"),
                             f"data.shards=[{{path: {shards}}}]", "stages.0.samples=24", "data.batch_size=8",
                             "data.num_workers=2", "train.log_every=1", f"run.output_dir={run_dir}"],
                            capture_output=True, text=True, cwd=ROOT, timeout=600,
                            env={**os.environ, "DATAPATH": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["data/samples_read"] for m in logged if "train/loss" in m] == [8, 16, 24]
    assert load_pretrained(run_dir / "model").cfg.vision.image_size == 64
    scores = json.loads((run_dir / "eval.json").read_text())
    assert (scores["before"]["MUGE"]["texts"], scores["after"]["MUGE"]["images"]) == (12, 24)
    assert scores["best"]["metric"] == "MUGE/t2i_mean_recall" and (run_dir / "best" / "best.json").is_file()
