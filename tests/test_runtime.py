"""The DeepSpeed config takes what the run config owns; contradictions and split-brain launches stop the run."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from accelerate.utils import DistributedType

from chinese_clip.config import ConfigError, load_config
from chinese_clip.runtime import check_world_size, configure_deepspeed

ROOT = Path(__file__).resolve().parents[1]


def _accelerator(ds_config: dict, num_processes: int = 2):
    plugin = SimpleNamespace(deepspeed_config=ds_config)
    return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin), num_processes=num_processes)


@pytest.mark.parametrize("name", ["zero1", "zero2", "zero3", "zero3_offload"])
def test_shipped_configs_get_their_auto_values_filled(name, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)  # offload is a GPU-only path
    ds = json.loads((ROOT / "ds_configs" / f"{name}.json").read_text())
    configure_deepspeed(_accelerator(ds), load_config(None, ["data.batch_size=16", "optim.grad_clip=0.5"]))
    assert ds["train_micro_batch_size_per_gpu"] == 16 and ds["train_batch_size"] == 32
    assert ds["gradient_accumulation_steps"] == 1 and ds["gradient_clipping"] == 0.5
    if ds["zero_optimization"]["stage"] == 3:
        assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


@pytest.mark.parametrize("ds, message", [
    ({"train_micro_batch_size_per_gpu": 7}, "train_micro_batch_size_per_gpu is 7 but data.batch_size gives 16"),
    ({"train_batch_size": 64}, "train_batch_size is 64 but data.batch_size x 2 processes gives 32"),
    ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps is 4"),
    ({"gradient_clipping": 5.0}, "gradient_clipping is 5.0 but optim.grad_clip gives 1.0"),
    ({"optimizer": {"type": "Adam"}}, "remove the \"optimizer\" section"),
    ({"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": False}},
     "stage3_gather_16bit_weights_on_model_save is false"),
])
def test_contradictions_are_one_line_errors(ds, message):
    with pytest.raises(ConfigError) as e:
        configure_deepspeed(_accelerator(ds), load_config(None, ["data.batch_size=16"]))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_offload_without_a_gpu_is_refused():
    ds = json.loads((ROOT / "ds_configs" / "zero3_offload.json").read_text())
    with pytest.raises(ConfigError, match="ZeRO-Offload needs a GPU"):
        configure_deepspeed(_accelerator(ds), load_config(None))


def test_the_gradient_cache_needs_a_zero_stage_that_can_hold_gradients():
    with pytest.raises(ConfigError, match="train.accum_freq > 1 under DeepSpeed needs ZeRO stage 1, 2 or 3"):
        configure_deepspeed(_accelerator({"zero_optimization": {"stage": 0}}), load_config(None, ["train.accum_freq=2"]))
    configure_deepspeed(_accelerator({"zero_optimization": {"stage": 2}}), load_config(None, ["train.accum_freq=2"]))


def test_no_deepspeed_is_left_alone():
    configure_deepspeed(SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=None)), load_config(None))


def test_processes_that_train_apart_are_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="2 processes were launched but Accelerate runs 1 "):
        check_world_size(SimpleNamespace(num_processes=1, distributed_type=DistributedType.DEEPSPEED))
    # A process group without data parallelism (seen with --multi_gpu on a CPU machine): no gradient averaging.
    with pytest.raises(RuntimeError, match="each would train alone"):
        check_world_size(SimpleNamespace(num_processes=2, distributed_type=DistributedType.NO))
    check_world_size(SimpleNamespace(num_processes=2, distributed_type=DistributedType.MULTI_CPU))
    monkeypatch.delenv("WORLD_SIZE")
    check_world_size(SimpleNamespace(num_processes=1, distributed_type=DistributedType.NO))
