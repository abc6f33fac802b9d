"""recipes/export.py run in-process: --push-to-hub uploads the exported directory (huggingface_hub's HfApi
replaced, so nothing leaves the machine), and stops before any work when there is no token."""
import importlib.util
from pathlib import Path

import pytest
import yaml
from huggingface_hub import constants

from chinese_clip import hub
from chinese_clip.checkpoints import save_pretrained
from chinese_clip.config import Config
from chinese_clip.model import ChineseCLIP
from tests.conftest import EXPORT, TINY


def export_main():
    spec = importlib.util.spec_from_file_location("export_recipe", EXPORT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


class RecordingApi:
    """HfApi's two calls the upload makes, recorded: the repository and the files it would have received."""
    calls = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, repo_type, private, exist_ok):
        self.calls.append(("create_repo", repo_id, self.token, private, exist_ok))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, repo_id, repo_type, folder_path, commit_message):
        files = sorted(p.name for p in Path(folder_path).iterdir())
        self.calls.append(("upload_folder", repo_id, folder_path, files))


@pytest.fixture
def model_dir(tmp_path):
    save_pretrained(ChineseCLIP(TINY).state_dict(), Config(model=TINY), tmp_path / "model")
    return tmp_path / "model"


@pytest.fixture
def no_saved_login(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no_token"))


def test_push_to_hub_uploads_the_exported_directory(model_dir, tmp_path, monkeypatch, no_saved_login, capsys):
    monkeypatch.setattr(hub, "HfApi", RecordingApi)
    monkeypatch.setattr(RecordingApi, "calls", [])
    monkeypatch.setenv("HF_TOKEN", "hf_from_the_environment")
    out = export_main()([str(model_dir), "--out", str(tmp_path / "export"), "--push-to-hub", "me/tiny-clip-zh", "--private"])
    create, upload = RecordingApi.calls
    assert create == ("create_repo", "me/tiny-clip-zh", "hf_from_the_environment", True, True)
    assert upload[:3] == ("upload_folder", "me/tiny-clip-zh", str(out)) and out == tmp_path / "export"
    assert {"config.json", "model.safetensors", "README.md", "config.yaml", "vocab.txt"} <= set(upload[3])
    card = (out / "README.md").read_text(encoding="utf-8")
    assert yaml.safe_load(card.split("---")[1])["library_name"] == "transformers"
    assert f"converted from `{model_dir}`" in card
    assert "uploaded" in capsys.readouterr().out
    # --token wins over HF_TOKEN
    RecordingApi.calls.clear()
    export_main()([str(model_dir), "--out", str(tmp_path / "hf"), "--format", "hf", "--push-to-hub", "me/x",
                   "--token", "hf_given"])
    assert RecordingApi.calls[0][2] == "hf_given"


def test_push_to_hub_without_a_token_stops_before_exporting(model_dir, tmp_path, monkeypatch, no_saved_login, capsys):
    monkeypatch.setattr(hub, "HfApi", RecordingApi)
    monkeypatch.setattr(RecordingApi, "calls", [])
    with pytest.raises(SystemExit) as stop:
        export_main()([str(model_dir), "--out", str(tmp_path / "export"), "--push-to-hub", "me/tiny-clip-zh"])
    assert str(stop.value) == ("error: pushing to the Hugging Face Hub needs a token: log in with `huggingface-cli login` "
                               "(or `hf auth login`), set HF_TOKEN, or pass --token")
    assert not (tmp_path / "export").exists() and RecordingApi.calls == []


def test_push_to_hub_uploads_no_credentials_of_urls(model_dir, tmp_path, monkeypatch, no_saved_login):
    # a model directory written before URLs were redacted: its card and config.yaml name the data with its password
    url = "https://alice:hunter2@data.example.com/laion/x.tar?X-Amz-Signature=0a1b2c3d"
    config = yaml.safe_load((model_dir / "config.yaml").read_text())
    config["data"] |= {"source": "shards", "shards": [{"path": url, "weight": 1.0}]}
    (model_dir / "config.yaml").write_text(yaml.safe_dump(config))
    (model_dir / "README.md").write_text(f"Data: `{url}` (weight 1).\n", encoding="utf-8")
    monkeypatch.setattr(hub, "HfApi", RecordingApi)
    monkeypatch.setattr(RecordingApi, "calls", [])
    monkeypatch.setenv("HF_TOKEN", "hf_from_the_environment")
    out = export_main()([str(model_dir), "--out", str(tmp_path / "export"), "--push-to-hub", "me/tiny-clip-zh"])
    assert RecordingApi.calls[1][:3] == ("upload_folder", "me/tiny-clip-zh", str(out))
    uploaded = {path.name: path.read_bytes() for path in out.iterdir()}
    assert [name for name, content in uploaded.items() if b"hunter2" in content or b"0a1b2c3d" in content] == []
    card = uploaded["README.md"].decode()
    assert "Data: `https://***@data.example.com/laion/x.tar?X-Amz-Signature=***` (weight 1)." in card
