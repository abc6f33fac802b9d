"""The launch's engine takes what the run config owns; contradictions, launches that would not shard
and split-brain launches stop the run with one line."""
import json
import re
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

from chinese_clip.config import ConfigError, load_config
from chinese_clip.engine.fsdp import FullyShard
from chinese_clip.engine.zero import configure
from chinese_clip.runtime import check_world_size, eval_autocast, launched_engine, speed_summary
from tests.conftest import ROOT


@pytest.mark.parametrize("name", ["zero1", "zero2", "zero3", "zero3_offload"])
def test_shipped_configs_get_their_auto_values_filled(name, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)  # offload is a GPU-only path
    ds = json.loads((ROOT / "ds_configs" / f"{name}.json").read_text())
    configure(ds, load_config(None, ["data.batch_size=16", "optim.grad_clip=0.5"]), processes=2)
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
        configure(ds, load_config(None, ["data.batch_size=16"]), processes=2)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_offload_without_a_gpu_is_refused():
    ds = json.loads((ROOT / "ds_configs" / "zero3_offload.json").read_text())
    with pytest.raises(ConfigError, match="ZeRO-Offload needs a GPU"):
        configure(ds, load_config(None), processes=2)


def test_the_gradient_cache_needs_a_zero_stage_that_can_hold_gradients():
    with pytest.raises(ConfigError, match="train.accum_freq > 1 under DeepSpeed needs ZeRO stage 1, 2 or 3"):
        configure({"zero_optimization": {"stage": 0}}, load_config(None, ["train.accum_freq=2"]), processes=2)
    configure({"zero_optimization": {"stage": 2}}, load_config(None, ["train.accum_freq=2"]), processes=2)


@pytest.mark.parametrize("env, overrides, processes, message", [
    ({"FSDP_VERSION": "1"}, [], 2, "fsdp_version is 1: this recipe shards with FSDP2 (fully_shard); set fsdp_version: 2"),
    ({}, [], 1, "FSDP over one process shards nothing"),
    ({"FSDP_ACTIVATION_CHECKPOINTING": "true"}, [], 2,
     "fsdp_activation_checkpointing is true but model.grad_checkpointing is false"),
    ({}, ["train.mixed_precision=fp16"], 2, "train.mixed_precision=fp16 under FSDP: use bf16"),
])
def test_an_fsdp_launch_that_would_not_shard_as_asked_is_one_line(monkeypatch, env, overrides, processes, message):
    for key, value in {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", **env}.items():
        monkeypatch.setenv(key, value)
    assert launched_engine() == "fsdp"
    accelerator = SimpleNamespace(num_processes=processes, device=torch.device("cpu"))
    with pytest.raises(ConfigError) as e:
        FullyShard(accelerator, load_config(None, overrides))
    assert message in str(e.value) and "\n" not in str(e.value)


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


@pytest.mark.parametrize("gpu, expected", [
    (None, "fused AdamW off, TF32 off, pinned memory off, prefetch 2 batches per worker, evaluation fp32"),
    ((8, 0), "fused AdamW on, TF32 on, pinned memory on, prefetch 4 batches per worker, evaluation bf16"),
    ((7, 0), "fused AdamW on, TF32 off, pinned memory on, prefetch 4 batches per worker, evaluation fp32"),
])
def test_speed_settings_resolve_auto_for_the_machine(gpu, expected, monkeypatch):
    """`auto`: the GPU input path and kernels on CUDA (TF32 and bf16 from Ampere, compute capability 8)."""
    if gpu is not None:
        monkeypatch.setattr("torch.cuda.is_available", lambda: True)
        monkeypatch.setattr("torch.cuda.get_device_capability", lambda *_: gpu)
        monkeypatch.setattr("torch.cuda.is_bf16_supported", lambda *_: gpu >= (8, 0))
    assert speed_summary(load_config(None)) == expected
    chosen = load_config(None, ["optim.fused=false", "train.tf32=false", "data.pin_memory=false",
                                "data.prefetch_factor=3", "eval.mixed_precision=no"])
    assert speed_summary(chosen) == ("fused AdamW off, TF32 off, pinned memory off, prefetch 3 batches per worker, "
                                     "evaluation fp32")


@pytest.mark.parametrize("override, message", [
    ("optim.fused=1", "optim.fused: expected one of 'auto', true, false, got 1"),
    ("data.prefetch_factor=0", "data.prefetch_factor must be at least 1, got 0"),
    ("train.cpu_threads=0", "train.cpu_threads must be at least 1, got 0"),
])
def test_speed_settings_refuse_bad_values(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])


def test_evaluation_autocast_follows_eval_mixed_precision():
    x = torch.randn(4, 4)
    with eval_autocast(load_config(None, ["eval.mixed_precision=bf16"]).eval, torch.device("cpu")):
        assert (x @ x).dtype == torch.bfloat16
    with eval_autocast(load_config(None).eval, torch.device("cpu")):  # auto, without a GPU
        assert (x @ x).dtype == torch.float32
