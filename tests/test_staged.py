"""Staged schedules end to end, in one process and on two CPU ranks under every engine (DDP, ZeRO-2,
ZeRO-3, FSDP2): what trains in each stage, optimizer state, frozen towers; runs whose ranks or
launcher are SIGKILLed (mid-stage and right after a boundary) resume to the uninterrupted result;
a run owns its directory, and a checkpoint the disk refuses loses nothing.

All runs are recipes/pretrain.py on the tiny staged preset, shortened: lit (vision frozen) steps
0-5, flip (everything, mask 0.5, double batch, text embeddings at lr x 0.5) 6-11, unmasked
(mask 0, same trainable set, so the engine is kept) 12-15; a checkpoint every 2 steps, an
evaluation at every stage end.
"""
import json
import re

import psutil
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from torchvision.transforms.functional import pil_to_tensor
from transformers import ChineseCLIPModel, ChineseCLIPProcessor

from chinese_clip.checkpoints import export, load_pretrained
from chinese_clip.config import ConfigError, load_config
from chinese_clip.data.collate import ImageTextCollator
from chinese_clip.data.transforms import eval_transform
from chinese_clip.engine import consolidate_checkpoint
from chinese_clip.engine.ddp import DataParallel
from chinese_clip.model import ChineseCLIP
from chinese_clip.run_dir import RunDir, checkpoint_model, complete_checkpoints, consolidate
from chinese_clip.tokenizer import load_tokenizer
from chinese_clip.trainer import Trainer
from tests.conftest import (CONFIGS, EXPORT, STAGED, assert_same_weights, check_resumed_run_matches, error_lines,
                            final_weights, kill_launcher, kill_one_rank, kill_tree, log_of, metrics, on_shards,
                            resumed_from, run_to_end, staged, start_until_checkpoint, write_shards)
from tests.test_checkpoints import TEXTS, assert_same_features, hf_features, ours_features
from tests.tolerances import REPEATED, TRAINING

LIT_FROZEN = re.compile(r"visual(_projection)?\..*|logit_bias")  # the lit stage's rule, and InfoNCE's bias


def stage_weights(run_dir):
    return [load_file(run_dir / "stages" / name) for name in ("0-lit.safetensors", "1-flip.safetensors",
                                                             "2-unmasked.safetensors")] + [final_weights(run_dir)]


def check_stages(run_dir, processes: int, sharded: bool) -> None:
    """Each stage trains exactly its parameters, and the optimizer holds state for those alone."""
    start_lit, start_flip, start_unmasked, final = stage_weights(run_dir)
    names = list(start_lit)
    changed = lambda a, b: {n for n in names if not torch.equal(a[n], b[n])}  # noqa: E731
    assert changed(start_lit, start_flip) == {n for n in names if not LIT_FROZEN.fullmatch(n)}
    assert changed(start_flip, start_unmasked) == changed(start_unmasked, final) == set(names) - {"logit_bias"}
    # the frozen tower, bit for bit, where the engine held it at the end of lit: never touched
    lit_end = consolidate_checkpoint(run_dir / "checkpoints" / "step_6")
    for name in names:
        if LIT_FROZEN.fullmatch(name) and name in lit_end:
            assert torch.equal(lit_end[name], start_lit[name]), name
    # Adam's two moments per trained value, summed over ranks: once (sharded) or per rank (DDP, 1 process)
    size = lambda keep: sum(start_lit[n].numel() for n in names if keep(n))  # noqa: E731
    trained = {1: size(lambda n: not LIT_FROZEN.fullmatch(n)), 7: size(lambda n: n != "logit_bias")}
    trained[13] = trained[7]
    held = {m["step"]: m["stage/optimizer_state_values"] for m in metrics(run_dir) if "stage/optimizer_state_values" in m}
    for first_step, values in trained.items():
        expected = 2 * values * (1 if sharded else processes)
        # shards are padded to a multiple of the world size: at most a few values per tensor
        assert expected <= held[first_step] <= expected + 2 * len(names) * processes, (first_step, held, expected)


