"""Staged schedules end to end: what trains in each stage, optimizer state, frozen towers, and runs
killed with SIGKILL (mid-stage and right after a boundary) that resume to the uninterrupted result.

All runs are recipes/pretrain.py on the tiny staged preset, shortened: lit (vision frozen) steps
0-5, flip (everything, mask 0.5, double batch, text embeddings at lr x 0.5) 6-11, unmasked
(mask 0, same trainable set, so the engine is kept) 12-15; a checkpoint every 2 steps.
"""
import contextlib
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from chinese_clip.checkpoints import consolidate, export, load_pretrained
from chinese_clip.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = str(ROOT / "recipes" / "pretrain.py")
STAGED = ["--config", str(ROOT / "recipes" / "configs" / "tiny_staged.yaml"),
          "stages.0.steps=6", "stages.1.steps=6", "stages.2.steps=4", "checkpoint.every_steps=2",
          "checkpoint.keep_last=100", "train.log_every=1", "data.num_workers=0", "data.synthetic.val_size=32",
          "eval.batch_size=16", "eval.at_start=false"]
LIT_FROZEN = re.compile(r"visual(_projection)?\..*|logit_bias")  # the lit stage's rule, and InfoNCE's bias
LAUNCHERS = {
    "zero2": ["--use_deepspeed", "--deepspeed_config_file", str(ROOT / "ds_configs" / "zero2.json")],
    "zero3": ["--use_deepspeed", "--deepspeed_config_file", str(ROOT / "ds_configs" / "zero3.json")],
}


def command(run_dir: Path, launcher: list[str] | None, batch: int) -> list[str]:
    """Per-process batches: `batch` in lit and unmasked, twice that in flip; the same global batches
    for 1 process x 2b and 2 processes x b."""
    prefix = [sys.executable, PRETRAIN]
    if launcher is not None:
        prefix = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2",
                  "--main_process_port", str(free_port()), *launcher, PRETRAIN]
    return prefix + STAGED + [f"data.batch_size={batch}", f"stages.1.batch_size={2 * batch}", f"run.output_dir={run_dir}"]


def run_to_end(cmd: list[str]) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def run_until_checkpoint(cmd: list[str], run_dir: Path, step: int) -> None:
    """Start the run and SIGKILL all its processes the moment checkpoint `step` is complete, like a
    machine going down. The launcher's workers run in their own sessions: kill the whole tree."""
    done = run_dir / "checkpoints" / f"step_{step}" / "trainer_state.json"
    with open(log_of(run_dir), "a") as log:
        process = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while not done.exists():
            assert process.poll() is None, \
                f"the run ended before checkpoint {step}:\n{log_of(run_dir).read_text()[-3000:]}"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        parent = psutil.Process(process.pid)
        tree = [parent, *parent.children(recursive=True)]
        for p in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGKILL)
        _, alive = psutil.wait_procs(tree, timeout=60)
        assert not alive


def log_of(run_dir: Path) -> Path:
    return run_dir.parent / f"{run_dir.name}.log"


def resumed_steps(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"resumed from \S+step_(\d+) ", text)]


def kill_twice_then_finish(cmd: list[str], run_dir: Path) -> None:
    """Killed in the middle of lit, resumed; killed right after the lit -> flip boundary, resumed to the end."""
    run_until_checkpoint(cmd, run_dir, step=2)
    run_until_checkpoint(cmd, run_dir, step=6)
    final = run_to_end(cmd)
    first, second = resumed_steps(log_of(run_dir).read_text()) + resumed_steps(final)
    assert 2 <= first < 6 and 6 <= second < 10, (first, second, log_of(run_dir).read_text()[-3000:])


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def stage_weights(run_dir: Path) -> list[dict[str, torch.Tensor]]:
    return [load_file(run_dir / "stages" / name) for name in ("0-lit.safetensors", "1-flip.safetensors",
                                                             "2-unmasked.safetensors")] + \
        [load_file(run_dir / "model" / "model.safetensors")]


def engine_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """What the engine itself held (no stage weights merged in): the frozen tower as the engine kept it."""
    if (checkpoint / "pytorch_model").is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag="pytorch_model")
    return {k.removeprefix("module."): v for k, v in load_file(checkpoint / "model.safetensors").items()}


