"""Accelerate launcher YAMLs: each parses as `accelerate launch` would read it; FSDP wraps our layers."""
from pathlib import Path

import pytest
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.launch import prepare_multi_gpu_env
from timm.models.vision_transformer import Block
from transformers.models.bert.modeling_bert import BertLayer

from chinese_clip.config import load_config
from chinese_clip.model import ChineseCLIP

ROOT = Path(__file__).resolve().parents[1]
LAUNCHERS = sorted((ROOT / "ds_configs" / "accelerate").glob("*.yaml"))


def _launch_args(path: Path):
    args = launch_command_parser().parse_args(["--config_file", str(path), "recipes/pretrain.py"])
    args, _, _ = _validate_launch_command(args)
    return args


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.stem)
def test_launchers_parse_and_point_at_existing_deepspeed_configs(path):
    args = _launch_args(path)
    if args.use_deepspeed:
        assert (ROOT / args.deepspeed_config_file).is_file()
    assert args.num_processes >= 2


def test_fsdp_launcher_wraps_each_bert_layer_and_vit_block(monkeypatch):
    env = prepare_multi_gpu_env(_launch_args(ROOT / "ds_configs" / "accelerate" / "fsdp_gpu.yaml"))
    for key, value in env.items():
        if key.startswith(("FSDP_", "ACCELERATE_USE_FSDP")):
            monkeypatch.setenv(key, value)
    # Syncing module states needs a GPU to sync on; everything else is what a GPU launch builds.
    monkeypatch.setenv("FSDP_SYNC_MODULE_STATES", "false")
    plugin = FullyShardedDataParallelPlugin()
    model = ChineseCLIP(load_config(ROOT / "recipes" / "configs" / "tiny_synthetic.yaml").model)
    plugin.set_auto_wrap_policy(model)
    assert plugin.auto_wrap_policy.keywords["transformer_layer_cls"] == {BertLayer, Block}
    assert plugin.use_orig_params, "frozen and trainable parameters share shard units in staged training"
    wrapped = [m for m in model.modules()
               if plugin.auto_wrap_policy(module=m, recurse=False, nonwrapped_numel=0)]
    assert len(wrapped) == model.cfg.vision.layers + model.cfg.text.layers
