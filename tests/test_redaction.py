"""Credentials inside URLs (user info, presigned signatures, tokens) are replaced by *** wherever a URL is written
out, the rest of the URL left readable; the data position of a checkpoint compares URLs redacted, so a resumed
run takes a newly signed URL; a launch's error line names the URL without its secret. (config.yaml, the model
card and the tracker hyperparameters of a run: tests/test_run_dir.py; what --push-to-hub uploads:
tests/test_export.py.)"""
import pytest

from chinese_clip.config import DataConfig
from chinese_clip.data.stream import ShardSource, start_states, stream_layout
from chinese_clip.redact import redact, redact_url
from tests.conftest import PRETRAIN, error_lines

S3 = ("https://bucket.s3.amazonaws.com/laion/00001.tar?X-Amz-Algorithm=AWS4-HMAC-SHA256"
      "&X-Amz-Credential=AKIAEXAMPLE%2F20240101%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20240101T000000Z"
      "&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Security-Token=FQoGZXIvYXdzEXAMPLE&X-Amz-Signature=0a1b2c3d")


@pytest.mark.parametrize("text, redacted", [
    ("https://alice:hunter2@data.example.com/laion/x.tar", "https://***@data.example.com/laion/x.tar"),
    ("https://ghp_tokenAsUser@github.com/org/repo.git", "https://***@github.com/org/repo.git"),
    (S3, "https://bucket.s3.amazonaws.com/laion/00001.tar?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=***"
         "&X-Amz-Date=20240101T000000Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Security-Token=***"
         "&X-Amz-Signature=***"),
    ("https://storage.googleapis.com/b/x.tar?X-Goog-Algorithm=GOOG4-RSA-SHA256&X-Goog-Credential=sa%40p.iam"
     "&X-Goog-Date=20240101T000000Z&X-Goog-Signature=deadbeef",
     "https://storage.googleapis.com/b/x.tar?X-Goog-Algorithm=GOOG4-RSA-SHA256&X-Goog-Credential=***"
     "&X-Goog-Date=20240101T000000Z&X-Goog-Signature=***"),
    ("https://acct.blob.core.windows.net/c/x.tar?sv=2022-11-02&se=2025-01-01T00:00:00Z&sr=b&sp=r&sig=AbC%2Bd%3D",
     "https://acct.blob.core.windows.net/c/x.tar?sv=2022-11-02&se=2025-01-01T00:00:00Z&sr=b&sp=r&sig=***"),
    ("https://api.example.com/x.tar?token=t&access_token=a&api_key=k&key=K&password=p&secret=s",
     "https://api.example.com/x.tar?token=***&access_token=***&api_key=***&key=***&password=***&secret=***"),
    ("https://example.com/data/x.tar?page=2&lang=zh&monkey=1", "https://example.com/data/x.tar?page=2&lang=zh&monkey=1"),
    ("s3://bucket/laion-zh/{00000..09999}.tar", "s3://bucket/laion-zh/{00000..09999}.tar"),
    ("s3://bucket/releases/model@v2/x.tar", "s3://bucket/releases/model@v2/x.tar"),  # an @ in the path is no user
    ("not a url: token=abc&key=def", "not a url: token=abc&key=def"),
    ("/data/muge/shards?key=1", "/data/muge/shards?key=1"),
    ("data: `https://u:p@h/x.tar?sig=abc` (weight 1)", "data: `https://***@h/x.tar?sig=***` (weight 1)"),
])
def test_redact_url_hides_credentials_and_keeps_the_rest(text, redacted):
    assert redact_url(text) == redacted
    assert redact_url(redacted) == redacted  # a config.yaml read back and written again stays as it is


def test_redact_reaches_every_string_of_a_config():
    config = {"data": {"shards": [{"path": "https://u:p@h/x.tar", "weight": 2.0}], "batch_size": 8, "vocab": None},
              "eval": {"sets": [{"name": "muge", "path": "https://h/muge?sig=abc"}]}}
    assert redact(config) == {
        "data": {"shards": [{"path": "https://***@h/x.tar", "weight": 2.0}], "batch_size": 8, "vocab": None},
        "eval": {"sets": [{"name": "muge", "path": "https://h/muge?sig=***"}]}}


def test_a_resumed_run_accepts_the_same_data_under_a_newly_signed_url():
    def layout(url):
        return stream_layout([ShardSource(url, (url,), None, 1.0, "tar")], DataConfig(source="shards"), 2, 0)

    saved = layout(S3)
    resumed = layout(S3.replace("0a1b2c3d", "9f8e7d6c").replace("FQoGZXIvYXdzEXAMPLE", "FQoNEWTOKEN"))
    assert "0a1b2c3d" not in str(saved) and "FQoGZXIvYXdzEXAMPLE" not in str(saved)  # saved in every checkpoint
    states = {"0": {"read": 5}}
    assert start_states({"layout": saved, "workers": states, "next_worker": 1}, resumed, reset=False) == (states, 1)
    # other data under the same credentials is still another layout
    assert layout(S3.replace("00001.tar", "00002.tar")) != saved


def test_a_launch_that_cannot_find_a_url_says_so_without_its_secret(tmp_path, in_process):
    url = f"file://{tmp_path}/missing/x.tar?X-Amz-Signature=s3cr3t"
    result = in_process(PRETRAIN, "data.source=shards", f"data.shards=[{{path: '{url}'}}]",
                        f"run.output_dir={tmp_path / 'run'}")
    assert result.returncode == 2
    redacted = f"file://{tmp_path}/missing/x.tar?X-Amz-Signature=***"
    assert error_lines(result) == [f"error: data.shards: {redacted} matches no file"]
    assert "s3cr3t" not in result.stdout + result.stderr
