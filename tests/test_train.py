"""End-to-end runs of recipes/pretrain.py: one process, and 2 CPU processes (gloo) under DeepSpeed ZeRO-2/3 and DDP."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from chinese_clip.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = str(ROOT / "recipes" / "pretrain.py")
# A few steps of the tiny model; warmup short enough that the lr is not ~0 on the compared steps.
SHORT = ["train.steps=6", "train.log_every=1", "optim.warmup_steps=2", "data.num_workers=0",
         "data.synthetic.val_size=48", "eval.at_start=false", "eval.batch_size=16"]


def deepspeed(config: Path) -> list[str]:
    return ["--use_deepspeed", "--deepspeed_config_file", str(config)]


LAUNCHERS = {  # accelerate launch flags for 2 CPU processes
    "zero2 (launcher yaml)": ["--config_file", str(ROOT / "ds_configs" / "accelerate" / "cpu_2proc_zero2.yaml")],
    "zero3": deepspeed(ROOT / "ds_configs" / "zero3.json"),
    "ddp": ["--multi_gpu"],  # on a machine without GPUs: DDP over gloo
}


def run_pretrain(run_dir: Path, overrides: list[str], launcher: list[str] | None = None):
    """One process with launcher None, else `accelerate launch --num_processes 2 <launcher>`."""
    cmd = [sys.executable, PRETRAIN]
    if launcher is not None:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2",
               "--main_process_port", str(free_port()), *launcher, PRETRAIN]
    return subprocess.run(cmd + overrides + [f"run.output_dir={run_dir}"], capture_output=True, text=True,
                          cwd=ROOT, timeout=900)


def run_ok(*args, **kwargs):
    result = run_pretrain(*args, **kwargs)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def losses(run_dir: Path) -> list[float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line["train/loss"] for line in lines if "train/loss" in line]


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single")
    result = run_ok(run_dir, SHORT + ["data.batch_size=32"])
    return run_dir, result


def test_a_run_leaves_everything_a_user_needs(single_process_run):
    run_dir, result = single_process_run
    assert len(losses(run_dir)) == 6
    assert (run_dir / "config.yaml").is_file() and (run_dir / "checkpoints" / "step_6").is_dir()
    assert any((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    weights = load_file(run_dir / "model" / "model.safetensors")
    assert weights["logit_scale"].shape == (1,) and "text_projection.weight" in weights
    assert (run_dir / "model" / "vocab.txt").is_file() and (run_dir / "model" / "config.yaml").is_file()
    results = json.loads((run_dir / "eval.json").read_text())
    assert set(results["after"]) == {"val", "novel"} and results["after"]["val"]["num_images"] == 48
    assert "val top1 (chance 4.2)" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_two_processes_match_one_process(single_process_run, tmp_path, launcher):
    """Same global batch (2 x 16 vs 1 x 32), seed and data: the same losses step for step."""
    reference_dir, _ = single_process_run
    run_ok(tmp_path, SHORT + ["data.batch_size=16"], launcher=LAUNCHERS[launcher])
    ours, reference = losses(tmp_path), losses(reference_dir)
    assert len(ours) == len(reference) == 6
    assert max(abs(a - b) for a, b in zip(ours, reference)) < 1e-4, (ours, reference)
    after = json.loads((tmp_path / "eval.json").read_text())["after"]
    expected = json.loads((reference_dir / "eval.json").read_text())["after"]
    assert after["val"]["num_images"] == 48 and after["val"]["top1"] == expected["val"]["top1"]
    weights = load_file(tmp_path / "model" / "model.safetensors")
    reference_weights = load_file(reference_dir / "model" / "model.safetensors")
    assert weights.keys() == reference_weights.keys()
    for name, value in reference_weights.items():
        assert (weights[name] - value).abs().max() < 1e-4, name


@pytest.mark.slow
def test_a_deepspeed_config_that_contradicts_the_run_config_stops_with_one_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": 7, "zero_optimization": {"stage": 2}}))
    result = run_pretrain(tmp_path / "run", ["data.batch_size=16"], launcher=deepspeed(bad))
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {bad}: train_micro_batch_size_per_gpu is 7 but data.batch_size gives 16; set it to \"auto\""]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_the_default_run_learns(tmp_path):
    """`python recipes/pretrain.py` with no config arguments: the product's first impression."""
    run_ok(tmp_path, [])
    results = json.loads((tmp_path / "eval.json").read_text())
    chance = results["after"]["val"]["chance_top1"]
    assert results["before"]["val"]["top1"] < 2.5 * chance
    assert results["after"]["val"]["top1"] >= 50


LOSS_VARIANTS = {  # name -> (overrides, loss parts it must log)
    "siglip": (["loss.name=siglip"], {"train/loss/siglip"}),
    "clip + triplet": (["loss.triplet_alpha=0.5"], {"train/loss/clip", "train/loss/triplet"}),
    # the same global batch of 64 through the gradient cache
    "clip, gradient cache": (["train.accum_freq=2", "data.batch_size=32"], {"train/loss/clip"}),
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", LOSS_VARIANTS)
def test_each_loss_learns(tmp_path, variant):
    """A short run (global batch 64, 300 steps) of every loss: the loss falls, and zero-shot top-1 on
    held-out images ends well above chance, with the loss parts logged separately."""
    overrides, parts = LOSS_VARIANTS[variant]
    run_ok(tmp_path, ["train.steps=300", "train.log_every=1", "data.batch_size=64", "optim.warmup_steps=30",
                      "eval.at_start=false", "data.synthetic.val_size=256", "data.num_workers=0", *overrides])
    curve = losses(tmp_path)
    assert sum(curve[-5:]) / 5 < 0.8 * sum(curve[:5]) / 5, curve
    after = json.loads((tmp_path / "eval.json").read_text())["after"]["val"]
    assert after["top1"] >= 3 * after["chance_top1"], after
    logged = next(line for line in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
                  if "train/loss" in line)
    assert parts <= logged.keys(), logged