@pytest.fixture(scope="module")
def single_process_staged(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("staged_single") / "run"
    return run_dir, run_to_end(staged(run_dir, 16), run_dir)


def test_each_stage_trains_its_parameters_and_nothing_else(single_process_staged):
    run_dir, stdout = single_process_staged
    check_stages(run_dir, processes=1, sharded=False)
    starts = [m for m in metrics(run_dir) if "stage/index" in m]
    assert [(m["step"], m["stage/name"], m["stage/mask_ratio"], m["stage/global_batch"]) for m in starts] == [
        (0, "lit", 0.0, 16), (6, "flip", 0.5, 32), (12, "unmasked", 0.0, 16)]
    weights = final_weights(run_dir)
    vision = sum(v.numel() for n, v in weights.items() if n.startswith("visual"))
    text = sum(v.numel() for n, v in weights.items() if n.startswith("text"))
    lit, flip, _ = starts
    assert (lit["stage/vision_trained"], lit["stage/vision_frozen"], lit["stage/text_trained"]) == (0, vision, text)
    assert (flip["stage/vision_trained"], flip["stage/text_trained"], flip["stage/logit_frozen"]) == (vision, text, 1)
    assert f"vision              0 of {vision:>13,} parameters train (frozen)" in lit["stage/summary"]
    assert lit["stage/summary"] in stdout
    # eval.at_stage_end: each stage's end is evaluated, the run's end once (eval.at_end)
    assert [(m["tag"], m["step"]) for m in metrics(run_dir) if "tag" in m] == [("during", 6), ("during", 12), ("after", 16)]
    assert "best" not in json.loads((run_dir / "eval.json").read_text())


def test_export_of_a_checkpoint_loads_with_the_final_weights(single_process_staged, tmp_path, in_process):
    run_dir, _ = single_process_staged
    result = in_process(EXPORT, str(run_dir), "--out", str(tmp_path / "export"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"exported {run_dir / 'checkpoints' / 'step_16'}" in result.stdout
    model = load_pretrained(tmp_path / "export")
    final = final_weights(run_dir)
    for name, value in model.state_dict().items():
        assert torch.equal(value, final[name]), name
    assert (tmp_path / "export" / "vocab.txt").is_file()
    card = (tmp_path / "export" / "README.md").read_text(encoding="utf-8")  # written from the checkpoint's run
    assert "these are its weights at step 16." in card
    evaluation = lambda text: text[text.index("## Evaluation"):text.index("## Usage")]  # noqa: E731
    assert evaluation(card) == evaluation((run_dir / "model" / "README.md").read_text(encoding="utf-8"))
    assert in_process(EXPORT, str(tmp_path / "export"), "--out", str(tmp_path / "clip_cn.pt"), "--format", "cn_clip").returncode == 0
    for name, value in load_pretrained(tmp_path / "clip_cn.pt").state_dict().items():
        assert torch.equal(value, final[name]), name


def test_the_runs_model_loads_in_transformers_with_our_features_and_preprocessing(single_process_staged):
    """model/ is an HF directory: ChineseCLIPModel encodes as load_pretrained's model does, and
    ChineseCLIPProcessor tokenizes and preprocesses images as the run evaluated them."""
    run_dir, _ = single_process_staged
    hf = ChineseCLIPModel.from_pretrained(run_dir / "model").eval()
    processor = ChineseCLIPProcessor.from_pretrained(run_dir / "model")
    ours = load_pretrained(run_dir / "model").eval()
    cfg = load_config(run_dir / "model" / "config.yaml")
    tokenizer = load_tokenizer(None, cfg.data.context_length)
    generator = torch.Generator().manual_seed(0)
    images = [Image.fromarray(torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator).numpy())
              for shape in [(40, 90, 3), (64, 64, 3), (100, 70, 3)]]
    batch = processor(text=TEXTS[:3], images=images, padding="max_length", max_length=cfg.data.context_length,
                      truncation=True, return_tensors="pt")
    tokens = tokenizer(TEXTS[:3])
    assert torch.equal(batch["input_ids"], tokens["input_ids"])
    collator = ImageTextCollator(tokenizer, cfg.data.mean, cfg.data.std)
    pixels = collator.pixel_batch([eval_transform(64)(pil_to_tensor(image)) for image in images])
    # the processor normalises in another order: 1e-5 of a unit, where one grey level is 1.7e-2
    torch.testing.assert_close(batch["pixel_values"], pixels, atol=1e-5, rtol=0)
    inputs = (pixels, tokens["input_ids"], tokens["attention_mask"])
    assert_same_features(hf_features(hf, *inputs), ours_features(ours, *inputs))


def test_the_model_card_names_the_architecture_the_stages_and_the_final_scores(single_process_staged):
    run_dir, _ = single_process_staged
    card = (run_dir / "model" / "README.md").read_text(encoding="utf-8")
    front = yaml.safe_load(card.split("---\n")[1])
    assert "license" in front and front["license"] is None  # for the user to fill in
    assert (front["library_name"], front["pipeline_tag"], front["language"]) == (
        "transformers", "zero-shot-image-classification", "zh")
    assert "| width | 128 | 128 |" in card and "| layers | 4 | 2 |" in card and "| 64x64 pixels, 16x16 patches |" in card
    assert "Trained for 16 steps on 352 samples" in card
    assert "| lit | 0-5 (6) | 96 | 16 | 0 | 1.00e-03 | vision: frozen; text: all |" in card
    assert "| flip | 6-11 (6) | 192 | 32 | 0.5 | 1.00e-03 | vision: all; text: all (lr x 1, 0.5) |" in card
    assert "| unmasked | 12-15 (4) | 64 | 16 | 0 | 2.00e-04 | vision: all; text: all (lr x 1, 0.5) |" in card
    after = json.loads((run_dir / "eval.json").read_text())["after"]
    assert after.keys() == {"val", "novel"}
    for name, result in after.items():  # eval.at_start=false: the scores after training are the one column
        assert f"| {name} | top1 | {result['top1']:.2f} |" in card and f"| {name} | top5 | {result['top5']:.2f} |" in card
    assert "from chinese_clip.inference import load_model" in card and "ChineseCLIPModel.from_pretrained" in card


def test_evaluating_does_not_change_what_trains(single_process_staged, tmp_path):
    """FLIP masks and dropout draw from the RNG every step: evaluating at the stage ends (as the reference
    run did) must neither shift them nor leave the model in eval mode. Either changes the weights by
    more than 1e-4 (a torch.rand(1) in evaluation: 1.8e-3); tolerances.REPEATED, since two runs of the
    same command once differed by 1e-8."""
    reference, _ = single_process_staged
    run_to_end(staged(tmp_path / "run", 16, None, "eval.at_stage_end=false", "eval.at_end=false"), tmp_path / "run")
    assert not [m for m in metrics(tmp_path / "run") if "tag" in m]
    assert_same_weights(final_weights(tmp_path / "run"), final_weights(reference), atol=REPEATED)


@pytest.mark.parametrize("change, message", [
    (["stages.0.steps=5"], "was written by a schedule whose stages up to 'unmasked' differ from this config's"),
    (["model.embed_dim=64"], "was written for a different model (model.embed_dim)"),
])
def test_resuming_under_a_different_schedule_or_model_is_refused(single_process_staged, change, message,
                                                                 cpu_accelerator):
    run_dir, _ = single_process_staged
    cfg = load_config(CONFIGS / "tiny_staged.yaml", [*STAGED[2:], "data.batch_size=16", "stages.1.batch_size=32", *change])
    accelerator = cpu_accelerator
    with pytest.raises(ConfigError, match=re.escape(message)):
        Trainer(cfg, accelerator, DataParallel(accelerator, cfg), RunDir(run_dir, accelerator),
                lambda: ChineseCLIP(cfg.model), make_loader=None, evaluate=None)


def test_a_typo_in_a_later_stage_stops_the_run_before_it_trains(tmp_path, in_process):
    result = in_process(*staged(tmp_path, 16, None, "stages.2.params=[{pattern: 'text\\.embedings\\..*'}]")[1:])
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


def test_a_run_owns_its_directory_and_resumes_exactly_after_a_full_disk_and_a_kill(single_process_staged, tmp_path,
                                                                                     in_process):
    """While a run trains, a second launch into its directory stops at start-up. When the run's next
    checkpoint cannot be written (the kernel refuses files over 1 MiB from then on, as a full disk
    would), it stops saying so, its last checkpoint intact. Relaunched, it is SIGKILLed right after
    the lit -> flip boundary; relaunched again, it ends as the run that was never stopped."""
    reference, _ = single_process_staged
    run_dir = tmp_path / "run"
    cmd = staged(run_dir, 16)
    process = start_until_checkpoint(cmd, run_dir, step=2)
    training = psutil.Process(process.pid)
    training.suspend()  # alive, holding its directory, while a second launch tries it
    try:
        second = in_process(*cmd[1:])
        assert second.returncode == 2 and len(error_lines(second)) == 1 and re.fullmatch(
            rf"error: {run_dir} is in use by a live run \(pid {process.pid} on .+, since .+\); wait for it to end or "
            r"stop it, or give this run another run.output_dir", error_lines(second)[0]), second.stderr[-2000:]
        training.rlimit(psutil.RLIMIT_FSIZE, (2**20, 2**20))
        training.resume()
        assert process.wait(timeout=300) == 4
    finally:
        if process.poll() is None:
            kill_tree(process)
    said = [line for line in log_of(run_dir).read_text().splitlines() if line.startswith("error")]
    refused = re.fullmatch(
        rf"error on rank 0: checkpoint step_\d+ could not be written to {run_dir / 'checkpoints'} \(.+; [\d,]+ MiB "
        r"free there\); (step_\d+) is still the newest complete checkpoint. Free space or fix the directory, then "
        r"relaunch to resume", said[-1])
    assert len(said) == 1 and refused, said
    newest = complete_checkpoints(run_dir)[-1]
    assert refused.group(1) == newest.name and 2 <= int(newest.name[5:]) < 6

    kill_launcher(start_until_checkpoint(cmd, run_dir, step=6), run_dir)
    run_to_end(cmd, run_dir)
    first, second = resumed_from(run_dir)
    assert first == int(newest.name[5:]) and 6 <= second < 10, (first, second)
    check_resumed_run_matches(run_dir, reference)


# How each engine's two-rank run is varied and interrupted, and what it is compared with. The kills are
# (what is SIGKILLed, right after which checkpoint); the launcher is killed once (under FSDP), since what
# follows it does not depend on the engine. Without FLIP masks (the flip stage unmasked), 2 ranks x b
# reproduce 1 process x 2b through every boundary: stage batches, lr multipliers and data positions do
# not depend on the topology, and that one process is the reference. ZeRO-2 keeps the masks (each rank
# draws its own, and a resumed rank must draw the same again) and reads shards with two workers per
# rank: no one process reads in that order, so its reference is the same launch, uninterrupted. DDP
# runs with activation checkpointing, which must recompute what the reference kept.
TWO_RANK_RUNS = {
    "ddp": (["stages.1.mask_ratio=0.0", "model.grad_checkpointing=true"], "one process", [("one rank", 6)]),
    "zero2": (["shards, two workers per rank"], "uninterrupted", [("one rank", 6)]),
    "zero3": (["stages.1.mask_ratio=0.0"], "one process", [("one rank", 2)]),
    "fsdp": (["stages.1.mask_ratio=0.0"], "one process", [("one rank", 2), ("the launcher", 6)]),
}


@pytest.fixture(scope="module")
def single_process_unmasked(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("staged_unmasked") / "run"
    run_to_end(staged(run_dir, 16, None, "stages.1.mask_ratio=0.0"), run_dir)
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("engine", TWO_RANK_RUNS)
def test_two_ranks_train_the_right_set_and_resume_exactly_after_a_rank_or_the_launcher_is_killed(
        tmp_path, engine, request, in_process):
    """Every engine: each stage trains its set with optimizer state for it alone; a run whose rank
    (or launcher) is SIGKILLed mid-stage or right after the lit -> flip boundary resumes to the
    reference's weights, losses and evaluations; its last checkpoint consolidates in one process and
    exports (recipes/export.py) to the weights it saved. Under ZeRO-2 on shards, both ranks' workers'
    positions travel in the checkpoints."""
    overrides, compared_with, kills = TWO_RANK_RUNS[engine]
    if overrides == ["shards, two workers per rank"]:
        overrides = on_shards(write_shards(tmp_path / "shards", pairs=320, rows_per_shard=40), workers=2)
    resumed = tmp_path / "resumed"
    if compared_with == "uninterrupted":
        reference = tmp_path / "uninterrupted"
        run_to_end(staged(reference, 8, engine, *overrides), reference)
    else:
        reference = request.getfixturevalue("single_process_unmasked")
    cmd = staged(resumed, 8, engine, *overrides)
    for victim, step in kills:
        process = start_until_checkpoint(cmd, resumed, step)
        (kill_one_rank if victim == "one rank" else kill_launcher)(process, resumed)
    run_to_end(cmd, resumed)
    resumes = resumed_from(resumed)
    assert len(resumes) == len(kills) and all(step <= at < step + 4 for at, (_, step) in zip(resumes, kills)), resumes
    check_resumed_run_matches(resumed, reference, atol=REPEATED if compared_with == "uninterrupted" else TRAINING)
    check_stages(resumed, processes=2, sharded=engine != "ddp")
    if engine == "zero2":
        state = json.loads((resumed / "checkpoints" / "step_16" / "trainer_state.json").read_text())
        assert [sorted(position["workers"]) for position in state["data"]] == [["0", "1"], ["0", "1"]]

    final = final_weights(resumed)
    checkpoint = resumed / "checkpoints" / "step_16"
    for name, value in consolidate(checkpoint).items():
        assert torch.equal(value, final[name]), name
    assert in_process(EXPORT, str(resumed), "--out", str(tmp_path / "hf"), "--format", "hf").returncode == 0
    model, cfg = checkpoint_model(checkpoint)
    for fmt, out in [("hf", tmp_path / "hf"), ("ours", export(model, cfg, tmp_path / "ours", "ours", load_tokenizer())),
                     ("cn_clip", export(model, cfg, tmp_path / "model.pt", "cn_clip", load_tokenizer()))]:
        exported = load_pretrained(out)
        assert exported.cfg.vision.heads == 4 and exported.cfg.text.heads == 2, fmt
        for name, value in exported.state_dict().items():
            assert torch.equal(value, final[name]), (fmt, name)