def check_stages(run_dir: Path, processes: int, sharded: bool) -> None:
    """Each stage trains exactly its parameters, and the optimizer holds state for those alone."""
    start_lit, start_flip, start_unmasked, final = stage_weights(run_dir)
    names = list(start_lit)
    changed = lambda a, b: {n for n in names if not torch.equal(a[n], b[n])}  # noqa: E731
    assert changed(start_lit, start_flip) == {n for n in names if not LIT_FROZEN.fullmatch(n)}
    assert changed(start_flip, start_unmasked) == changed(start_unmasked, final) == set(names) - {"logit_bias"}
    # the frozen tower, bit for bit, in the engine at the end of lit: never touched
    lit_end = engine_weights(run_dir / "checkpoints" / "step_6")
    for name in names:
        if LIT_FROZEN.fullmatch(name):
            assert torch.equal(lit_end[name], start_lit[name]), name
    # Adam's two moments per trained value, summed over ranks: once (ZeRO shards) or per rank (DDP, 1 process)
    size = lambda keep: sum(start_lit[n].numel() for n in names if keep(n))  # noqa: E731
    trained = {1: size(lambda n: not LIT_FROZEN.fullmatch(n)), 7: size(lambda n: n != "logit_bias")}
    trained[13] = trained[7]
    held = {m["step"]: m["stage/optimizer_state_values"] for m in metrics(run_dir) if "stage/optimizer_state_values" in m}
    for first_step, values in trained.items():
        expected = 2 * values * (1 if sharded else processes)
        # ZeRO pads each partition to a multiple of the world size: at most a few values per tensor
        assert expected <= held[first_step] <= expected + 2 * len(names) * processes, (first_step, held, expected)


def check_resumed_run_matches(resumed: Path, uninterrupted: Path) -> None:
    a, b = load_file(resumed / "model" / "model.safetensors"), load_file(uninterrupted / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] - b[name]).abs().max() <= 1e-5, name
    last = lambda run: max(m["step"] for m in metrics(run))  # noqa: E731
    assert last(resumed) == last(uninterrupted) == 16
    losses = lambda run: {m["step"]: m["train/loss"] for m in metrics(run) if "train/loss" in m}  # noqa: E731
    assert losses(resumed).keys() == losses(uninterrupted).keys() == set(range(1, 17))
    for step, loss in losses(uninterrupted).items():
        assert abs(losses(resumed)[step] - loss) <= 1e-5, step


