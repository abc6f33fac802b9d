"""The run directory: checkpoints written atomically, the last N kept, the newest complete one found,
a failed write that loses nothing; one launch at a time; a Trainer that writes nothing until it runs."""
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from chinese_clip.config import ConfigError, load_config
from chinese_clip.engine.ddp import DataParallel
from chinese_clip.model import ChineseCLIP
from chinese_clip.run_dir import RunDir, RunDirError, complete_checkpoints
from chinese_clip.trainer import Trainer
from tests.conftest import CONFIGS, ROOT


@pytest.fixture
def accelerator(cpu_accelerator):
    return cpu_accelerator


def engine_writing(accelerator, write=None):
    """What RunDir asks of an engine when it checkpoints: to save itself into a directory."""
    return SimpleNamespace(save=write or (lambda directory: accelerator.save_state(str(directory))))


def test_only_the_newest_complete_checkpoints_are_kept(tmp_path, accelerator):
    run_dir = RunDir(tmp_path, accelerator)
    for step in (2, 4, 6):
        run_dir.save_checkpoint(engine_writing(accelerator), {"step": step}, keep_last=2)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_4", "step_6"]
    assert run_dir.find_checkpoint("auto") == tmp_path / "checkpoints" / "step_6"
    assert run_dir.find_checkpoint("never") is None
    assert RunDir(tmp_path / "elsewhere", accelerator).find_checkpoint("auto") is None


def test_a_checkpoint_that_cannot_be_written_leaves_the_last_good_one_and_says_so(tmp_path, accelerator):
    run_dir = RunDir(tmp_path, accelerator)
    run_dir.save_checkpoint(engine_writing(accelerator), {"step": 2}, keep_last=1)

    def disk_full_half_way(directory):
        Path(directory).mkdir()
        (Path(directory) / "model.safetensors").write_bytes(b"half a file")
        raise OSError(28, "No space left on device")
    with pytest.raises(RunDirError, match=r"checkpoint step_4 could not be written to .*checkpoints \(\[Errno 28\] No "
                                          r"space left on device; [\d,]+ MiB free there\); step_2 is still the newest "
                                          r"complete checkpoint"):
        run_dir.save_checkpoint(engine_writing(accelerator, disk_full_half_way), {"step": 4}, keep_last=1)
    assert run_dir.find_checkpoint("auto") == tmp_path / "checkpoints" / "step_2"
    run_dir.open(load_config(None), resumed_step=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_2"]


def test_a_checkpoint_saved_again_replaces_the_old_one_whole(tmp_path, accelerator):
    run_dir = RunDir(tmp_path, accelerator)
    run_dir.save_checkpoint(engine_writing(accelerator), {"step": 2, "attempt": 1}, keep_last=3)
    run_dir.save_checkpoint(engine_writing(accelerator), {"step": 2, "attempt": 2}, keep_last=3)
    assert '"attempt": 2' in (tmp_path / "checkpoints" / "step_2" / "trainer_state.json").read_text()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_2"]


def test_an_explicit_resume_path_must_be_a_complete_checkpoint(tmp_path, accelerator):
    (tmp_path / "step_3").mkdir()
    with pytest.raises(ConfigError, match="step_3 is not a complete checkpoint: trainer_state.json is missing"):
        RunDir(tmp_path, accelerator).find_checkpoint(str(tmp_path / "step_3"))


HOLDER = """
import sys, time
from accelerate import Accelerator
from chinese_clip.run_dir import RunDir
run_dir = RunDir(sys.argv[1], Accelerator(cpu=True))
run_dir.hold()  # for as long as run_dir lives
print("holding", flush=True)
time.sleep(600)
"""


def test_a_directory_a_live_run_holds_is_refused_and_a_dead_run_leaves_it_free(tmp_path, accelerator):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline() == "holding\n"
        with pytest.raises(ConfigError, match=rf"{tmp_path} is in use by a live run \(pid {holder.pid} on .*, since "):
            RunDir(tmp_path, accelerator).hold()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    RunDir(tmp_path, accelerator).hold()  # the kernel let go of a killed holder's lock


def test_a_trainer_writes_nothing_until_it_runs(tmp_path, accelerator):
    cfg = load_config(CONFIGS / "tiny_staged.yaml")
    run_dir = RunDir(tmp_path / "run", accelerator)
    trainer = Trainer(cfg, accelerator, DataParallel(accelerator, cfg), run_dir, lambda: ChineseCLIP(cfg.model),
                      make_loader=None, evaluate=None)
    assert [stage.name for stage in trainer.plan] == ["lit", "flip", "unmasked"]
    assert not run_dir.path.exists()


def test_urls_are_written_out_without_their_credentials(tmp_path, accelerator, monkeypatch):
    shards = "https://alice:hunter2@data.example.com/laion/x.tar?X-Amz-Credential=AKIAEXAMPLE&X-Amz-Signature=0a1b2c3d"
    muge = "https://acct.blob.core.windows.net/eval/muge?sv=2022-11-02&sig=SASSECRET"
    secrets = ("hunter2", "AKIAEXAMPLE", "0a1b2c3d", "SASSECRET")
    cfg = load_config(CONFIGS / "tiny_synthetic.yaml", ["data.source=shards", f"data.shards=[{{path: '{shards}'}}]",
                                                        f"eval.sets=[{{name: muge, path: '{muge}'}}]"])
    hparams = {}
    monkeypatch.setattr(accelerator, "init_trackers", lambda name, config: hparams.update(config))
    run_dir = RunDir(tmp_path, accelerator)
    run_dir.open(cfg, resumed_step=None)
    run_dir.save_model(ChineseCLIP(cfg.model).state_dict(), cfg, tokenizer=None)
    run_dir.write_results({"after": {}})  # the cards again, from config.yaml read back

    written = {path: path.read_text(encoding="utf-8") for path in
               (tmp_path / "config.yaml", tmp_path / "model" / "config.yaml", tmp_path / "model" / "README.md")}
    written["tracker hyperparameters"] = str(hparams)
    assert {where: [s for s in secrets if s in text] for where, text in written.items()
            if any(s in text for s in secrets)} == {}
    readable = "https://***@data.example.com/laion/x.tar?X-Amz-Credential=***&X-Amz-Signature=***"
    assert load_config(tmp_path / "config.yaml").data.shards[0].path == readable
    assert f"Data: `{readable}` (weight 1)" in written[tmp_path / "model" / "README.md"]
    assert "https://acct.blob.core.windows.net/eval/muge?sv=2022-11-02&sig=***" in hparams["eval.sets"]
    assert cfg.data.shards[0].path == shards and cfg.eval.sets[0].path == muge  # the run itself reads the real URLs
