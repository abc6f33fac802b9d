"""Accelerate launcher YAMLs: each parses as `accelerate launch` would read it, and the FSDP ones give
the settings the FSDP2 engine takes."""
from pathlib import Path

import pytest
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.launch import prepare_multi_gpu_env
from torch.distributed.fsdp import OffloadPolicy

from chinese_clip.runtime import launched_engine
from tests.conftest import ROOT

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


@pytest.mark.parametrize("path", [p for p in LAUNCHERS if "fsdp" in p.stem], ids=lambda p: p.stem)
def test_fsdp_launchers_ask_for_fsdp2_as_the_engine_reads_it(path, monkeypatch):
    # Accelerate refuses to prepare a main node whose port (29500 in multinode_fsdp.yaml) is taken on
    # this host: that asks the machine, not the YAML, and failed whenever another test's process held it.
    monkeypatch.setattr("accelerate.utils.launch.is_port_in_use", lambda port: False)
    for key, value in prepare_multi_gpu_env(_launch_args(path)).items():
        if key.startswith(("FSDP_", "ACCELERATE_USE_")):
            monkeypatch.setenv(key, value)
    assert launched_engine() == "fsdp"
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert type(plugin.cpu_offload) is OffloadPolicy and not plugin.activation_checkpointing