@pytest.fixture(scope="module")
def single_process_staged(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("staged_single")
    return run_dir, run_to_end(command(run_dir, None, batch=16))


def test_each_stage_trains_its_parameters_and_nothing_else(single_process_staged):
    run_dir, stdout = single_process_staged
    check_stages(run_dir, processes=1, sharded=False)
    starts = [m for m in metrics(run_dir) if "stage/index" in m]
    assert [(m["step"], m["stage/name"], m["stage/mask_ratio"], m["stage/global_batch"]) for m in starts] == [
        (0, "lit", 0.0, 16), (6, "flip", 0.5, 32), (12, "unmasked", 0.0, 16)]
    weights = load_file(run_dir / "model" / "model.safetensors")
    vision = sum(v.numel() for n, v in weights.items() if n.startswith("visual"))
    text = sum(v.numel() for n, v in weights.items() if n.startswith("text"))
    lit, flip, _ = starts
    assert (lit["stage/vision_trained"], lit["stage/vision_frozen"], lit["stage/text_trained"]) == (0, vision, text)
    assert (flip["stage/vision_trained"], flip["stage/text_trained"], flip["stage/logit_frozen"]) == (vision, text, 1)
    assert f"vision              0 of {vision:>13,} parameters train (frozen)" in lit["stage/summary"]
    assert lit["stage/summary"] in stdout


def test_a_killed_run_resumes_to_the_same_weights(single_process_staged, tmp_path):
    reference, _ = single_process_staged
    run_dir = tmp_path / "run"
    kill_twice_then_finish(command(run_dir, None, batch=16), run_dir)
    check_resumed_run_matches(run_dir, reference)


def test_export_of_a_checkpoint_loads_with_the_final_weights(single_process_staged, tmp_path):
    run_dir, _ = single_process_staged
    result = subprocess.run([sys.executable, str(ROOT / "recipes" / "export.py"), str(run_dir), "--out",
                             str(tmp_path / "export")], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert f"exported {run_dir / 'checkpoints' / 'step_16'}" in result.stdout
    model = load_pretrained(tmp_path / "export")
    final = load_file(run_dir / "model" / "model.safetensors")
    for name, value in model.state_dict().items():
        assert torch.equal(value, final[name]), name
    assert (tmp_path / "export" / "vocab.txt").is_file()
    result = subprocess.run([sys.executable, str(ROOT / "recipes" / "export.py"), str(tmp_path / "export"), "--out",
                             str(tmp_path / "clip_cn.pt"), "--format", "cn_clip"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    for name, value in load_pretrained(tmp_path / "clip_cn.pt").state_dict().items():
        assert torch.equal(value, final[name]), name


@pytest.mark.parametrize("change, message", [
    (["stages.0.steps=5"], "was written by a schedule whose stages up to 'unmasked' differ from this config's"),
    (["model.embed_dim=64"], "was written for a different model (model.embed_dim)"),
])
def test_resuming_under_a_different_schedule_or_model_is_refused(single_process_staged, tmp_path, change, message):
    run_dir, _ = single_process_staged
    result = subprocess.run(command(run_dir, None, batch=16) + change, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and message in result.stderr, result.stderr[-2000:]


def test_a_typo_in_a_later_stage_stops_the_run_before_it_trains(tmp_path):
    result = subprocess.run(command(tmp_path, None, batch=16) + ["stages.2.params=[{pattern: 'text\\.embedings\\..*'}]"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert 'error: stage \'unmasked\': pattern "text\\.embedings\\..*" matches no parameter' in result.stderr, result.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


def test_load_pretrained_names_what_is_wrong(single_process_staged, tmp_path):
    run_dir, _ = single_process_staged
    with pytest.raises(ValueError, match=r"no config.yaml \(a model directory of ours\) or config.json"):
        load_pretrained(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.yaml").write_text((run_dir / "model" / "config.yaml").read_text().replace("embed_dim: 128", "embed_dim: 64"))
    (broken / "model.safetensors").write_bytes((run_dir / "model" / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"visual_projection.weight has shape \(128, 128\), the config gives \(64, 128\)"):
        load_pretrained(broken)


@pytest.mark.slow
@pytest.mark.parametrize("zero", LAUNCHERS)
def test_zero_staged_runs_train_the_right_set_and_resume_exactly(tmp_path, zero):
    uninterrupted, resumed = tmp_path / "uninterrupted", tmp_path / "resumed"
    run_to_end(command(uninterrupted, LAUNCHERS[zero], batch=8))
    check_stages(uninterrupted, processes=2, sharded=True)
    kill_twice_then_finish(command(resumed, LAUNCHERS[zero], batch=8), resumed)
    check_resumed_run_matches(resumed, uninterrupted)
    # the shards of the last checkpoint consolidate to the weights the run saved, and every export
    # format loads back to them
    final = load_file(uninterrupted / "model" / "model.safetensors")
    for name, value in consolidate(uninterrupted / "checkpoints" / "step_16").items():
        assert torch.equal(value, final[name]), name
    for fmt, out in [("ours", tmp_path / "ours"), ("hf", tmp_path / "hf"), ("cn_clip", tmp_path / "model.pt")]:
        exported = load_pretrained(export(uninterrupted / "checkpoints" / "step_16", out, fmt))
        assert exported.cfg.vision.heads == 4 and exported.cfg.text.heads == 2, fmt
        for name, value in exported.state_dict().items():
            assert torch.equal(value, final[name]), (fmt, name)


@pytest.mark.slow
def test_a_zero2_staged_run_reproduces_one_process(tmp_path):
    """Without random masks (flip unmasked here), 2 processes x b reproduce 1 process x 2b through
    every boundary: stage batches, lr multipliers and data positions do not depend on the topology."""
    unmasked = ["stages.1.mask_ratio=0.0"]
    run_to_end(command(tmp_path / "one", None, batch=16) + unmasked)
    run_to_end(command(tmp_path / "two", LAUNCHERS["zero2"], batch=8) + unmasked)
    one, two = (load_file(tmp_path / run / "model" / "model.safetensors") for run in ("one", "two"))
    for name in one:
        assert (one[name] - two[name]).abs().max() <= 1e-4, name
    losses = [[m["train/loss"] for m in metrics(tmp_path / run) if "train/loss" in m] for run in ("one", "two")]
    assert len(losses[0]) == 16 and max(abs(a - b) for a, b in zip(*losses)) <= 1e-4
