"""Run checkpoints: atomic, the last N kept, the newest complete one found; a crash mid-write loses nothing."""
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from chinese_clip.config import ConfigError
from chinese_clip.resume import (complete_checkpoints, find_resume_checkpoint, remove_partial_checkpoints,
                                 save_checkpoint)


@pytest.fixture
def accelerator():
    acc = Accelerator(cpu=True)
    acc.prepare(nn.Linear(3, 2), torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1))
    yield acc
    acc.free_memory()


def test_only_the_newest_complete_checkpoints_are_kept(tmp_path, accelerator):
    for step in (2, 4, 6):
        save_checkpoint(accelerator, tmp_path, {"step": step}, keep_last=2)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_4", "step_6"]
    assert find_resume_checkpoint(tmp_path, "auto") == tmp_path / "checkpoints" / "step_6"
    assert find_resume_checkpoint(tmp_path, "never") is None
    assert find_resume_checkpoint(tmp_path / "elsewhere", "auto") is None


def test_a_checkpoint_interrupted_while_written_never_replaces_the_last_good_one(tmp_path, accelerator, monkeypatch):
    save_checkpoint(accelerator, tmp_path, {"step": 2}, keep_last=1)

    def dies_half_way(output_dir):
        Path(output_dir).mkdir()
        (Path(output_dir) / "model.safetensors").write_bytes(b"half a file")
        raise RuntimeError("killed")
    monkeypatch.setattr(accelerator, "save_state", dies_half_way)
    with pytest.raises(RuntimeError, match="killed"):
        save_checkpoint(accelerator, tmp_path, {"step": 4}, keep_last=1)
    assert find_resume_checkpoint(tmp_path, "auto") == tmp_path / "checkpoints" / "step_2"
    remove_partial_checkpoints(tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_2"]


def test_a_checkpoint_saved_again_replaces_the_old_one_whole(tmp_path, accelerator):
    save_checkpoint(accelerator, tmp_path, {"step": 2, "attempt": 1}, keep_last=3)
    save_checkpoint(accelerator, tmp_path, {"step": 2, "attempt": 2}, keep_last=3)
    assert '"attempt": 2' in (tmp_path / "checkpoints" / "step_2" / "trainer_state.json").read_text()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_2"]


def test_an_explicit_resume_path_must_be_a_complete_checkpoint(tmp_path):
    (tmp_path / "step_3").mkdir()
    with pytest.raises(ConfigError, match="step_3 is not a complete checkpoint: trainer_state.json is missing"):
        find_resume_checkpoint(tmp_path, str(tmp_path / "step_3"))
